"""Starting the ``safegene`` command: the package and the command import only the standard library
until they are used, the stop signals are handled from the first line of ``main``, and a stop
at any moment after that ends with one line, its exit status and nothing left behind."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import safegene_fast
from safegene_fast.gene import GeneModule, SafetyGene

HEAVY = ("torch", "numpy", "transformers", "safegene_fast._C")
SAFEGENE = Path(sys.executable).with_name("safegene")
COMMAND = [str(SAFEGENE)] if SAFEGENE.is_file() else [sys.executable, "-m", "safegene_fast"]


def loaded_after(statement: str) -> list[str]:
    """The heavy modules a fresh interpreter has loaded after running ``statement``."""
    done = subprocess.run([sys.executable, "-c", f"import json, sys; {statement}; print(json.dumps(sorted("
                           f"m for m in sys.modules if m.split('.')[0] in {HEAVY} or m in {HEAVY})))"],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_importing_the_package_or_the_command_loads_nothing_heavy():
    assert loaded_after("import safegene_fast") == []
    assert loaded_after("import safegene_fast.cli") == []
    assert "torch" in loaded_after("import safegene_fast as sg; sg.extract")


def test_the_package_names_load_on_first_use():
    from safegene_fast import apply, select_layers
    from safegene_fast.pipeline import apply as real_apply
    assert apply is real_apply and callable(select_layers)
    assert safegene_fast.ops.rsvd is safegene_fast.rsvd  # a submodule, as attribute
    assert set(safegene_fast.__all__) <= set(dir(safegene_fast))
    with pytest.raises(AttributeError):
        safegene_fast.no_such_name  # noqa: B018


def handles_stop_signals(pid: int) -> bool:
    """Whether the process catches SIGTERM (Python alone catches only SIGINT)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.M)[1], 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


@pytest.fixture(scope="module")
def gene(tmp_path_factory):
    module = GeneModule(torch.ones(4, 2), torch.ones(2, 4), torch.ones(2), 1.0, 0)
    return SafetyGene({"model.layers.0.mlp.down_proj": module}).save(tmp_path_factory.mktemp("gene") / "g")


def wait_until(ready, child: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not ready():
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)


# A stop lands in the start-up (seconds after the handlers are in place: torch, transformers and
# the commands are being imported, for a few seconds) or in the command (seconds after its output
# lock appears, past taking the lock: it is loading the gene or blocked reading its prompts from a
# pipe that stays open).
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the signal mask from /proc")
@pytest.mark.parametrize("stop, phase, delay", [
    (signal.SIGINT, "start-up", 0.0), (signal.SIGTERM, "start-up", 0.0), (signal.SIGINT, "start-up", 0.5),
    (signal.SIGTERM, "start-up", 1.5), (signal.SIGHUP, "start-up", 2.5),
    (signal.SIGINT, "command", 0.2), (signal.SIGTERM, "command", 0.6)])
def test_a_stop_ends_with_one_line_and_leaves_nothing(gene, tmp_path, stop, phase, delay):
    with subprocess.Popen([*COMMAND, "recalibrate", "--model", str(tmp_path / "model"), "--gene", str(gene),
                           "--harmful", "/dev/stdin", "--out", str(tmp_path / "coeffs.json")],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        try:
            wait_until(lambda: handles_stop_signals(child.pid), child)
            if phase == "command":
                wait_until(lambda: any(tmp_path.iterdir()), child)
            time.sleep(delay)
            child.send_signal(stop)
            assert child.wait(timeout=60) == 128 + stop
        finally:
            child.kill()
        out, err = child.stdout.read(), child.stderr.read().strip().splitlines()
    assert out == ""
    assert len(err) == 1 and re.fullmatch(rf"safegene: stopped by {stop.name}(; partial outputs were removed)?\.",
                                          err[0]), err
    if phase == "command" or delay == 0:  # the line says whether there were outputs to remove
        assert err[0] == f"safegene: stopped by {stop.name}" + ("." if phase == "start-up" else
                                                                 "; partial outputs were removed.")
    assert list(tmp_path.iterdir()) == []  # neither the output, its temporary nor its lock
