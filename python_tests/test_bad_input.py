"""Inputs a careless user gives that used to end in a silent no-op, an Inf checkpoint or a run
that never ends: each is now one sentence and exit status 1 (or 2 for a bad option), with no
output written."""

import pytest
from test_cli import error_of, family, gene  # noqa: F401  (fixtures)

import safegene_fast as sg
from safegene_fast.cli import main
from safegene_fast.method.selection import choose


@pytest.mark.parametrize("coeffs, problem", [
    ('{"99": 0.8}', "coefficient key '99' is neither a layer index"),
    ('{"model.layers.0.self_attn.q_proj.weight": 0.8}', "is neither a layer index"),  # the .weight typo
    ("{}", "zero for every module of the gene"),
    ('{"0": 0, "1": 0.0}', "zero for every module of the gene"),
])
def test_coefficients_that_land_nowhere(family, gene, capsys, tmp_path, coeffs, problem):  # noqa: F811
    path = tmp_path / "c.json"
    path.write_text(coeffs)
    for fmt in ("merged", "peft"):
        out = tmp_path / f"out-{fmt}"
        assert problem in error_of(capsys, ["apply", "--model", str(family["target"]), "--gene", str(gene),
                                            "--coeffs", str(path), "--format", fmt, "--out", str(out), "--quiet"])
        assert not out.exists()


@pytest.mark.parametrize("alpha", ["1e300", "-1e300", "0"])
def test_a_coefficient_that_overflows_or_does_nothing(family, gene, capsys, tmp_path, alpha):  # noqa: F811
    out = tmp_path / "out"
    line = error_of(capsys, ["apply", "--model", str(family["target"]), "--gene", str(gene), f"--alpha={alpha}",
                             "--out", str(out), "--quiet"])
    assert ("overflow float32" in line) if alpha != "0" else ("zero for every module" in line)
    assert not out.exists()


@pytest.mark.parametrize("flag, value", [("--power-iters", "10000000"), ("--power-iters", "-1"),
                                         ("--oversample", "100000")])
def test_sketch_settings_out_of_range(family, capsys, tmp_path, flag, value):  # noqa: F811
    out = tmp_path / "gene"
    line = error_of(capsys, ["extract", "--aligned", str(family["aligned"]), "--degraded", str(family["degraded"]),
                             "--out", str(out), flag, value, "--quiet"])
    assert "must be an integer from 0 to" in line and not out.exists()


def test_one_degraded_path_as_a_string(family):  # noqa: F811
    """``extract(A, "degraded/")`` means that one checkpoint, not the characters of its name."""
    gene = sg.extract(family["aligned"], str(family["degraded"]), rank=2)
    assert gene.provenance and len(gene.modules) > 0


def test_a_threshold_that_keeps_no_layer():
    with pytest.raises(ValueError, match="no layer scores at least 1e\\+09"):
        choose({0: 0.1, 1: 0.3}, threshold=1e9)
    assert choose({0: 0.1, 1: 0.3}, threshold=0.2) == [1]


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf"])
def test_recalibrate_bound_must_be_positive(capsys, tmp_path, value):
    with pytest.raises(SystemExit) as exc:  # argparse: usage error, exit status 2
        main(["recalibrate", "--model", str(tmp_path), "--gene", str(tmp_path), "--out", str(tmp_path / "c.json"),
              "--alpha-max", value])
    assert exc.value.code == 2 and "--alpha-max" in capsys.readouterr().err
    with pytest.raises(ValueError, match="upper bound must be a positive number"):
        sg.recalibrate(None, None, sg.SafetyGene({}), sg.FewShot([], "", []), alpha_max=float(value))
