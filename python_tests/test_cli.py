"""The ``safegene`` command: extract / apply / resta / bench end to end, summaries and errors."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import assert_bits_equal

import safegene_fast as sg
from safegene_fast.cli import main, parse_size
from safegene_fast.io import Checkpoint, Planned, ShardedWriter
from safegene_fast.models.synthetic import write_family


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("family"), "llama-tiny", max_shard_size=300_000)


@pytest.fixture(scope="module")
def gene(family, tmp_path_factory):
    out = tmp_path_factory.mktemp("genes") / "gene"
    assert main(["extract", "--aligned", str(family["aligned"]), "--degraded", str(family["degraded"]),
                 "--out", str(out), "--rank", "8", "--quiet"]) == 0
    return out


def run_json(capsys, argv):
    assert main(argv + ["--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def read_all(path):
    with Checkpoint(path) as c:
        return {n: c.read(n) for n in c.names}


def error_of(capsys, argv):
    """Runs a command that must fail; returns its one error line."""
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("safegene: error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_help_explains_every_command():
    from safegene_fast.cli import build_parser
    commands = build_parser()._subparsers._group_actions[0].choices  # every command there is
    assert {"extract", "apply", "resta", "bench", "eval", "select", "recalibrate", "protect", "batch", "demo",
            "study", "doctor"} <= set(commands)
    for command in commands:
        done = subprocess.run([sys.executable, "-m", "safegene_fast", command, "--help"],
                              capture_output=True, text=True)
        assert done.returncode == 0 and "usage: safegene " + command in done.stdout
    done = subprocess.run([sys.executable, "-m", "safegene_fast", "apply", "--help"], capture_output=True, text=True)
    for option in ("--coeffs", "--alpha", "--format", "--max-shard-size", "--device", "--overwrite", "--json"):
        assert option in done.stdout


def test_extract_cli_equals_api_and_reports(family, gene, capsys, tmp_path):
    summary = run_json(capsys, ["extract", "--aligned", str(family["aligned"]), "--degraded",
                                str(family["degraded"]), "--out", str(tmp_path / "g"), "--rank", "8"])
    assert summary["command"] == "extract" and summary["modules"] == 14
    assert summary["rank_min"] == summary["rank_max"] == 8 and 0 < summary["energy_min"] <= 1
    assert summary["bytes"] > 0 and summary["seconds"] > 0 and summary["peak_rss_mb"] > 0
    api = sg.extract(family["aligned"], [family["degraded"]], rank=8)
    loaded = sg.SafetyGene.load(tmp_path / "g")
    for name, m in api.modules.items():
        assert torch.equal(loaded.modules[name].A, m.A) and torch.equal(loaded.modules[name].B, m.B)


def test_energy_picks_ranks(family, capsys, tmp_path):
    summary = run_json(capsys, ["extract", "--aligned", str(family["aligned"]), "--degraded",
                                str(family["degraded"]), "--out", str(tmp_path / "g"), "--energy", "0.5",
                                "--max-rank", "6"])
    assert 1 <= summary["rank_min"] <= summary["rank_max"] <= 6


def test_apply_cli_per_layer_coeffs_equals_api(family, gene, capsys, tmp_path):
    coeffs = tmp_path / "coeffs.json"
    coeffs.write_text(json.dumps({"1": 0.75}))
    summary = run_json(capsys, ["apply", "--model", str(family["target"]), "--gene", str(gene),
                                "--coeffs", str(coeffs), "--out", str(tmp_path / "cli"),
                                "--max-shard-size", "200KB"])
    assert summary["coefficients"] == {"1": 0.75} and summary["format"] == "merged"
    sg.apply(family["target"], gene, tmp_path / "api", {"1": 0.75})
    cli, api, target = read_all(tmp_path / "cli"), read_all(tmp_path / "api"), read_all(family["target"])
    assert cli.keys() == api.keys()
    for name in cli:
        assert_bits_equal(cli[name], api[name])
        if ".layers.0." in name:  # layer 0 absent from coeffs.json: untouched
            assert_bits_equal(cli[name], target[name])
    assert len(list((tmp_path / "cli").glob("model-*-of-*.safetensors"))) > 1
    assert (tmp_path / "cli" / "config.json").read_bytes() == (family["target"] / "config.json").read_bytes()


def test_apply_peft_format_writes_adapter(family, gene, capsys, tmp_path):
    run_json(capsys, ["apply", "--model", str(family["target"]), "--gene", str(gene), "--alpha", "0.5",
                      "--format", "peft", "--out", str(tmp_path / "adapter")])
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and len(config["target_modules"]) == 14
    with pytest.raises(ValueError, match="adapter with coefficients folded in"):
        sg.SafetyGene.load(tmp_path / "adapter")
    folded = sg.SafetyGene.load(tmp_path / "adapter", allow_folded=True)
    plain = sg.SafetyGene.load(gene)
    for name, m in plain.modules.items():
        assert torch.equal(folded.modules[name].B, m.B * 0.5)
    line = error_of(capsys, ["apply", "--model", str(family["target"]), "--gene", str(tmp_path / "adapter"),
                             "--out", str(tmp_path / "twice")])
    assert "adapter with coefficients folded in" in line


def test_resta_cli_equals_api(family, capsys, tmp_path):
    args = ["--model", str(family["target"]), "--aligned", str(family["aligned"]),
            "--degraded", str(family["degraded"]), "--alpha", "0.3"]
    summary = run_json(capsys, ["resta", *args, "--out", str(tmp_path / "cli")])
    assert summary["alpha"] == 0.3
    sg.resta(family["target"], family["aligned"], family["degraded"], 0.3, tmp_path / "api")
    cli, api = read_all(tmp_path / "cli"), read_all(tmp_path / "api")
    for name in cli:
        assert_bits_equal(cli[name], api[name])


def test_progress_bar_on_stderr_unless_quiet(family, gene, capsys, tmp_path):
    assert main(["apply", "--model", str(family["target"]), "--gene", str(gene), "--out", str(tmp_path / "a")]) == 0
    captured = capsys.readouterr()
    assert "apply" in captured.err and "tensors" in captured.err and "wrote merged checkpoint" in captured.out
    assert main(["apply", "--model", str(family["target"]), "--gene", str(gene), "--out", str(tmp_path / "b"),
                 "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_existing_output_needs_overwrite(family, gene, capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    base = ["apply", "--model", str(family["target"]), "--gene", str(gene), "--out", str(out), "--quiet"]
    assert "already exists; pass --overwrite" in error_of(capsys, base)
    assert (out / "keep.txt").read_text() == "mine"
    assert "already exists" in error_of(capsys, ["extract", "--aligned", str(family["aligned"]), "--degraded",
                                                 str(family["degraded"]), "--out", str(out), "--quiet"])
    # a folder that holds no checkpoint is no earlier output: --overwrite does not delete it
    assert "exists and is not a checkpoint or adapter folder" in error_of(capsys, base + ["--overwrite"])
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    out.rmdir()
    assert main(base) == 0                      # now an earlier output is there
    (out / "stale.txt").write_text("from the run before")
    assert main(base + ["--overwrite"]) == 0    # which --overwrite replaces whole
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()


@pytest.mark.parametrize("content, problem", [
    ("{not json", "is not JSON"),
    ('{"0": "big"}', "must map layer indices or module names to finite numbers"),
    ("[1, 2]", "must map layer indices"),
])
def test_bad_coeffs_file(family, gene, capsys, tmp_path, content, problem):
    coeffs = tmp_path / "coeffs.json"
    coeffs.write_text(content)
    line = error_of(capsys, ["apply", "--model", str(family["target"]), "--gene", str(gene),
                             "--coeffs", str(coeffs), "--out", str(tmp_path / "out")])
    assert str(coeffs) in line and problem in line
    assert not (tmp_path / "out").exists()


def test_missing_inputs_name_the_path(family, gene, capsys, tmp_path):
    line = error_of(capsys, ["apply", "--model", str(tmp_path / "nope"), "--gene", str(gene),
                             "--out", str(tmp_path / "out")])
    assert f"{tmp_path / 'nope'}: no such file or folder." in line
    line = error_of(capsys, ["apply", "--model", str(family["target"]), "--gene", str(tmp_path / "nogene"),
                             "--out", str(tmp_path / "out")])
    assert "nogene: not a safety gene folder" in line
    line = error_of(capsys, ["resta", "--model", str(family["target"]), "--aligned", str(family["aligned"]),
                             "--degraded", str(tmp_path / "nope"), "--alpha", "1", "--out", str(tmp_path / "out")])
    assert "nope: no such file or folder." in line
    assert not any(p.name.startswith(("out", ".out")) for p in tmp_path.iterdir())


def test_usage_errors_exit_2(family, capsys):
    for argv in (["apply", "--model", "x", "--gene", "y", "--out", "z", "--alpha", "nan"],
                 ["apply", "--model", "x", "--gene", "y", "--out", "z", "--max-shard-size", "5 parsecs"],
                 ["extract", "--aligned", "x", "--degraded", "y", "--out", "z", "--rank", "0"],
                 ["extract", "--aligned", "x", "--degraded", "y", "--out", "z", "--rank", "4", "--energy", "0.5"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    capsys.readouterr()


def test_nonfinite_delta_error_or_allowed(family, capsys, tmp_path):
    poisoned, name = tmp_path / "poisoned", "model.layers.1.self_attn.v_proj.weight"
    tensors = read_all(family["degraded"])
    tensors[name] = tensors[name].clone()
    tensors[name][0, 5] = float("inf")
    with ShardedWriter(poisoned, [Planned(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]) as w:
        for n, t in tensors.items():
            w.write(n, t)
    args = ["extract", "--aligned", str(family["aligned"]), "--degraded", str(poisoned), "--out",
            str(tmp_path / "g"), "--quiet"]
    line = error_of(capsys, args)
    assert f"the delta of tensor '{name}' has 1 NaN or Inf values. Pass --allow-nonfinite" in line
    assert not (tmp_path / "g").exists()
    assert main(args + ["--allow-nonfinite", "--json"]) == 0
    captured = capsys.readouterr()
    assert f"safegene: warning: {poisoned}: zeroed 1 NaN or Inf values in the delta of tensor '{name}'" in captured.err
    assert json.loads(captured.out.splitlines()[-1])["nonfinite_zeroed"] == 1


def test_expected_error_in_a_real_process_has_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "safegene_fast", "resta", "--model", str(tmp_path / "t"),
                           "--aligned", "a", "--degraded", "d", "--alpha", "1", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"safegene: error: {tmp_path / 't'}: no such file or folder.\n"


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("1234") == 1234 and parse_size("1.5kb") == 1500


def test_bench_synthetic_runs_every_stage(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEGENE_CACHE", str(tmp_path / "cache"))
    assert main(["bench", "--synthetic", "llama-tiny", "--json", "--quiet", "--rank", "4", "--repeat", "2",
                 "--lora-rank", "8"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stages = {s["command"]: s for s in result["stages"]}
    assert list(stages) == ["copy", "extract", "apply", "apply-lora", "copy+2 reads", "resta"]
    assert stages["apply-lora"]["bytes"] == stages["apply"]["bytes"]  # it streams the base, as apply the model
    for s in stages.values():
        assert s["bytes"] > 0 and s["seconds"] > 0 and s["vs_copy"] > 0 and "projected_full_s" in s
    assert stages["apply"]["peak_rss_mb"] >= result["import_floor_rss_mb"] * 0.9
    assert stages["copy"]["bytes"] >= stages["apply"]["bytes"]  # the copy also moves headers
