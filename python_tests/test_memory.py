"""Streaming keeps peak memory independent of model depth: 2 vs 8 layers of the same shapes.

Each pass runs as a ``safegene`` process (what users run), and its peak RSS comes from wait4.
"""

import sys

import pytest

from safegene_fast.experiments.bench import run_child
from safegene_fast.models.synthetic import LlamaShape, write_family

HIDDEN, INTER, KV = 1024, 2816, 4  # 8 heads of 128, 4 kv heads: 11.5 M parameters per layer
MIB = 2**20
LAYER_MIB = (2 * HIDDEN * HIDDEN + 2 * HIDDEN * HIDDEN * KV // 8 + 3 * HIDDEN * INTER) * 2 / MIB  # bf16


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("depth")
    fams = {n: write_family(root / f"l{n}", LlamaShape(HIDDEN, INTER, 8, KV, 2000, n, n), max_shard_size=40 * 10**6)
            for n in (2, 8)}
    for n, f in fams.items():
        peak_rss(["extract", "--aligned", f["aligned"], "--degraded", f["degraded"], "--out", root / f"gene{n}",
                  "--rank", "8"])
    return root, fams


def peak_rss(args) -> float:
    code, _, err, rss = run_child([sys.executable, "-m", "safegene_fast", *map(str, args), "--quiet"])
    assert code == 0, err
    return rss


@pytest.mark.parametrize("stage", ["extract", "apply", "resta"])
def test_peak_rss_does_not_grow_with_layers(families, tmp_path, stage):
    root, fams = families
    args = {
        "extract": lambda n, f: ["extract", "--aligned", f["aligned"], "--degraded", f["degraded"], "--rank", "8"],
        "apply": lambda n, f: ["apply", "--model", f["target"], "--gene", root / f"gene{n}", "--alpha", "0.5"],
        "resta": lambda n, f: ["resta", "--model", f["target"], "--aligned", f["aligned"], "--degraded",
                               f["degraded"], "--alpha", "0.5"],
    }[stage]
    peak = {n: peak_rss(args(n, f) + ["--out", tmp_path / f"out{n}"]) for n, f in fams.items()}
    extra = 6 * LAYER_MIB  # what 6 more layers would cost if anything were held per layer
    print(f"{stage}: peak RSS {peak[2]:.0f} MiB (2 layers) vs {peak[8]:.0f} MiB (8 layers); "
          f"6 layers are {extra:.0f} MiB")
    assert peak[8] <= peak[2] + 0.15 * extra, peak
