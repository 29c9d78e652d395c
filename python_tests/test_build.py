"""What was built, and what the package says about it."""

import json
import subprocess
import sys
import types

import pytest

import safegene_fast as sg
from safegene_fast import _C, ops


def test_build_info_matches_the_package():
    info = sg.build_info()
    assert info["version"] == sg.__version__
    assert info["cpu_isa"] in ("avx512", "avx2", "default")
    assert isinstance(info["cuda_built"], bool)
    assert bool(info["cuda_archs"]) == info["cuda_built"]


def test_python_m_prints_the_doctor_report():
    out = subprocess.run([sys.executable, "-m", "safegene_fast"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "cuda_built" in out.stdout and "cpu_isa" in out.stdout


def test_doctor_json():
    out = subprocess.run([sys.executable, "-m", "safegene_fast", "doctor", "--json"],
                         capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    assert report["safegene_fast"] == sg.__version__
    assert report["torch_built_against"] in report["torch"]


def test_cuda_tensors_on_a_cpu_only_build_get_a_rebuild_hint(monkeypatch):
    monkeypatch.setattr(_C, "build_info", lambda: {"cuda_built": False})
    fake_cuda = types.SimpleNamespace(is_cuda=True)
    with pytest.raises(RuntimeError, match="built with CPU kernels only.*SAFEGENE_CUDA=1"):
        ops._require_built_device(fake_cuda)


def test_unknown_cpu_isa_is_refused():
    with pytest.raises(ValueError, match="unknown instruction set 'sse9'"):
        _C.set_cpu_isa("sse9")
