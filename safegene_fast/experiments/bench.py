"""``safegene bench``: extract / apply / resta throughput and peak RSS next to the copy floor.

Each stage runs as its own ``safegene ... --json`` process, so its peak RSS (from ``wait4``) is
its own and its time is the command's own measurement (without interpreter start-up). The copy
floor is a plain streaming copy of the target's files (16 MiB reads and writes, fsync): the
time any streaming merge of the same bytes must at least pay. All stages read the same files, so
they see the same page cache. Stages run in rounds (``--repeat``, default 3), each after an
``os.sync()`` and right after a copy floor pass of its own; the median time is reported, and
"vs copy" is the median of the paired ratios: streaming writes on a shared VM disk are noisy.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from safegene_fast.gene import layer_of
from safegene_fast.lora import open_checkpoint

logger = logging.getLogger(__name__)

# A child's ru_maxrss starts at its parent's peak (Linux carries it across fork/vfork + exec), so
# a command started straight from a big process (pytest, a benchmark that generated models)
# would report at least that process's peak. Commands are started by this small launcher
# instead, which reports its own child's wall time and wait4 rusage (and kills it at a timeout).
LAUNCHER = """
import json, os, subprocess, sys, time
report, timeout, cmd = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
start = time.perf_counter()
proc = subprocess.Popen(cmd)
timed_out = False
while True:
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if pid:
        break
    if timeout > 0 and time.perf_counter() - start > timeout:
        timed_out = True
        proc.kill()
        pid, status, usage = os.wait4(proc.pid, 0)
        break
    time.sleep(0.005)
with open(report, "w") as f:
    json.dump({"wall_s": time.perf_counter() - start, "maxrss_kb": usage.ru_maxrss, "user_s": usage.ru_utime,
               "sys_s": usage.ru_stime, "rc": os.waitstatus_to_exitcode(status), "timed_out": timed_out}, f)
"""

# The copy floor as a program of its own (no torch: its wall time is the copy's): copies the
# first N of FILES into DST with 16 MiB reads and writes, fsyncing each file and the folder, and
# reads the rest of FILES the same way (resta's floor: it also reads A and D).
COPY_FLOOR = """
import os, sys
dst, n, files = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
os.makedirs(dst)
buf = bytearray(16 << 20)
view = memoryview(buf)
for src in files[n:]:
    with open(src, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
for src in files[:n]:
    with open(src, "rb", buffering=0) as f, open(os.path.join(dst, os.path.basename(src)), "wb", buffering=0) as g:
        while got := f.readinto(buf):
            g.write(view[:got])
        os.fsync(g.fileno())
fd = os.open(dst, os.O_RDONLY)
os.fsync(fd)
os.close(fd)
"""


def measure_command(cmd: list[str], stdout, stderr, env: dict | None = None, timeout: float | None = None) -> dict:
    """Runs ``cmd`` through the launcher: rc, wall_s, peak_rss_mb, user_s, sys_s, timed_out."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "rusage.json"
        subprocess.run([sys.executable, "-S", "-c", LAUNCHER, str(report), str(timeout or 0), *cmd],
                       stdout=stdout, stderr=stderr, env=env)
        try:
            r = json.loads(report.read_text())
        except (OSError, ValueError):  # the launcher itself failed
            return {"rc": -1, "wall_s": 0.0, "peak_rss_mb": 0.0, "user_s": 0.0, "sys_s": 0.0, "timed_out": False}
    return {"rc": r["rc"], "wall_s": round(r["wall_s"], 4), "peak_rss_mb": round(r["maxrss_kb"] / 1024, 1),
            "user_s": round(r["user_s"], 2), "sys_s": round(r["sys_s"], 2), "timed_out": r["timed_out"]}


def run_child(cmd: list[str]) -> tuple[int, str, str, float]:
    """Runs ``cmd``; returns its exit code, stdout, stderr and its own peak RSS in MB."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        r = measure_command(cmd, out, err)
        out.seek(0), err.seek(0)
        return r["rc"], out.read(), err.read(), r["peak_rss_mb"]


def run_stage(args: list[str]) -> dict:
    """Runs ``safegene <args> --json --quiet`` in a child; returns its summary with the child's
    peak RSS."""
    code, stdout, stderr, rss = run_child([sys.executable, "-m", "safegene_fast", *args, "--json", "--quiet"])
    if code:
        last = (stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"bench stage 'safegene {args[0]}' failed: {last}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_mb"] = round(rss, 1)
    result["command_line"] = " ".join(["safegene", *args])
    return result


def import_floor_rss_mb() -> float:
    """Peak RSS of a process that only imports safegene_fast (and torch): the part of every
    stage's RSS that is not streaming."""
    return run_child([sys.executable, "-c", "import safegene_fast"])[3]


def shard_files(model: str | os.PathLike) -> list[Path]:
    """The files a pass over ``model`` reads (a LoRA adapter's: its base's)."""
    with open_checkpoint(model) as ckpt:
        return sorted({info.file for info in ckpt.tensors.values()})


def copy_floor(model: str | os.PathLike, out: str | os.PathLike, also_read=()) -> dict:
    """Copies the checkpoint's safetensors files (``COPY_FLOOR``), fsynced, after reading the
    files of the checkpoints ``also_read``; timed as a process. Bytes are the copied ones."""
    files, extra = shard_files(model), [f for other in also_read for f in shard_files(other)]
    shutil.rmtree(out, ignore_errors=True)
    r = measure_command([sys.executable, "-S", "-c", COPY_FLOOR, str(out), str(len(files)),
                         *map(str, files + extra)], None, None)
    if r["rc"]:
        raise RuntimeError(f"bench: the copy floor failed (exit status {r['rc']}).")
    nbytes = sum(f.stat().st_size for f in files)
    return {"command": "copy" if not also_read else f"copy+{len(also_read)} reads", "seconds": r["wall_s"],
            "bytes": nbytes, "gb_per_s": round(nbytes / r["wall_s"] / 1e9, 4), "peak_rss_mb": r["peak_rss_mb"]}


def projection_scale(model: str | os.PathLike, full_layers: int) -> tuple[float, float]:
    """Factors from this checkpoint's time to the full model's, for a pass over every tensor and
    for a pass over the layers only (extract): layer bytes scale with the layer count."""
    with open_checkpoint(model) as ckpt:
        layers = {layer_of(n) for n in ckpt.tensors} - {None}
        layer_bytes = sum(i.nbytes for n, i in ckpt.tensors.items() if layer_of(n) is not None)
        other = sum(i.nbytes for n, i in ckpt.tensors.items() if layer_of(n) is None)
    per_layer = full_layers / max(len(layers), 1)
    return (other + layer_bytes * per_layer) / (other + layer_bytes), per_layer


def median_run(runs: list[dict]) -> dict:
    """The run with the median time, with the largest peak RSS of all runs."""
    chosen = dict(sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2])
    rss = [r["peak_rss_mb"] for r in runs if r["peak_rss_mb"] is not None]
    chosen["peak_rss_mb"] = max(rss) if rss else None
    chosen["all_seconds"] = [r["seconds"] for r in runs]
    return chosen


def run_bench(*, model=None, gene=None, aligned=None, degraded=None, synthetic=None, work=None,
              rank: int = 16, alpha: float = 1.0, device: str = "cpu", keep: bool = False,
              repeat: int = 3, lora_rank: int | None = None, progress: bool = True) -> dict:
    """Times the stages; see the module docstring. Returns the results as a dict. ``lora_rank``:
    also time apply on a task fine-tune given as a LoRA adapter of that rank on ``model``
    (stage ``apply-lora``, against the copy floor of ``model``, the bytes it streams)."""

    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": device, "threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "rank": rank, "alpha": alpha}
    full_layers = None
    if synthetic is not None:
        from safegene_fast.models.synthetic import (
            default_root,
            resolve_shape,
            write_family,
        )
        name, shape = resolve_shape(synthetic)
        logger.info(f"generating (or reusing) the {name} family in {default_root(name)}")
        paths = write_family(default_root(name), name, progress=progress)
        model, aligned, degraded = paths["target"], paths["aligned"], paths["degraded"]
        full_layers = shape.full_layers
        result["synthetic"] = name
    result.update(model=str(model), aligned=aligned and str(aligned), degraded=degraded and str(degraded))

    # a fresh folder of its own (inside --work if given): only what the benchmark made is removed
    if work:
        Path(work).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="safegene-bench-", dir=work))
    if keep:
        result["work"] = str(work)
    common = ["--device", device]
    gene_out = work / "gene"
    stage_runs = {"copy": lambda: copy_floor(model, work / "copy")}
    if aligned and degraded:
        stage_runs["extract"] = lambda: run_stage([
            "extract", "--aligned", str(aligned), "--degraded", str(degraded), "--out", str(gene_out),
            "--rank", str(rank), "--overwrite", *common])
    stage_runs["apply"] = lambda: run_stage([
        "apply", "--model", str(model), "--gene", str(gene or gene_out), "--alpha", str(alpha),
        "--out", str(work / "apply"), "--overwrite", *common])
    if lora_rank is not None:
        from safegene_fast.models.synthetic import write_lora_adapter
        adapter = write_lora_adapter(work / "task-lora", model, lora_rank)
        result["lora_rank"] = lora_rank
        stage_runs["apply-lora"] = lambda: run_stage([
            "apply", "--model", str(adapter), "--gene", str(gene or gene_out), "--alpha", str(alpha),
            "--out", str(work / "apply-lora"), "--overwrite", *common])
    if aligned and degraded:
        # resta reads three checkpoints for each one it writes: its floor does the same
        stage_runs["copy3"] = lambda: copy_floor(model, work / "copy3", also_read=(aligned, degraded))
        stage_runs["resta"] = lambda: run_stage([
            "resta", "--model", str(model), "--aligned", str(aligned), "--degraded", str(degraded),
            "--alpha", str(alpha), "--out", str(work / "resta"), "--overwrite", *common])
    runs = {name: [] for name in stage_runs}
    ratios = {name: [] for name in stage_runs if not name.startswith("copy")}
    try:
        for round_ in range(repeat):  # rounds interleave the stages, so drift hits them alike
            for name in stage_runs:
                if name.startswith("copy"):
                    continue
                # Each stage is paired with a copy floor pass just before it, in the same state of
                # page cache and free memory (on this VM, writing into memory the host took back
                # costs several times more than into memory just freed by the pass before).
                floor = "copy3" if name == "resta" else "copy"
                for stage in (floor, name):
                    logger.info(f"{stage} (round {round_ + 1} of {repeat})")
                    os.sync()  # no dirty pages of the pass before to write back in this one
                    run = stage_runs[stage]()
                    runs[stage].append(run if stage.startswith("copy") else {**run, "command": stage})
                    if stage != "extract" and not (keep and round_ == repeat - 1 and stage != floor):
                        shutil.rmtree(work / stage)
                ratios[name].append(runs[name][-1]["gb_per_s"] / runs[floor][-1]["gb_per_s"])
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    stages = [median_run(r) for r in runs.values()]
    result["repeat"] = repeat
    for s in stages:  # the median of the paired ratios
        s["vs_copy"] = round(sorted(ratios[s["command"]])[repeat // 2], 3) if s["command"] in ratios else 1.0
    if full_layers is not None:
        whole, per_layer = projection_scale(model, full_layers)
        result["full_layers"] = full_layers
        for s in stages:
            s["projected_full_s"] = round(s["seconds"] * (per_layer if s["command"] == "extract" else whole), 1)
    result["import_floor_rss_mb"] = round(import_floor_rss_mb(), 1)
    result["stages"] = stages
    return result


def format_table(result: dict) -> str:
    """The results as an aligned text table."""
    projected = "full_layers" in result
    head = ["stage", "seconds", "GB", "GB/s", "vs copy", "peak RSS MB"] + (
        [f"projected s ({result['full_layers']} layers)"] if projected else [])
    rows = []
    for s in result["stages"]:
        row = [s["command"], f"{s['seconds']:.2f}", f"{s['bytes'] / 1e9:.2f}", f"{s['gb_per_s']:.2f}",
               f"{s['vs_copy']:.2f}", "-" if s["peak_rss_mb"] is None else f"{s['peak_rss_mb']:.0f}"]
        rows.append(row + ([f"{s['projected_full_s']:.0f}"] if projected else []))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    what = result.get("synthetic") or result["model"]
    notes = [f"{what} on {result['device']}, {result['threads']} threads, rank {result['rank']}, median of {result['repeat']}; "
             f"extract GB = aligned weights factored, others = the model's tensors; 'vs copy' = median ratio to "
             f"the floor pass run just before each stage (resta's floor also reads A and D); "
             f"a process that only imports safegene_fast peaks at {result['import_floor_rss_mb']:.0f} MB RSS."]
    return "\n".join(lines + notes)
