"""No output path can destroy an input, or anything the tool did not write.

A property over paths that alias (the input itself, a folder above it, one inside it, a link to
it, the working directory and its parents, an unrelated folder, an earlier output), with and
without overwriting: the run either refuses with a sentence and changes nothing, or writes its
output and changes nothing outside it. Then the same cases through the command line.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import error_of, family, gene  # noqa: F401  (fixtures)

from safegene_fast.cli import main
from safegene_fast.experiments.common import fresh_dir
from safegene_fast.io import OutputExistsError, UnsafeOutputError, atomic_file, atomic_folder, check_output


def snapshot(root: Path) -> dict:
    """Every path below ``root`` with its content digest (links by their target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p)] = "dir"
    return out


def make_tree(root: Path) -> dict:
    """inputs: a checkpoint fam/target and a gene; bystanders: a note beside the target, a
    folder of the user's, the working directory's files; an earlier output ``prev``."""
    (root / "fam" / "target").mkdir(parents=True)
    (root / "fam" / "target" / "model.safetensors").write_bytes(b"weights")
    (root / "fam" / "notes.txt").write_text("mine")
    (root / "gene").mkdir()
    (root / "gene" / "safegene.json").write_text("{}")
    (root / "mine").mkdir()
    (root / "mine" / "thesis.tex").write_text("years of work")
    (root / "work").mkdir()
    (root / "work" / "data.csv").write_text("1,2")
    (root / "prev").mkdir()
    (root / "prev" / "model.safetensors").write_bytes(b"old output")
    (root / "to-target").symlink_to(root / "fam" / "target")
    return {"inputs": [root / "fam" / "target", root / "gene"], "cwd": root / "work"}


CANDIDATES = ["fam/target", "fam", ".", "fam/target/sub", "gene", "gene/safegene.json", "to-target", "work",
              "work/..", "mine", "prev", "new", "work/new", "fam/new", "mine/thesis.tex", "gene/../gene"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(candidate=st.sampled_from(CANDIDATES), overwrite=st.booleans(), as_file=st.booleans())
def test_an_output_changes_nothing_but_itself(tmp_path_factory, candidate, overwrite, as_file):
    root = tmp_path_factory.mktemp("tree")
    tree = make_tree(root)
    before = snapshot(root)
    target = root / candidate
    old_cwd = os.getcwd()
    os.chdir(tree["cwd"])
    try:
        if as_file:
            with atomic_file(target, overwrite=overwrite, inputs=tree["inputs"]) as f:
                f.write("out")
        else:
            with atomic_folder(target, overwrite=overwrite, inputs=tree["inputs"]) as tmp:
                (tmp / "model.safetensors").write_bytes(b"new output")
    except (UnsafeOutputError, OutputExistsError) as exc:
        assert str(exc).startswith(str(target)) and str(exc).endswith(".")  # names the path, one sentence
        assert snapshot(root) == before, "a refused output changed something"
        return
    finally:
        os.chdir(old_cwd)
    after = snapshot(root)
    inside = str(target.resolve())
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert all(p == inside or p.startswith(inside + os.sep) for p in changed), changed
    for item in tree["inputs"]:  # every input is as it was
        assert {p: d for p, d in after.items() if p.startswith(str(item))} == \
               {p: d for p, d in before.items() if p.startswith(str(item))}


def test_outputs_that_alias_are_refused_with_a_reason(tmp_path, monkeypatch):
    tree = make_tree(tmp_path)
    monkeypatch.chdir(tree["cwd"])
    inputs = tree["inputs"]
    reasons = {
        "fam/target": "is the input", "to-target": "is the input", "fam": "holds the input",
        ".": "holds the input", "fam/target/sub": "lies inside the input", "work": "holds the working directory",
        "work/..": "holds the input",
    }
    for candidate, reason in reasons.items():
        with pytest.raises(UnsafeOutputError, match=reason):
            check_output(tmp_path / candidate, inputs, overwrite=True)
    with pytest.raises(UnsafeOutputError, match="is not a checkpoint or adapter folder"):
        check_output(tmp_path / "mine", inputs, overwrite=True)
    with pytest.raises(UnsafeOutputError, match="is not a plain file"):
        check_output(tmp_path / "mine", inputs, overwrite=True, folder=False)
    check_output(tmp_path / "prev", inputs, overwrite=True)  # an earlier output may be replaced


def test_a_file_output_is_never_replaced_without_overwrite(tmp_path):
    """Another run made the file while this one computed: the link fails, the first file stays."""
    target = tmp_path / "coeffs.json"
    with pytest.raises(OutputExistsError):
        with atomic_file(target, overwrite=False) as f:
            target.write_text("the other run's")
            f.write("ours")
    assert target.read_text() == "the other run's" and [p.name for p in tmp_path.iterdir()] == ["coeffs.json"]


def test_a_folder_output_made_meanwhile_is_not_replaced(tmp_path):
    target = tmp_path / "gene"
    with pytest.raises(OutputExistsError):
        with atomic_folder(target) as tmp:
            (tmp / "safegene.json").write_text("ours")
            target.mkdir()
            (target / "safegene.json").write_text("theirs")
    assert (target / "safegene.json").read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == ["gene"]


def test_the_models_scratch_folder_is_emptied_only_of_outputs(tmp_path):
    models = tmp_path / "models"
    (models / "resta-b0.5").mkdir(parents=True)
    (models / "resta-b0.5" / "model.safetensors").write_bytes(b"x")
    assert fresh_dir(models) == models and not models.exists()
    (models / "photos").mkdir(parents=True)
    with pytest.raises(UnsafeOutputError, match="which no run wrote"):
        fresh_dir(models)
    assert (models / "photos").is_dir()


# ----------------------------------------------------------------------------- the command line

def test_cli_outputs_that_would_destroy_inputs(family, gene, capsys, tmp_path, monkeypatch):  # noqa: F811
    target, aligned = family["target"], family["aligned"]
    before = {p: snapshot(p) for p in (target.parent, gene)}
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    extract = ["extract", "--aligned", str(aligned), "--degraded", str(family["degraded"]), "--quiet", "--overwrite"]
    apply = ["apply", "--model", str(target), "--gene", str(gene), "--quiet", "--overwrite"]
    cases = [
        (extract + ["--out", "."], "holds the working directory"),
        (extract + ["--out", str(aligned)], "is the input"),
        (apply + ["--out", str(target.parent)], "holds the input"),
        (apply + ["--out", str(target)], "is the input"),
        (apply + ["--out", str(gene)], "is the input"),
        (apply + ["--out", str(target / "sub")], "lies inside the input"),
        (["resta", "--model", str(target), "--aligned", str(aligned), "--degraded", str(family["degraded"]),
          "--alpha", "0.5", "--out", str(family["degraded"]), "--quiet", "--overwrite"], "is the input"),
    ]
    for argv, reason in cases:
        assert reason in error_of(capsys, argv), argv
    assert {p: snapshot(p) for p in (target.parent, gene)} == before
    assert (work / "keep.txt").read_text() == "mine"


def test_cli_method_file_outputs(tiny_family, capsys, tmp_path):
    gene_dir = tmp_path / "gene"
    assert main(["extract", "--aligned", str(tiny_family.member("aligned")), "--degraded",
                 str(tiny_family.member("dealigned")), "--out", str(gene_dir), "--rank", "2", "--quiet"]) == 0
    meta = (gene_dir / "safegene.json").read_bytes()
    recal = ["recalibrate", "--model", str(tiny_family.member("target")), "--gene", str(gene_dir), "--family", "tiny",
             "--shots", "2", "--steps", "1", "--quiet"]
    assert "lies inside the input" in error_of(capsys, recal + ["--out", str(tmp_path / "c.json"), "--log",
                                                                 str(gene_dir / "safegene.json"), "--overwrite"])
    assert "give each output its own path" in error_of(capsys, recal + ["--out", str(tmp_path / "c.json"), "--log",
                                                                         str(tmp_path / "c.json")])
    (tmp_path / "log.json").write_text("my notes")
    assert "already exists; pass --overwrite" in error_of(capsys, recal + ["--out", str(tmp_path / "c.json"),
                                                                           "--log", str(tmp_path / "log.json")])
    assert (gene_dir / "safegene.json").read_bytes() == meta and (tmp_path / "log.json").read_text() == "my notes"
    assert not (tmp_path / "c.json").exists()
    assert main(recal + ["--out", str(tmp_path / "c.json")]) == 0
    assert set(json.loads((tmp_path / "c.json").read_text())) == {str(x) for x in range(tiny_family.layers)}


def test_bench_work_folder_keeps_what_was_there(tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    assert main(["bench", "--synthetic", "llama-tiny", "--work", str(work), "--repeat", "1", "--quiet", "--json"]) == 0
    assert [p.name for p in work.iterdir()] == ["keep.txt"] and (work / "keep.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- signals and leftovers

STOPPABLE = """
import sys, time
from pathlib import Path
from safegene_fast.cli import Stopped, stop_on_signals
from safegene_fast.io import atomic_folder
stop_on_signals()
try:
    with atomic_folder(sys.argv[1]) as tmp:
        (tmp / "model.safetensors").write_bytes(b"x" * 100_000)
        print("ready", flush=True)
        time.sleep(60)
except Stopped as exc:
    sys.exit(128 + exc.signum)
"""


@pytest.mark.parametrize("signals", [[signal.SIGTERM], [signal.SIGHUP], [signal.SIGINT, signal.SIGINT]])
def test_a_stop_signal_leaves_no_temporary(tmp_path, signals):
    """SIGTERM, SIGHUP and Ctrl-C (twice: the second may not cut the clean-up short) unwind the
    run: its exit status says which signal, and nothing is left beside the output."""
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", STOPPABLE, str(out)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    assert any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir())
    for s in signals:
        child.send_signal(s)
    assert child.wait(timeout=30) == 128 + signals[0]
    assert list(tmp_path.iterdir()) == []


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_what_a_killed_run_left_is_cleaned_or_restored(tmp_path):
    """A run killed outright (SIGKILL) leaves its temporary; the next run on that output removes
    it. Killed between moving the old output aside and renaming the new one in, it leaves the old
    output aside: the next run puts it back before deciding anything."""
    pid = dead_pid()
    (tmp_path / f".out.tmp-{pid}").mkdir()
    (tmp_path / f".out.tmp-{pid}" / "model.safetensors").write_bytes(b"half")
    (tmp_path / f".prev.old-{pid}").mkdir()
    (tmp_path / f".prev.old-{pid}" / "model.safetensors").write_bytes(b"the earlier output")
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "model.safetensors").write_bytes(b"new")
    with pytest.raises(OutputExistsError):  # prev is back, so it is not silently replaced
        with atomic_folder(tmp_path / "prev"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "prev"]
    assert (tmp_path / "prev" / "model.safetensors").read_bytes() == b"the earlier output"


SHRINK = """
import sys
from pathlib import Path
from safegene_fast.io import reader
from safegene_fast.models.synthetic import write_family
from safegene_fast.pipeline import resta
root = Path(sys.argv[1])
fam = write_family(root / "fam", "llama-tiny", max_shard_size=300_000)
original, done = reader.Checkpoint.view, []

def view(self, name, start=0, count=None):  # another process shrinks a mapped shard mid-run
    info = self.tensors[name]
    if not done and self.folder == fam["degraded"] and info.file in self._maps and info.nbytes:
        with open(info.file, "r+b") as f:
            f.truncate(info.offset)  # this tensor and the rest of its shard are gone
        done.append(name)
    return original(self, name, start, count)

reader.Checkpoint.view = view
try:
    resta(fam["target"], fam["aligned"], fam["degraded"], 0.5, root / "out")
except reader.CheckpointError as exc:
    print(exc)
    sys.exit(1)
"""


def test_a_shard_that_shrinks_mid_run_is_an_error_not_a_crash(tmp_path):
    """resta reads its inputs through mappings; a shard truncated by another process while it
    runs used to kill it with SIGBUS and leave its temporary behind."""
    done = subprocess.run([sys.executable, "-c", SHRINK, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, (done.returncode, done.stderr[-500:])
    assert "is truncated on disk (the file changed while it was read)" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fam"]


def test_a_second_writer_of_the_same_output_is_refused(family, gene, capsys, tmp_path):  # noqa: F811
    from safegene_fast.io import output_lock
    out = tmp_path / "out"
    apply = ["apply", "--model", str(family["target"]), "--gene", str(gene), "--out", str(out), "--quiet"]
    with output_lock(out):  # another run holds it
        assert "another run is writing it now" in error_of(capsys, apply)
    with output_lock(gene):  # a select updating this gene in place
        assert "another run is writing it now" in error_of(capsys, [
            "select", "--gene", str(gene), "--aligned", str(family["aligned"]), "--degraded", str(family["degraded"]),
            "--layers", "1", "--quiet"])
    assert main(apply) == 0 and not any(p.name.endswith(".lock") for p in tmp_path.iterdir())


def test_a_failing_plot_leaves_no_coefficients(tiny_family, capsys, tmp_path, monkeypatch):
    from safegene_fast.method import recalibrate

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(recalibrate, "plot_tradeoff", full_disk)
    gene_dir = tmp_path / "gene"
    assert main(["extract", "--aligned", str(tiny_family.member("aligned")), "--degraded",
                 str(tiny_family.member("dealigned")), "--out", str(gene_dir), "--rank", "2", "--quiet"]) == 0
    line = error_of(capsys, ["recalibrate", "--model", str(tiny_family.member("target")), "--gene", str(gene_dir),
                             "--family", "tiny", "--shots", "2", "--steps", "1", "--quiet", "--out",
                             str(tmp_path / "c.json"), "--plot", str(tmp_path / "p.png")])
    assert "No space left on device" in line and not (tmp_path / "c.json").exists()


# ----------------------------------------------------------------------------- all outputs or none

def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("failure", [ValueError("late"), KeyboardInterrupt()])
def test_outputs_of_a_failed_block_never_appear(tmp_path, failure):
    from safegene_fast.io import together, write_json
    with pytest.raises(type(failure)):
        with together():
            write_json(tmp_path / "a.json", 1)
            with atomic_folder(tmp_path / "gene") as tmp:
                (tmp / "safegene.json").write_text("{}")
            assert visible(tmp_path) != [] and not (tmp_path / "a.json").exists()  # finished, not yet in place
            raise failure
    assert visible(tmp_path) == []


def test_a_set_that_cannot_be_put_in_place_is_taken_back(tmp_path):
    """The second output appeared meanwhile (another run): the first goes back to its old content."""
    from safegene_fast.io import together, write_json
    write_json(tmp_path / "a.json", "old")
    with pytest.raises(OutputExistsError):
        with together():
            write_json(tmp_path / "a.json", "new", overwrite=True)
            write_json(tmp_path / "b.json", "ours", overwrite=False)
            (tmp_path / "b.json").write_text('"theirs"')
    assert json.loads((tmp_path / "a.json").read_text()) == "old"
    assert json.loads((tmp_path / "b.json").read_text()) == "theirs" and visible(tmp_path) == ["a.json", "b.json"]


def test_files_inside_a_folder_output_are_part_of_it(tmp_path):
    from safegene_fast.io import together, write_json
    with together():
        with atomic_folder(tmp_path / "gene") as tmp:
            write_json(tmp / "safegene.json", {})
            assert (tmp / "safegene.json").is_file()  # written at once: the folder is the output
        assert not (tmp_path / "gene").exists()
    assert visible(tmp_path / "gene") == ["safegene.json"] and visible(tmp_path) == ["gene"]


def test_a_set_appears_whole(tmp_path):
    from safegene_fast.io import together, write_json
    write_json(tmp_path / "a.json", "old")
    with together():
        write_json(tmp_path / "a.json", "new", overwrite=True)
        with together():  # nested: the outer block puts everything in place
            write_json(tmp_path / "b.json", "b")
        assert not (tmp_path / "b.json").exists()
    assert [json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json")] == ["new", "b"]
    assert visible(tmp_path) == ["a.json", "b.json"]


def test_a_failing_coefficients_write_leaves_no_log_or_plot(tiny_family, capsys, tmp_path, monkeypatch):
    """The plot and the log were finished before the coefficients failed: none of the three appears."""
    from safegene_fast.io import atomic as atomic_module
    gene_dir = tmp_path / "gene"
    assert main(["extract", "--aligned", str(tiny_family.member("aligned")), "--degraded",
                 str(tiny_family.member("dealigned")), "--out", str(gene_dir), "--rank", "2", "--quiet"]) == 0
    real_open, out = open, tmp_path / "c.json"

    def open_full_disk(path, *args, **kwargs):
        if Path(path).name.startswith(f".{out.name}.tmp-"):
            raise OSError(28, "No space left on device")
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(atomic_module, "open", open_full_disk, raising=False)
    line = error_of(capsys, ["recalibrate", "--model", str(tiny_family.member("target")), "--gene", str(gene_dir),
                             "--family", "tiny", "--shots", "2", "--steps", "1", "--quiet", "--out", str(out),
                             "--log", str(tmp_path / "log.json"), "--plot", str(tmp_path / "p.png")])
    assert "No space left on device" in line
    assert visible(tmp_path) == ["gene"]
