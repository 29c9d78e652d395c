"""Side-by-side table: the fused kernels against plain torch and the copy floor, and rsvd against
full SVD and torch.svd_lowrank. All ratios come from one run on this machine.

    .venv/bin/python bench/bench_table.py [--quick] [--json results.json]

GB/s counts the bytes each op must move at least (inputs read once, outputs written once); the
copy floor moves the same number of bytes with torch's copy_. Error ratios are the Frobenius
error of the rank-r approximation over the optimal rank-r error (full SVD, Eckart-Young).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

import safegene_fast as sg
from safegene_fast.io import write_json

TARGETS = {
    "merge_dense_ / copy floor": 0.7,
    "merge_dense_ / unfused torch": 3.0,
    "rsvd speed-up over full SVD": 20.0,
    "rsvd error ratio (max)": 1.01,
}


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rand(*shape, dtype=torch.bfloat16, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def copy_floor(nbytes: int, repeats: int) -> float:
    """Seconds for torch to copy nbytes/2 bytes (read + write = nbytes moved)."""
    half = nbytes // 2
    src, dst = torch.ones(half, dtype=torch.uint8), torch.empty(half, dtype=torch.uint8)
    return timed(lambda: dst.copy_(src), repeats)


def merge_rows(rows: int, cols: int, repeats: int) -> list[dict]:
    w, d = rand(rows, cols), rand(rows, cols, seed=1)
    results = []

    def row(op, shape, moved, ours, peer_name, peer):
        t_ours, t_peer = timed(ours, repeats), timed(peer, repeats)
        t_copy = copy_floor(moved, repeats)
        results.append({
            "op": op, "shape": shape, "bytes": moved,
            "ours_gbps": moved / t_ours / 1e9, "peer": peer_name, "peer_gbps": moved / t_peer / 1e9,
            "copy_gbps": moved / t_copy / 1e9,
            "vs_copy": t_copy / t_ours, "vs_peer": t_peer / t_ours,
        })

    shape = f"{rows}x{cols} bf16"
    nbytes = w.numel() * w.element_size()
    row("merge_dense_", shape, 3 * nbytes, lambda: sg.merge_dense_(w, d, 1e-3),
        "unfused torch", lambda: w.copy_((w.float() + 1e-3 * d.float()).to(w.dtype)))
    row("merge_dense_", shape, 3 * nbytes, lambda: sg.merge_dense_(w, d, 1e-3),
        "torch add_ (fused, not bit-exact)", lambda: w.add_(d, alpha=1e-3))
    out = torch.empty(rows, cols)
    row("delta", shape, 2 * nbytes + out.numel() * 4, lambda: sg.delta_out(w, [d], out),
        "unfused torch", lambda: torch.sub(w.float(), d.float(), out=out))
    for rank in (16, 64):
        B, A = rand(rows, rank, seed=2) * 0.01, rand(rank, cols, seed=3)
        row(f"merge_lowrank_ r={rank}", shape, 2 * nbytes, lambda: sg.merge_lowrank_(w, B, A, 1e-3),
            "unfused torch",
            lambda: w.copy_((w.float() + 1e-3 * (B.float() @ A.float())).to(w.dtype)))
    return results


def decaying_matrix(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A weight-delta-like matrix: power-law spectrum over 512 directions plus a noise floor."""
    g = torch.Generator().manual_seed(seed)
    k = 512
    left = torch.randn(rows, k, generator=g) / rows**0.5
    right = torch.randn(k, cols, generator=g) / cols**0.5
    spectrum = (1.0 + torch.arange(k, dtype=torch.float32)) ** -1.0
    noise = torch.randn(rows, cols, generator=g) * (0.002 / max(rows, cols) ** 0.5)
    return (left * spectrum) @ right + noise


def rsvd_rows(rows: int, cols: int, rank: int, repeats: int) -> dict:
    a = decaying_matrix(rows, cols)
    start = time.perf_counter()
    U_f, S_f, Vh_f = torch.linalg.svd(a, full_matrices=False)
    t_full = time.perf_counter() - start
    optimal = float(S_f[rank:].double().square().sum().sqrt())

    def error(U, S, V):
        return float(torch.linalg.matrix_norm((a - (U * S) @ V.T).double())) / optimal

    t_ours = timed(lambda: sg.rsvd(a, rank=rank), repeats)
    t_peer = timed(lambda: torch.svd_lowrank(a, q=rank + 8, niter=2), repeats)
    U, S, V = sg.rsvd(a, rank=rank)
    Up, Sp, Vp = torch.svd_lowrank(a, q=rank + 8, niter=2)
    return {
        "shape": f"{rows}x{cols} fp32", "rank": rank,
        "full_svd_s": t_full, "rsvd_s": t_ours, "svd_lowrank_s": t_peer,
        "speedup_vs_full": t_full / t_ours, "speedup_vs_svd_lowrank": t_peer / t_ours,
        "rsvd_error_ratio": error(U, S, V),
        "svd_lowrank_error_ratio": error(Up[:, :rank], Sp[:rank], Vp[:, :rank]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller matrices, fewer repeats (a smoke run)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    args = parser.parse_args()

    repeats = 3 if args.quick else 7
    merge_shape = (1024, 3584) if args.quick else (4096, 14336)
    svd_shapes = [(512, 1792)] if args.quick else [(4096, 4096), (4096, 14336)]

    info = sg.build_info()
    print(f"safegene_fast {sg.__version__}, torch {torch.__version__}, CPU kernels {info['cpu_isa']}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    merges = merge_rows(*merge_shape, repeats)
    print(f"\n{'op':<20} {'shape':<16} {'peer':<34} {'ours GB/s':>9} {'peer GB/s':>9} "
          f"{'copy GB/s':>9} {'vs copy':>8} {'vs peer':>8}")
    for r in merges:
        print(f"{r['op']:<20} {r['shape']:<16} {r['peer']:<34} {r['ours_gbps']:9.1f} "
              f"{r['peer_gbps']:9.1f} {r['copy_gbps']:9.1f} {r['vs_copy']:8.2f} {r['vs_peer']:7.1f}x")
    print("(vs copy: ours over torch copy_ of the same number of bytes; in-place ops can beat it,\n"
          " since a copy also pays the write-allocate reads of its destination)")

    svds = [rsvd_rows(rows, cols, 16, repeats) for rows, cols in svd_shapes]
    print(f"\n{'rsvd rank 16':<16} {'full SVD s':>10} {'rsvd s':>8} {'svd_lowrank s':>13} "
          f"{'vs full':>8} {'err/opt':>8} {'svd_lowrank err/opt':>20}")
    for r in svds:
        print(f"{r['shape']:<16} {r['full_svd_s']:10.2f} {r['rsvd_s']:8.3f} {r['svd_lowrank_s']:13.3f} "
              f"{r['speedup_vs_full']:7.0f}x {r['rsvd_error_ratio']:8.4f} {r['svd_lowrank_error_ratio']:20.4f}")

    dense = next(r for r in merges if r["op"] == "merge_dense_")
    checks = {
        "merge_dense_ / copy floor": (dense["vs_copy"], dense["vs_copy"] >= TARGETS["merge_dense_ / copy floor"]),
        "merge_dense_ / unfused torch": (dense["vs_peer"], dense["vs_peer"] >= TARGETS["merge_dense_ / unfused torch"]),
        "rsvd speed-up over full SVD": (min(r["speedup_vs_full"] for r in svds),
                                        all(r["speedup_vs_full"] >= TARGETS["rsvd speed-up over full SVD"] for r in svds)),
        "rsvd error ratio (max)": (max(r["rsvd_error_ratio"] for r in svds),
                                   all(r["rsvd_error_ratio"] <= TARGETS["rsvd error ratio (max)"] for r in svds)),
    }
    print("\ntarget                          measured  target  met")
    for name, (value, met) in checks.items():
        print(f"{name:<31} {value:8.2f} {TARGETS[name]:7.2f}  {'yes' if met else 'NO'}")

    if args.json:
        write_json(args.json, {
            "command": " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "safegene_fast": sg.__version__, "build": info,
            "threads": torch.get_num_threads(), "quick": args.quick,
            "merge": merges, "rsvd": svds, "targets": {k: {"measured": v, "met": m} for k, (v, m) in checks.items()},
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
