"""Fleet throughput: N targets protected serially (one `safegene apply` after another), by
`safegene batch` on the local process pool and on a local Ray with 1 and 2 workers, in one run.

Targets are the generated `llama-7b-2layers` target under N names (links to one folder: the
same bytes, read from the page cache after the first pass, so the runs compare the executors and
not the disk's read speed). Each configuration runs after `os.sync()`, its outputs are removed
after it. Reported: wall time, throughput (GB of targets processed per second), and the largest
peak RSS of any one worker process (sampled every 20 ms from /proc: the pool's workers, Ray's
task workers, or the serial `safegene apply` processes).

    .venv/bin/python bench/bench_fleet.py --targets 4 --json bench/results/fleet_llama-7b-2layers.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from safegene_fast.io import Checkpoint
from safegene_fast.models.synthetic import default_root, write_family
from safegene_fast.pipeline import extract

WORKER_MARKS = (b"ray::_ray_job", b"ray::IDLE", b"from multiprocessing.spawn", b"safegene_fast\x00apply")


class PeakWorkerRss:
    """Largest RSS of any one worker process seen while running (sampled from /proc)."""

    def __init__(self):
        self.peak_kib, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                try:
                    cmdline = (proc / "cmdline").read_bytes()
                    if any(mark in cmdline for mark in WORKER_MARKS):
                        for line in (proc / "status").read_text().splitlines():
                            if line.startswith("VmRSS:"):
                                self.peak_kib = max(self.peak_kib, int(line.split()[1]))
                except OSError:
                    pass
            self._stop.wait(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def serial(targets: list[Path], gene: Path, work: Path) -> None:
    for target in targets:
        subprocess.run([sys.executable, "-m", "safegene_fast", "apply", "--model", str(target), "--gene", str(gene),
                        "--alpha", "0.8", "--out", str(work / target.name), "--quiet"], check=True,
                       stdout=subprocess.DEVNULL)


def batch(recipe: Path, executor: str, workers: int) -> None:
    subprocess.run([sys.executable, "-m", "safegene_fast", "batch", str(recipe), "--executor", executor,
                    "--workers", str(workers), "--quiet"], check=True, stdout=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, default=4)
    parser.add_argument("--shape", default="llama-7b-2layers")
    parser.add_argument("--work", help="where outputs go (default: the system's temporary folder)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    family = write_family(default_root(args.shape), args.shape, progress=True)
    work = Path(tempfile.mkdtemp(prefix="safegene-fleet-", dir=args.work))
    try:
        inputs = work / "ft"
        inputs.mkdir()
        targets = []
        for i in range(args.targets):
            (inputs / f"ft-{i}").symlink_to(family["target"], target_is_directory=True)
            targets.append(inputs / f"ft-{i}")
        extract(family["aligned"], [family["degraded"]], rank=16).save(work / "gene")
        with Checkpoint(family["target"]) as ckpt:
            gb = args.targets * sum(i.nbytes for i in ckpt.tensors.values()) / 1e9
        recipe = work / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({"gene": str(work / "gene"), "alpha": 0.8, "out_dir": str(work / "out"),
                                          "targets": [{"model": str(t)} for t in targets]}))
        runs = [("serial apply", lambda: serial(targets, work / "gene", work / "out"))]
        for executor in ("local", "ray"):
            for workers in (1, 2):
                runs.append((f"batch {executor} x{workers}", lambda e=executor, w=workers: batch(recipe, e, w)))
        rows = []
        serial(targets[:1], work / "gene", work / "out")  # page cache warm for every configuration alike
        shutil.rmtree(work / "out")
        for name, run in runs:
            os.sync()
            with PeakWorkerRss() as rss:
                start = time.perf_counter()
                run()
                seconds = time.perf_counter() - start
            shutil.rmtree(work / "out")
            rows.append({"run": name, "seconds": round(seconds, 2), "gb_per_s": round(gb / seconds, 3),
                         "peak_worker_rss_mb": round(rss.peak_kib / 1024)})
            print(f"{name:16s} {seconds:7.2f} s  {gb / seconds:6.3f} GB/s  peak worker RSS {rss.peak_kib / 1024:6.0f} MB",
                  flush=True)
        result = {"shape": args.shape, "targets": args.targets, "gb": round(gb, 3), "cpu_count": os.cpu_count(),
                  "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
