"""Fleets: ``safegene protect`` for one fine-tune, ``safegene batch RECIPE.yaml`` for many, in a
local process pool or on a local Ray, on tiny Llama checkpoints written by transformers."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time

import pytest
import torch
import yaml
from test_interop import base_weights, llama_config, perturbed, save_model

import safegene_fast as sg
from safegene_fast.cli import main
from safegene_fast.fleet.batch import run_batch
from safegene_fast.fleet.protect import RUN_RECORD
from safegene_fast.fleet.recipe import RecipeError, load_recipe

TARGETS = ["support-bot", "sql-helper", "poet"]


def weights_of(folder) -> dict[str, bytes]:
    """Every file of an output but its run record (timings differ from run to run), as bytes."""
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file() and f.name != RUN_RECORD}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    config = llama_config(tied=False)
    weights = base_weights(config, seed=0)
    save_model(config, weights, torch.bfloat16, root / "aligned")
    save_model(config, perturbed(weights, seed=1, noise=0.01, low_rank=0.2), torch.bfloat16, root / "degraded")
    for i, name in enumerate(TARGETS):
        save_model(config, perturbed(weights, seed=10 + i, noise=0.02), torch.bfloat16, root / "ft" / name)
    sg.extract(root / "aligned", [root / "degraded"], rank=4).save(root / "gene")
    for name in TARGETS:  # the reference: one safegene apply each
        assert main(["apply", "--model", str(root / "ft" / name), "--gene", str(root / "gene"), "--alpha", "0.8",
                     "--out", str(root / "reference" / name), "--quiet"]) == 0
    return root


def write_recipe(folder, **changes) -> str:
    recipe = {"gene": "gene", "format": "merged", "alpha": 0.8, "out_dir": "protected",
              "targets": [{"model": f"ft/{name}"} for name in TARGETS]}
    recipe.update(changes)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.fixture
def workdir(fleet, tmp_path):
    """A folder with the fleet's inputs linked in, and room for the recipe and its outputs."""
    for name in ("aligned", "degraded", "ft", "gene"):
        (tmp_path / name).symlink_to(fleet / name)
    return tmp_path


@pytest.mark.parametrize("changes, error", [
    ({"targets": []}, "targets: List should have at least 1 item"),
    ({"extract": {"aligned": "aligned", "degraded": ["degraded"]}}, "give exactly one of gene"),
    ({"coeffs": "c.json"}, "give one of alpha, coeffs and recalibrate, not alpha and coeffs"),
    ({"colour": "red"}, "colour is not a recipe key"),
    ({"targets": [{"out": "x"}]}, "targets.0: the field model is missing"),
    ({"targets": [{"model": "ft/poet", "weird": 1}]}, "targets.0: weird is not a recipe key"),
    ({"alpha": float("inf")}, "alpha: alpha must be a finite number"),
    ({"alpha": "lots"}, "alpha: Input should be a valid number"),
    ({"format": "gguf"}, "format: Input should be 'merged', 'peft' or 'combined'"),
    ({"out_dir": None}, "a target without out needs out_dir"),
    ({"targets": [{"model": "ft/poet"}, {"model": "other/poet"}]}, "two targets are named 'poet'"),
    ({"recalibrate": {"harmful": "h.txt"}, "alpha": None}, "recalibrate: the field keep is missing"),
])
def test_recipe_errors_name_the_key(tmp_path, changes, error):
    path = write_recipe(tmp_path, **changes)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert str(caught.value).startswith(f"{path}: ") and error in str(caught.value), caught.value
    assert len(str(caught.value).splitlines()) == 1


@pytest.mark.parametrize("text, error", [
    ("gene: [unclosed", "not valid YAML"),
    ("- a list\n- of things\n", "a recipe is a mapping of keys"),
])
def test_recipe_that_is_not_a_mapping(tmp_path, text, error):
    (tmp_path / "recipe.yaml").write_text(text)
    with pytest.raises(RecipeError, match=error):
        load_recipe(tmp_path / "recipe.yaml")


def test_paths_are_relative_to_the_recipe_and_hub_ids_stay_ids(workdir):
    recipe = load_recipe(write_recipe(workdir, targets=[{"model": "ft/poet"}, {"model": "org/model", "out": "o"}]))
    assert recipe.gene == str(workdir / "gene") and recipe.targets[0].model == str(workdir / "ft" / "poet")
    assert recipe.targets[1].model == "org/model" and recipe.targets[1].out == str(workdir / "o")


@pytest.mark.parametrize("executor, workers", [("local", 1), ("local", 2), ("ray", 2)])
def test_batch_outputs_are_bit_identical_to_apply(fleet, workdir, capsys, executor, workers):
    if executor == "ray":
        pytest.importorskip("ray", reason="Ray is an optional extra (requirements.txt installs it)")
    code = main(["batch", write_recipe(workdir), "--executor", executor, "--workers", str(workers), "--json", "--quiet"])
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert code == 0 and [r["target"] for r in rows] == TARGETS and {r["status"] for r in rows} == {"ok"}
    for name in TARGETS:
        assert weights_of(workdir / "protected" / name) == weights_of(fleet / "reference" / name)
        record = json.loads((workdir / "protected" / name / RUN_RECORD).read_text())
        assert record["coefficients"] == 0.8 and record["settings"]["format"] == "merged"
        assert len(record["target"]["fingerprint"]) == 64 and len(record["gene"]["fingerprint"]) == 64


def test_a_failing_target_does_not_stop_the_others(workdir, capsys):
    broken = workdir / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    path = write_recipe(workdir, targets=[{"model": "ft/poet"}, {"model": "broken"}, {"model": "ft/sql-helper"}])
    code = main(["batch", path, "--workers", "2", "--quiet"])
    out = capsys.readouterr().out
    assert code == 1  # one target failed
    assert re.search(r"^broken +failed", out, re.M) and "broken: " in out and "not a safetensors file" in out
    assert (workdir / "protected" / "poet" / RUN_RECORD).exists()
    assert (workdir / "protected" / "sql-helper" / RUN_RECORD).exists()
    assert not (workdir / "protected" / "broken").exists()


def test_resume_skips_what_is_done_and_redoes_what_changed(workdir, capsys):
    path = write_recipe(workdir)
    assert run_batch(path, progress=False)[0]["status"] == "ok"
    rows = run_batch(path, resume=True, progress=False)
    assert {r["status"] for r in rows} == {"up to date"}
    shutil.rmtree(workdir / "protected" / "poet")  # as if the batch had stopped before it
    os.utime(workdir / "ft" / "sql-helper" / "config.json")  # not a weight file: still up to date
    rows = run_batch(path, resume=True, progress=False)
    assert [r["status"] for r in rows] == ["up to date", "up to date", "ok"]
    changed = write_recipe(workdir, alpha=0.5)  # another recipe: every output is redone
    assert {r["status"] for r in run_batch(changed, resume=True, progress=False)} == {"ok"}
    # without --resume or --overwrite, existing outputs are refused before anything runs
    assert main(["batch", changed, "--quiet"]) == 1
    assert "already exists" in capsys.readouterr().err


def test_outputs_that_touch_an_input_are_refused_before_anything_runs(workdir, capsys):
    path = write_recipe(workdir, targets=[{"model": "ft/poet", "out": "protected/poet"},
                                          {"model": "ft/sql-helper", "out": "gene/inside"}])
    assert main(["batch", path, "--quiet"]) == 1
    assert "gene" in capsys.readouterr().err
    assert not (workdir / "protected").exists()
    twice = write_recipe(workdir, targets=[{"model": "ft/poet", "out": "same"},
                                           {"model": "ft/sql-helper", "out": "same"}])
    assert main(["batch", twice, "--quiet"]) == 1
    capsys.readouterr()


def test_protect_records_what_it_did(fleet, tmp_path, capsys):
    assert main(["protect", "--model", str(fleet / "ft" / "poet"), "--gene", str(fleet / "gene"), "--alpha", "0.8",
                 "--out", str(tmp_path / "p"), "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert weights_of(tmp_path / "p") == weights_of(fleet / "reference" / "poet")
    record = json.loads((tmp_path / "p" / RUN_RECORD).read_text())
    assert record == {k: result[k] for k in record}
    assert record["gene"]["provenance"]["aligned"] == str(fleet / "aligned")
    assert main(["protect", "--model", str(fleet / "ft" / "poet"), "--gene", str(fleet / "gene"), "--alpha", "0.8",
                 "--harmful", str(tmp_path / "h.txt"), "--out", str(tmp_path / "q")]) == 1
    assert "--harmful and --keep go together" in capsys.readouterr().err


def test_protect_recalibrates_and_evaluates_on_the_tiny_family(tiny_family, tmp_path, capsys):
    from safegene_fast.models.toy import TARGET_TASK, prompt_sets
    sets = prompt_sets("tiny", 0)
    (tmp_path / "harmful.txt").write_text("\n".join(sets.harmful("fewshot")))
    (tmp_path / "keep.txt").write_text("\n".join(e.prompt for e in sets.examples(TARGET_TASK, "fewshot")))
    (tmp_path / "heldout.txt").write_text("\n".join(sets.harmful("heldout")))
    assert main(["extract", "--aligned", str(tiny_family.member("aligned")), "--degraded",
                 str(tiny_family.member("dealigned")), "--rank", "2", "--out", str(tmp_path / "gene"), "--quiet"]) == 0
    assert main(["protect", "--model", str(tiny_family.member("target")), "--gene", str(tmp_path / "gene"),
                 "--harmful", str(tmp_path / "harmful.txt"), "--keep", str(tmp_path / "keep.txt"), "--shots", "4",
                 "--steps", "2", "--evaluate", str(tmp_path / "heldout.txt"), "--limit", "8",
                 "--out", str(tmp_path / "p"), "--json", "--quiet"]) == 0
    record = json.loads((tmp_path / "p" / RUN_RECORD).read_text())
    assert set(record["coefficients"]) == {str(layer) for layer in sg.SafetyGene.load(tmp_path / "gene").layers}
    assert record["evaluation"]["harmful_n"] == 8 and 0 <= record["evaluation"]["after"] <= 1
    assert record["timings"]["recalibrate_s"] > 0 and record["settings"]["recalibrate"]["shots"] == 4


def test_a_ray_worker_killed_mid_task_is_retried(fleet, workdir):
    """The worker running a target is killed mid-task (a process Ray's state API lists as a worker,
    whose title says it runs the batch's task); Ray retries the task and the batch still completes
    with the right outputs."""
    from pathlib import Path

    pytest.importorskip("ray", reason="Ray is an optional extra (requirements.txt installs it)")
    from ray.util.state import list_workers
    killed = []

    def running_task_pids() -> list[int]:
        pids = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::_ray_job"):
                    pids.append(int(proc.name))
            except OSError:
                pass
        return pids

    def kill_a_running_worker():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for pid in running_task_pids():
                workers = {w.pid for w in list_workers(filters=[("pid", "=", pid)], raise_on_missing_output=False)}
                if pid in workers:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    break
            time.sleep(0.005)

    import ray
    ray.init(num_cpus=1, include_dashboard=True, log_to_driver=False)  # the state API is served by the dashboard
    try:
        threading.Thread(target=kill_a_running_worker, daemon=True).start()
        rows = run_batch(write_recipe(workdir), executor="ray", workers=1, progress=False)
    finally:
        ray.shutdown()
    assert killed, "no running task was seen to kill"
    assert {r["status"] for r in rows} == {"ok"}
    for name in TARGETS:
        assert weights_of(workdir / "protected" / name) == weights_of(fleet / "reference" / name)


def test_python_api(fleet, tmp_path):
    done = sg.protect(fleet / "ft" / "poet", fleet / "gene", tmp_path / "p", 0.8)
    assert done.coefficients == 0.8 and done.nbytes > 0
    assert weights_of(tmp_path / "p") == weights_of(fleet / "reference" / "poet")
    with pytest.raises(ValueError, match="not both"):
        sg.protect(fleet / "ft" / "poet", fleet / "gene", tmp_path / "q", 0.8,
                   recalibrate=sg.Shots(["h"], ["k"], "No."))


def test_a_recipe_that_extracts_its_gene_checks_outputs_first_and_resumes(fleet, workdir, capsys):
    extract = {"aligned": "aligned", "degraded": ["degraded"], "rank": 4}
    bad = write_recipe(workdir, gene=None, extract={**extract, "out": "aligned/gene"})
    assert main(["batch", bad, "--quiet"]) == 1
    assert "aligned" in capsys.readouterr().err and not (workdir / "aligned" / "gene").exists()
    path = write_recipe(workdir, gene=None, extract=extract)
    rows = run_batch(path, progress=False)
    assert {r["status"] for r in rows} == {"ok"} and (workdir / "protected" / "gene" / "safegene.json").exists()
    for name in TARGETS:  # the same gene as the fixture's (same inputs, same seed): the same weights
        ours, reference = weights_of(workdir / "protected" / name), weights_of(fleet / "reference" / name)
        assert {k: v for k, v in ours.items() if k.endswith(".safetensors")} == \
            {k: v for k, v in reference.items() if k.endswith(".safetensors")}
    assert {r["status"] for r in run_batch(path, resume=True, progress=False)} == {"up to date"}


@pytest.mark.parametrize("call, error", [
    (lambda: run_batch(123), "a recipe is the path of a YAML file, not int"),
    (lambda: run_batch("r.yaml", executor="slurm"), "unknown executor 'slurm'"),
    (lambda: run_batch("r.yaml", workers=0), "workers must be a positive integer"),
    (lambda: sg.protect(123, "gene", "out", 1.0), "a checkpoint is a path or a Hub model id, not int"),
    (lambda: sg.protect("m", "gene", "out", 1.0, format="gguf"), "unknown output format 'gguf'"),
])
def test_the_python_api_refuses_values_of_the_wrong_kind(tmp_path, call, error):
    with pytest.raises((TypeError, ValueError), match=error):
        call()


def test_a_stopped_batch_leaves_whole_outputs_and_resumes(fleet, tmp_path):
    """SIGTERM in the middle of a batch: it stops soon (targets not started are dropped), every
    output there is complete, none half-written; --resume then does only the rest."""
    import subprocess
    import sys
    (tmp_path / "gene").symlink_to(fleet / "gene")
    names = [f"ft-{i}" for i in range(16)]
    (tmp_path / "ft").mkdir()
    for name in names:
        (tmp_path / "ft" / name).symlink_to(fleet / "ft" / "poet")
    path = write_recipe(tmp_path, targets=[{"model": f"ft/{name}"} for name in names])
    proc = subprocess.Popen([sys.executable, "-m", "safegene_fast", "batch", path, "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    out = tmp_path / "protected"
    deadline = time.time() + 120
    while time.time() < deadline and not (out.is_dir() and any((p / RUN_RECORD).exists() for p in out.iterdir())):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in err.decode()
    done = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert 0 < len(done) < len(names)  # stopped midway: some outputs, not all
    assert all((out / name / RUN_RECORD).exists() for name in done)  # each one whole; no temporaries
    rows = run_batch(path, resume=True, progress=False)
    assert sorted(r["target"] for r in rows if r["status"] == "up to date") == done
    assert {r["status"] for r in rows if r["target"] not in done} == {"ok"}
    reference = weights_of(fleet / "reference" / "poet")
    for name in names:
        ours = weights_of(out / name)
        assert {k: v for k, v in ours.items() if k.endswith(".safetensors")} == \
            {k: v for k, v in reference.items() if k.endswith(".safetensors")}
