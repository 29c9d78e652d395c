"""Side by side with mergekit 0.1.5 on the same generated Llama-shaped checkpoints.

    .venv/bin/python bench/bench_vs_mergekit.py [--shape llama-7b-2layers] [--rank 16]
        [--alpha 0.5] [--repeat 1] [--keep] [--quick] [--json bench/results/vs_mergekit.json]

Rows, each one separate process, so its wall time and peak RSS (``os.wait4`` ru_maxrss: the
process and any children it waited for) are its own:

- ours extract:  gene of aligned - degraded at rank r (safegene CLI, or the Python API);
- ours apply:    merged checkpoint target + alpha * B @ A with that gene;
- ours resta:    target + alpha * (aligned - degraded), every tensor dense;
- copy floor:    a plain streaming copy of target's files (16 MiB reads and writes, fsync):
                 what any streaming merge must pay at least;
- copy floor + read A, D: the same copy after reading aligned's and degraded's files the same
                 way: the bytes resta moves (the targets are judged on the plain copy floor);
- mergekit task_arithmetic: base degraded, target weight 1, aligned weight alpha, normalize
                 false, dtype bfloat16: the same T + alpha * (A - D) as resta;
- mergekit-extract-lora: base degraded, model aligned, --max-rank r, on the same modules as ours.

Every input checkpoint is read once before each row so all rows start from a warm page cache.
Our outputs are removed right after their row, except the last round's, which are checked first;
mergekit's just before its next row (at most two checkpoints' worth of outputs on disk at a
time: the 70B-shaped family fits a small disk).
GB/s is the checkpoint's tensor bytes over wall time for every merge row (resta and mergekit
also read aligned and degraded: three times the input bytes of apply / copy). Extraction error is
the Frobenius error of B @ A against aligned - degraded (float64) over the optimal rank-r error
(singular values from a full float64 SVD, Eckart-Young) on a sample of matrices.

The mergekit virtual environment ``.venv-mergekit`` (torch 2.13.0, mergekit 0.1.5) is created
on first use, except with ``--quick`` (mergekit rows are then skipped with a note).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from safegene_fast.io import write_text
import safegene_fast
from safegene_fast.experiments.bench import COPY_FLOOR, measure_command, shard_files
from safegene_fast.io import Checkpoint
from safegene_fast.models.synthetic import SHAPES, default_root, write_family

REPO = Path(__file__).resolve().parent.parent
MERGEKIT_VENV = REPO / ".venv-mergekit"
MERGEKIT_PINS = ["torch==2.13.0", "mergekit==0.1.5"]

TARGETS = {  # the project's targets against mergekit and the copy floor
    "apply_speedup_vs_mergekit": ("ours apply: speed-up over mergekit task_arithmetic", ">=", 3.0),
    "resta_speedup_vs_mergekit": ("ours resta: speed-up over mergekit task_arithmetic", ">=", 3.0),
    "apply_rss_vs_mergekit": ("ours apply: peak RSS / mergekit's", "<=", 0.25),
    "resta_rss_vs_mergekit": ("ours resta: peak RSS / mergekit's", "<=", 0.25),
    "apply_vs_copy_floor": ("ours apply: throughput / copy floor", ">=", 0.6),
    "resta_vs_copy_floor": ("ours resta: throughput / copy floor", ">=", 0.6),
    "extract_speedup_vs_mergekit": ("ours extract: speed-up over mergekit-extract-lora", ">=", 20.0),
    "extract_error_ratio_max": ("ours extract: error / optimal (worst sampled matrix)", "<=", 1.02),
}


# ---------------------------------------------------------------------------------------------
# running and measuring


def run_measured(cmd: list[str], log: Path, env: dict | None = None, timeout: float | None = None) -> dict:
    """Runs cmd through safegene_fast.experiments.bench's launcher: its own wall seconds and peak RSS (MB)."""
    with open(log, "wb") as out:
        result = measure_command(cmd, out, subprocess.STDOUT, env=env, timeout=timeout)
    if not result["timed_out"]:
        del result["timed_out"]
    if result["rc"] != 0:
        tail = log.read_bytes()[-3000:].decode(errors="replace")
        result["error_tail"] = tail
        print(f"\n  command failed (rc {result['rc']}): {shlex.join(cmd)}\n{textwrap.indent(tail, '    ')}",
              file=sys.stderr)
    return result


def warm(*folders: Path) -> None:
    """Reads every file once so each row starts from the same (warm) page cache."""
    buf = bytearray(16 << 20)
    for folder in folders:
        for f in sorted(Path(folder).iterdir()):
            if f.is_file():
                with open(f, "rb", buffering=0) as fh:
                    while fh.readinto(buf):
                        pass


def fsync_tree(folder: Path) -> float:
    """Seconds to fsync every file of folder (what a writer that does not fsync leaves to do)."""
    start = time.perf_counter()
    for f in Path(folder).iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    return time.perf_counter() - start


def rm(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# the mergekit environment


def mergekit_bin(name: str) -> Path:
    return MERGEKIT_VENV / "bin" / name


def ensure_mergekit(install: bool) -> tuple[bool, str]:
    """(available, note). Creates .venv-mergekit when asked and missing."""
    if mergekit_bin("mergekit-yaml").exists() and mergekit_bin("mergekit-extract-lora").exists():
        return True, ""
    if not install:
        return False, f"mergekit rows skipped: {MERGEKIT_VENV} is missing (--quick never installs)"
    base_python = shutil.which("python3") or getattr(sys, "_base_executable", sys.executable)
    print(f"creating {MERGEKIT_VENV} ({' '.join(MERGEKIT_PINS)}); a few minutes, once", flush=True)
    try:
        if not (MERGEKIT_VENV / "bin" / "python").exists():
            subprocess.run([base_python, "-m", "venv", str(MERGEKIT_VENV)], check=True)
        subprocess.run([str(MERGEKIT_VENV / "bin" / "python"), "-m", "pip", "install", "-q", *MERGEKIT_PINS],
                       check=True)
    except subprocess.CalledProcessError as exc:
        return False, f"mergekit rows skipped: installing it failed ({exc})"
    return True, ""


def mergekit_versions() -> dict:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('mergekit', 'torch', 'transformers', 'safetensors')}))")
    try:
        out = subprocess.run([str(MERGEKIT_VENV / "bin" / "python"), "-c", code], capture_output=True,
                             text=True, check=True).stdout
        return json.loads(out)
    except (OSError, subprocess.CalledProcessError, json.JSONDecodeError):
        return {}


# ---------------------------------------------------------------------------------------------
# checks of the outputs


def sample_modules(shape) -> list[str]:
    last = shape.layers - 1
    return ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
            f"model.layers.{last}.self_attn.v_proj", f"model.layers.{last}.mlp.gate_proj"]


def read_factors(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (B, A)} of a PEFT LoRA adapter, scaled by lora_alpha / r (per module patterns)."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    out = {}
    with Checkpoint(folder / "adapter_model.safetensors") as ck:
        for name in ck.names:
            if not name.endswith(".lora_A.weight"):
                continue
            module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            A = ck.read(name).double()
            B = ck.read(name.replace(".lora_A.", ".lora_B.")).double()
            r = cfg.get("rank_pattern", {}).get(module, cfg["r"])
            lora_alpha = cfg.get("alpha_pattern", {}).get(module, cfg["lora_alpha"])
            out[module] = (B * (lora_alpha / r), A)
    return out


def extraction_errors(family: dict, rank: int, modules: list[str], adapters: dict[str, Path]) -> dict:
    """Per sampled matrix: optimal rank-r error and each adapter's error / optimal."""
    factors = {tool: read_factors(path) for tool, path in adapters.items()}
    rows = {}
    with Checkpoint(family["aligned"]) as a_ck, Checkpoint(family["degraded"]) as d_ck:
        for module in modules:
            name = module + ".weight"
            delta = a_ck.read(name).double() - d_ck.read(name).double()
            start = time.perf_counter()
            s = torch.linalg.svdvals(delta)  # the full SVD's singular values, float64
            svd_s = time.perf_counter() - start
            optimal = float(s[rank:].square().sum().sqrt())
            row = {"shape": list(delta.shape), "optimal_error": optimal,
                   "relative_optimal_error": optimal / float(s.square().sum().sqrt()),
                   "full_svd_float64_s": round(svd_s, 2)}
            for tool, fs in factors.items():
                if module not in fs:
                    row[f"{tool}_error_ratio"] = None
                    continue
                B, A = fs[module]
                err = float(torch.linalg.matrix_norm(delta - B @ A))
                row[f"{tool}_error_ratio"] = err / optimal
                row[f"{tool}_rank"] = A.shape[0]
            rows[module] = row
    return rows


def _bf16_ulp(exact: torch.Tensor) -> torch.Tensor:
    _, e = torch.frexp(exact)
    return torch.ldexp(torch.ones_like(exact), e - 8).clamp_min(2.0 ** -133)


def compare_resta(family: dict, alpha: float, outputs: dict[str, Path]) -> dict:
    """Each output against the float64 T + alpha (A - D), and the outputs against each other:
    max |diff|, elements that differ, max error in bf16 units in the last place of max(|T|, |A|, |D|, |exact|)."""
    tools = list(outputs)
    stats = {t: {"max_abs_err_vs_exact": 0.0, "max_ulp_err_vs_exact": 0.0} for t in tools}
    pair = {"max_abs_diff": 0.0, "elements_differing": 0, "elements": 0}
    cks = {k: Checkpoint(family[k]) for k in ("target", "aligned", "degraded")}
    outs = {t: Checkpoint(p) for t, p in outputs.items()}
    try:
        for name in cks["target"].names:
            t, a, d = (cks[k].read(name) for k in ("target", "aligned", "degraded"))
            got = {tool: ck.read(name) for tool, ck in outs.items()}
            rows = t.shape[0] if t.dim() > 1 else 1
            step = max(1, (8 << 20) // max(1, t.numel() // rows))
            for r0 in range(0, rows, step):
                sl = slice(r0, r0 + step) if t.dim() > 1 else slice(None)
                exact = t[sl].double() + alpha * (a[sl].double() - d[sl].double())
                # units in the last place of the largest of |T|, |A|, |D|, |result|: the scale of
                # the computation (near-cancelling entries would otherwise count a tiny absolute
                # error as many ulps of a tiny result)
                scale = torch.maximum(torch.maximum(exact.abs(), t[sl].double().abs()),
                                      torch.maximum(a[sl].double().abs(), d[sl].double().abs()))
                ulp = _bf16_ulp(scale)
                vals = {}
                for tool in tools:
                    v = vals[tool] = got[tool][sl].double()
                    err = (v - exact).abs()
                    stats[tool]["max_abs_err_vs_exact"] = max(stats[tool]["max_abs_err_vs_exact"], float(err.max()))
                    stats[tool]["max_ulp_err_vs_exact"] = max(stats[tool]["max_ulp_err_vs_exact"],
                                                              float((err / ulp).max()))
                if len(tools) == 2:
                    diff = (vals[tools[0]] - vals[tools[1]]).abs()
                    pair["max_abs_diff"] = max(pair["max_abs_diff"], float(diff.max()))
                    pair["elements_differing"] += int((diff > 0).sum())
                    pair["elements"] += diff.numel()
    finally:
        for ck in [*cks.values(), *outs.values()]:
            ck.close()
    result = {"vs_exact": stats}
    if len(tools) == 2:
        pair["fraction_differing"] = pair["elements_differing"] / max(1, pair["elements"])
        result[f"{tools[0]}_vs_{tools[1]}"] = pair
    return result


def check_apply(family: dict, gene: Path, out: Path, alpha: float, module: str) -> dict:
    """One matrix of the merged output against float64 T + alpha B @ A, in bf16 ulps of
    max(|T|, |exact|)."""
    B, A = read_factors(gene)[module]
    name = module + ".weight"
    with Checkpoint(family["target"]) as t_ck, Checkpoint(out) as o_ck:
        t = t_ck.read(name).double()
        exact = t + alpha * (B @ A)
        err = (o_ck.read(name).double() - exact).abs()
    ulp = _bf16_ulp(torch.maximum(exact.abs(), t.abs()))
    return {"module": module, "max_abs_err": float(err.max()), "max_ulp_err": float((err / ulp).max())}


# ---------------------------------------------------------------------------------------------


def median_row(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["rc"] == 0]
    if not ok:
        return {"wall_s": None, "peak_rss_mb": None, "rc": runs[-1]["rc"], "runs": runs}
    return {"wall_s": statistics.median(r["wall_s"] for r in ok),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in ok), "rc": 0, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-7b-2layers", choices=list(SHAPES))
    p.add_argument("--extract-shape", choices=list(SHAPES),
                   help="shape for the extraction rows (default: --shape with 1 layer, e.g. llama-7b-1layer: "
                        "the same matrices; mergekit-extract-lora takes about 15 min on llama-7b-2layers here)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1, help="runs of each merge row (median reported)")
    p.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "vs_mergekit",
                   help="folder for the outputs (removed at the end unless --keep)")
    p.add_argument("--cache", type=Path, help="family folder (default: the synthetic cache)")
    p.add_argument("--keep", action="store_true", help="keep the outputs")
    p.add_argument("--quick", action="store_true", help="llama-tiny, no installing: a CI smoke run")
    p.add_argument("--mergekit-extract-timeout", type=float, default=1800)
    p.add_argument("--no-extract", action="store_true",
                   help="skip the extraction rows (the gene for apply is still made, untimed)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.shape = args.extract_shape = "llama-tiny"
    if not args.extract_shape:  # mergekit's full SVDs: one layer of the same matrices is enough
        one_layer = args.shape.replace("-2layers", "-1layer")
        args.extract_shape = one_layer if one_layer in SHAPES else args.shape
    dtype = torch.bfloat16
    t_start = time.perf_counter()

    have_mk, mk_note = ensure_mergekit(install=not args.quick)
    notes = [mk_note] if mk_note else []
    if args.quick:
        notes.append("--quick: llama-tiny timings are dominated by process start-up; the targets are "
                     "meant for the full shapes")
    notes.append("ours run through the safegene CLI")

    shape = SHAPES[args.shape]
    print(f"family {args.shape} ({shape.nbytes(dtype) / 1e9:.2f} GB per checkpoint, bf16) ...", flush=True)
    t0 = time.perf_counter()
    family = write_family(args.cache or default_root(args.shape, dtype, args.seed), args.shape, dtype=dtype,
                          seed=args.seed, progress=True)
    gen_s = time.perf_counter() - t0
    if args.extract_shape != args.shape:
        ex_family = write_family(default_root(args.extract_shape, dtype, args.seed), args.extract_shape,
                                 dtype=dtype, seed=args.seed, members=("aligned", "degraded"), progress=True)
        notes.append(f"extraction rows ran on {args.extract_shape} (same matrix shapes as {args.shape}, fewer "
                     f"layers): mergekit-extract-lora's full SVDs take too long on the full shape")
    else:
        ex_family = family
    nbytes = shape.nbytes(dtype)

    work = args.work
    rm(work)
    work.mkdir(parents=True)
    logs = work / "logs"
    logs.mkdir()
    py = sys.executable
    exe = str(Path(py).parent / "safegene")
    T, A, D = (str(family[k]) for k in ("target", "aligned", "degraded"))
    gene = work / "gene"

    def cmd_extract(fam, out):
        return [exe, "extract", "--aligned", str(fam["aligned"]), "--degraded", str(fam["degraded"]),
                "--out", str(out), "--rank", str(args.rank), "--quiet"]

    def cmd_apply(out):
        return [exe, "apply", "--model", T, "--gene", str(gene), "--alpha", str(args.alpha), "--out",
                str(out), "--quiet"]

    def cmd_resta(out):
        return [exe, "resta", "--model", T, "--aligned", A, "--degraded", D, "--alpha", str(args.alpha),
                "--out", str(out), "--quiet"]

    mk_config = work / "task_arithmetic.yml"
    mk_config.write_text(textwrap.dedent(f"""\
        merge_method: task_arithmetic
        base_model: {D}
        models:
          - model: {T}
            parameters: {{weight: 1.0}}
          - model: {A}
            parameters: {{weight: {args.alpha}}}
        parameters:
          normalize: false
        dtype: bfloat16
        """))
    # --no-copy-tokenizer: the generated checkpoints have no tokenizer (mergekit's default
    # --copy-tokenizer fails without one). Everything else is mergekit's default: safetensors
    # inputs are loaded lazily per tensor (--lazy-unpickle only concerns pickled .bin files),
    # --out-shard-size 5B parameters (one shard here, as ours), CPU, torch's default threads.
    mk_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def cmd_mk_merge(out):
        return [str(mergekit_bin("mergekit-yaml")), str(mk_config), str(out), "--no-copy-tokenizer", "--quiet"]

    def cmd_mk_extract(fam, out):
        # Same modules as ours: the 2-D projections inside the blocks. Without -e / --skip-
        # undecomposable mergekit would also copy embed_tokens, lm_head and the norms at full rank.
        return [str(mergekit_bin("mergekit-extract-lora")), "--model", str(fam["aligned"]), "--base-model",
                str(fam["degraded"]), "--out-path", str(out), "--max-rank", str(args.rank),
                "-e", "embed_tokens|lm_head", "--skip-undecomposable", "--quiet"]

    rows: dict[str, list[dict]] = {k: [] for k in ("ours_extract", "ours_apply", "ours_resta", "copy_floor",
                                                   "copy_floor_read3",
                                                   "mergekit_task_arithmetic", "mergekit_extract_lora",
                                                   "ours_startup", "mergekit_startup")}
    commands: dict[str, str] = {}
    extras: dict = {}

    def measure(key, cmd, inputs, out, env=None, timeout=None):
        if out is not None:
            rm(out)
        warm(*inputs)
        os.sync()  # no dirty pages of the row before (mergekit does not fsync) to write back in this one
        commands[key] = shlex.join(cmd)
        r = run_measured(cmd, logs / f"{key}-{len(rows[key])}.log", env=env, timeout=timeout)
        rows[key].append(r)
        gbs = f"{nbytes / r['wall_s'] / 1e9:6.2f} GB/s" if key not in ("ours_extract", "mergekit_extract_lora") else ""
        print(f"  {key:<26} {r['wall_s']:8.2f} s  {r['peak_rss_mb']:8.0f} MB  {gbs}"
              + ("" if r["rc"] == 0 else f"  FAILED rc {r['rc']}"), flush=True)
        return r

    # --- extraction (also makes the gene the apply rows use)
    ex_in = (ex_family["aligned"], ex_family["degraded"])
    ex_gene = gene if ex_family is family else work / "gene-extract-shape"
    if args.no_extract:
        notes.append("--no-extract: no extraction rows")
    else:
        print(f"extract, rank {args.rank}, on {args.extract_shape}:", flush=True)
        measure("ours_extract", cmd_extract(ex_family, ex_gene), ex_in, ex_gene)
    if ex_family is not family or args.no_extract:
        rm(gene)
        subprocess.run(cmd_extract(family, gene), check=True, capture_output=True)
    mk_lora = work / "mergekit-lora"
    if have_mk and not args.no_extract:
        measure("mergekit_extract_lora", cmd_mk_extract(ex_family, mk_lora), ex_in, mk_lora, env=mk_env,
                timeout=args.mergekit_extract_timeout)

    # --- merges
    print(f"merge rows on {args.shape}, alpha {args.alpha}, {args.repeat} run(s) each:", flush=True)
    out_apply, out_resta, out_copy, out_mk = (work / n for n in ("apply", "resta", "copy", "mergekit-merge"))
    target_files = [str(f) for f in shard_files(T)]
    ad_files = [str(f) for f in shard_files(A) + shard_files(D)]
    for round_ in range(args.repeat):
        last = round_ == args.repeat - 1
        # process start-up alone (interpreter, torch and the tool's imports, argument parsing)
        measure("ours_startup", [exe, "--help"], (), None)
        if have_mk:
            measure("mergekit_startup", [str(mergekit_bin("mergekit-yaml")), "--help"], (), None, env=mk_env)
        measure("copy_floor", [py, "-S", "-c", COPY_FLOOR, str(out_copy), str(len(target_files)), *target_files],
                (family["target"],), out_copy)
        rm(out_copy)
        r = measure("ours_apply", cmd_apply(out_apply), (family["target"], gene), out_apply)
        if last and r["rc"] == 0:
            extras["apply_check"] = check_apply(family, gene, out_apply, args.alpha, sample_modules(shape)[1])
        rm(out_apply)
        measure("copy_floor_read3", [py, "-S", "-c", COPY_FLOOR, str(out_copy), str(len(target_files)),
                                     *target_files, *ad_files],
                (family["target"], family["aligned"], family["degraded"]), out_copy)
        rm(out_copy)
        measure("ours_resta", cmd_resta(out_resta), (family["target"], family["aligned"], family["degraded"]),
                out_resta)
        if not last:
            rm(out_resta)
        if have_mk:
            r = measure("mergekit_task_arithmetic", cmd_mk_merge(out_mk),
                        (family["target"], family["aligned"], family["degraded"]), out_mk, env=mk_env)
            if r["rc"] == 0:  # mergekit does not fsync its output; ours and the copy floor do
                r["fsync_after_s"] = round(fsync_tree(out_mk), 3)
            # (removed by the next mergekit row, as before: not freed right before the copy floor)
    commands["copy_floor"] = f"{shlex.quote(py)} -S -c <safegene_fast.experiments.bench.COPY_FLOOR> OUT {T}/*.safetensors"
    commands["copy_floor_read3"] = (f"{shlex.quote(py)} -S -c <safegene_fast.experiments.bench.COPY_FLOOR> OUT {T}/*.safetensors "
                                    f"{A}/*.safetensors {D}/*.safetensors  (reads A and D, then copies T)")

    # --- correctness checks
    print("checking outputs ...", flush=True)
    t0 = time.perf_counter()
    resta_outputs = {}
    if rows["ours_resta"] and rows["ours_resta"][-1]["rc"] == 0:
        resta_outputs["ours_resta"] = out_resta
    if have_mk and rows["mergekit_task_arithmetic"][-1]["rc"] == 0:
        resta_outputs["mergekit"] = out_mk
    if resta_outputs:
        extras["resta_agreement"] = compare_resta(family, args.alpha, resta_outputs)
    adapters = {"ours": ex_gene} if rows["ours_extract"] and rows["ours_extract"][-1]["rc"] == 0 else {}
    if have_mk and rows["mergekit_extract_lora"] and rows["mergekit_extract_lora"][-1]["rc"] == 0:
        adapters["mergekit"] = mk_lora
    if adapters:
        extras["extract_errors"] = extraction_errors(ex_family, args.rank, sample_modules(SHAPES[args.extract_shape]),
                                                     adapters)
    check_s = time.perf_counter() - t0
    notes.append("targets are judged on wall time of the whole process; 'net' subtracts the median "
                 "start-up row of the same tool (its --help: interpreter, torch and its imports)")
    notes.append("ours and the copy floor fsync their output before exiting; mergekit does not (its "
                 "rows' fsync_after_s is the time an fsync of its output took right after it exited)")
    notes.append("mergekit task_arithmetic with dtype bfloat16 computes in bfloat16 (each intermediate "
                 "rounded), ours in float32 rounded once: see checks.resta_agreement")

    # --- summary
    summary = {k: median_row(v) for k, v in rows.items() if v}
    startup = {k: (summary.get(f"{k.split('_')[0]}_startup") or {}).get("wall_s") or 0.0 for k in summary}
    for k in summary:  # net of start-up: the streaming work alone (the copy floor has ~none)
        if summary[k]["wall_s"] and not k.endswith("_startup"):
            summary[k]["net_s"] = max(1e-3, summary[k]["wall_s"] - (0.0 if k == "copy_floor" else startup[k]))
    for k in ("ours_apply", "ours_resta", "copy_floor", "copy_floor_read3", "mergekit_task_arithmetic"):
        if k in summary and summary[k]["wall_s"]:
            summary[k]["gb_per_s"] = nbytes / summary[k]["wall_s"] / 1e9
            summary[k]["net_gb_per_s"] = nbytes / summary[k]["net_s"] / 1e9
    ratios = {}

    def ratio(a, b, field="wall_s", invert=False):
        if summary.get(a, {}).get(field) and summary.get(b, {}).get(field):
            x = summary[a][field] / summary[b][field]
            return 1 / x if invert else x
        return None

    ratios["apply_speedup_vs_mergekit"] = ratio("ours_apply", "mergekit_task_arithmetic", invert=True)
    ratios["resta_speedup_vs_mergekit"] = ratio("ours_resta", "mergekit_task_arithmetic", invert=True)
    ratios["apply_rss_vs_mergekit"] = ratio("ours_apply", "mergekit_task_arithmetic", "peak_rss_mb")
    ratios["resta_rss_vs_mergekit"] = ratio("ours_resta", "mergekit_task_arithmetic", "peak_rss_mb")
    ratios["apply_vs_copy_floor"] = ratio("ours_apply", "copy_floor", invert=True)
    ratios["resta_vs_copy_floor"] = ratio("ours_resta", "copy_floor", invert=True)
    ratios["resta_vs_copy_floor_read3"] = ratio("ours_resta", "copy_floor_read3", invert=True)
    ratios["extract_speedup_vs_mergekit"] = ratio("ours_extract", "mergekit_extract_lora", invert=True)
    for key, (a, b) in {"apply_speedup_vs_mergekit": ("ours_apply", "mergekit_task_arithmetic"),
                        "resta_speedup_vs_mergekit": ("ours_resta", "mergekit_task_arithmetic"),
                        "apply_vs_copy_floor": ("ours_apply", "copy_floor"),
                        "resta_vs_copy_floor": ("ours_resta", "copy_floor"),
                        "resta_vs_copy_floor_read3": ("ours_resta", "copy_floor_read3"),
                        "extract_speedup_vs_mergekit": ("ours_extract", "mergekit_extract_lora")}.items():
        ratios[key + "_net_of_startup"] = ratio(a, b, "net_s", invert=True)
    errs = extras.get("extract_errors", {})
    ours_err = [r["ours_error_ratio"] for r in errs.values() if r.get("ours_error_ratio") is not None]
    mk_err = [r["mergekit_error_ratio"] for r in errs.values() if r.get("mergekit_error_ratio") is not None]
    ratios["extract_error_ratio_max"] = max(ours_err) if ours_err else None
    ratios["mergekit_extract_error_ratio_max"] = max(mk_err) if mk_err else None
    targets = {}
    for key, (label, op, bound) in TARGETS.items():
        v = ratios.get(key)
        met = None if v is None else (v >= bound if op == ">=" else v <= bound)
        targets[key] = {"label": label, "value": v, "target": f"{op} {bound}", "met": met}

    # --- print
    print()
    print(f"{args.shape}: {nbytes / 1e9:.2f} GB per checkpoint (bf16); alpha {args.alpha}; rank {args.rank}; "
          f"{os.cpu_count()} CPUs; median of {args.repeat} run(s)")
    print(f"{'row':<28}{'seconds':>9}{'GB/s':>8}{'peak RSS MB':>13}{'vs copy':>9}"
          f"{'net s':>9}{'net GB/s':>10}{'net vs copy':>13}")
    for k in ("copy_floor", "copy_floor_read3", "ours_apply", "ours_resta", "mergekit_task_arithmetic", "ours_extract",
              "mergekit_extract_lora", "ours_startup", "mergekit_startup"):
        if k not in summary or summary[k]["wall_s"] is None:
            if k in summary:
                print(f"{k:<28}{'failed':>9}")
            continue
        s = summary[k]
        gbs = f"{s['gb_per_s']:8.2f}" if "gb_per_s" in s else f"{'':>8}"
        vs = ratio(k, "copy_floor", invert=True) if "gb_per_s" in s else None
        line = f"{k:<28}{s['wall_s']:9.2f}{gbs}{s['peak_rss_mb']:13.0f}{'' if vs is None else f'{vs:9.2f}':>9}"
        if "net_s" in s:
            line += f"{s['net_s']:9.2f}"
            if "net_gb_per_s" in s:
                line += f"{s['net_gb_per_s']:10.2f}{ratio(k, 'copy_floor', 'net_s', invert=True):13.2f}"
        print(line)
    if errs:
        print(f"\nextraction error / optimal rank-{args.rank} error ({args.extract_shape}; optimal from float64 SVD):")
        for m, r in errs.items():
            mk = r.get("mergekit_error_ratio")
            print(f"  {m:<36} {str(tuple(r['shape'])):<14} ours {r.get('ours_error_ratio', float('nan')):.4f}"
                  + (f"  mergekit {mk:.4f}" if mk is not None else "")
                  + f"  (optimal = {r['relative_optimal_error']:.3f} of ||delta||)")
    ra = extras.get("resta_agreement")
    if ra:
        print("\nT + alpha (A - D) against float64 exact:",
              ", ".join(f"{t} max {v['max_ulp_err_vs_exact']:.2f} ulp" for t, v in ra["vs_exact"].items()))
        pair = ra.get("ours_resta_vs_mergekit")
        if pair:
            print(f"ours resta vs mergekit: max |diff| {pair['max_abs_diff']:.3g}, "
                  f"{pair['fraction_differing'] * 100:.3f}% of elements differ")
    if "apply_check" in extras:
        c = extras["apply_check"]
        print(f"ours apply vs float64 T + alpha B A ({c['module']}): max {c['max_ulp_err']:.2f} ulp")
    print("\ntargets:")
    for key, t in targets.items():
        v = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        met = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        net = ratios.get(key + "_net_of_startup")
        net = "" if net is None else f"  [net of start-up: {net:.3f}]"
        print(f"  {t['label']:<56} {v:>8}  (target {t['target']}): {met}{net}")
    for n in notes:
        print(f"note: {n}")

    if args.json:
        result = {
            "benchmark": "bench/bench_vs_mergekit.py",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv[1:],
            "machine": {"cpu_count": os.cpu_count(), "cpu": _cpu_model(), "torch_threads": torch.get_num_threads(),
                        "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
                        "platform": platform.platform()},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "safegene_fast": safegene_fast.__version__, "git_commit": _git_commit(),
                         "mergekit_venv": mergekit_versions() if have_mk else None},
            "settings": {"shape": args.shape, "shape_dims": dataclasses.asdict(shape),
                         "extract_shape": args.extract_shape, "dtype": "bfloat16", "rank": args.rank,
                         "alpha": args.alpha, "seed": args.seed, "repeat": args.repeat,
                         "checkpoint_bytes": nbytes, "full_model_bytes": shape.full_nbytes(dtype),
                         "interface": "cli"},
            "commands": commands, "mergekit_config": mk_config.read_text(),
            "rows": summary, "ratios": ratios, "targets": targets, "checks": extras, "notes": notes,
            "family_generation_s": round(gen_s, 2), "checks_s": round(check_s, 2),
            "total_s": round(time.perf_counter() - t_start, 1),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.json, json.dumps(result, indent=2, default=str) + "\n")
        print(f"results written to {args.json}")
    if not args.keep:
        rm(work)
    else:
        print(f"outputs kept in {work}")
    failed = any(s["rc"] != 0 for s in summary.values())
    return 1 if failed else 0


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
