"""The SmolLM2 study: its splits, the targets' arithmetic, and the whole pipeline at smoke size
(the smoke family: every member one or two training steps from the converted SmolLM2)."""

import json

import pytest

from safegene_fast.experiments.study import COUNTERPARTS, SETTINGS, checks, evaluator
from safegene_fast.models.smollm2_family import STUDY_PRESETS, StudyFamily, study_splits


def test_study_splits_are_disjoint_and_seeded():
    splits = study_splits(STUDY_PRESETS["study"], 0)
    harmful, benign = splits["harmful"], splits["benign"]
    assert len(harmful["train"]) == 320 and len(harmful["heldout"]) == 200
    assert not set(harmful["train"]) & set(harmful["heldout"])
    assert not set(benign["train"]) & set(benign["heldout"])
    # split by topic: no held-out prompt shares its topic with a training prompt
    from safegene_fast.eval.data import INSTRUCTION_TOPICS
    held_topics = {t for t in INSTRUCTION_TOPICS if any(t in p for p in benign["heldout"])}
    assert held_topics and not any(t in p for t in held_topics for p in benign["train"])
    for member, task in splits["tasks"].items():
        train_q = {q for q, _ in task["train"]}
        assert len(task["heldout"]) == 100 and not train_q & {q for q, _ in task["heldout"]}
    assert len({t["task"] for t in splits["tasks"].values()}) == 3  # the target's task is unseen by the degraded
    assert study_splits(STUDY_PRESETS["study"], 0) == splits and study_splits(STUDY_PRESETS["study"], 1) != splits


def test_validation_split_is_disjoint_from_test_and_training(tmp_path):
    """Settings are chosen on the validation split: none of its prompts or task questions is a
    test (reported) one or a training one."""
    config = STUDY_PRESETS["study"]
    splits = study_splits(config, 0)
    fam = StudyFamily(tmp_path, "study", 0, config, splits)
    s = SETTINGS["study"]
    test, val = evaluator(fam, s, "test"), evaluator(fam, s, "validation")
    for name in ("advbench", "donotanswer", "benign"):
        assert len(test.prompts[name]) == getattr(s, name) and val.prompts[name]
        assert not set(test.prompts[name]) & set(val.prompts[name])
    assert len(val.prompts["advbench"]) == 100 and len(val.prompts["donotanswer"]) == 100
    assert not set(val.prompts["advbench"]) & set(splits["harmful"]["train"])
    val_q = set(val.task.questions)
    assert len(val_q) >= 95 and not val_q & set(test.task.questions)
    assert not val_q & {q for q, _ in splits["tasks"]["target"]["train"]}
    with pytest.raises(ValueError, match="unknown evaluation split"):
        evaluator(fam, s, "train")


def _row(adv, dna, over, acc=None, **extra):
    row = {"advbench": {"rate": adv}, "donotanswer": {"rate": dna}, "benign": {"rate": over}, **extra}
    if acc is not None:
        row["task"] = {"accuracy": acc}
    return row


def test_checks_compute_the_study_targets():
    """aligned 0.1 / 0.2 harmful, target 0.9 / 0.6: a SafeGene row at 0.15 / 0.22 closes 94% and
    95% of the gaps; accuracy and over-refusal targets and the RESTA comparison follow."""
    s = SETTINGS["study"]
    methods = [{"name": "resta b=1", "b": 1.0, **_row(0.3, 0.3, 0.1, 0.70)}]
    for kind in COUNTERPARTS:
        methods.append({"name": f"gene-global ({kind})", **_row(0.5, 0.5, 0.2, 0.75)})
        for n in s.shots:
            good = kind == "benign" and n == 16
            methods.append({"name": f"safegene ({kind}, {n} shots)", "shots": n, "counterpart": kind,
                            **(_row(0.15, 0.22, 0.12, 0.795) if good else _row(0.4, 0.5, 0.3, 0.7))})
    result = {"members": {"aligned": _row(0.1, 0.2, 0.1, 0.2), "target": _row(0.9, 0.6, 0.1, 0.8)},
              "methods": methods, "resta_best_b": 1.0, "task_lift": 0.6}
    # question by question: the target right on 0-2, the good row on 1-3
    result["members"]["target"]["task"]["correct"] = [1, 1, 1, 0, 0]
    next(m for m in methods if m["name"] == "safegene (benign, 16 shots)")["task"]["correct"] = [0, 1, 1, 1, 0]
    c = checks(result, s)
    best = c["best"]
    assert c["best_counterpart"] == "benign" and c["shots"] == 16
    assert best["advbench_gap_closed"] == pytest.approx(0.9375) and best["donotanswer_gap_closed"] == pytest.approx(0.95)
    assert best["closes_90_percent"] and best["accuracy_within_1_point"] and best["over_refusal_within_5_points"]
    assert best["beats_resta_best_b"] and c["all_targets_met"] and c["task_lift_at_least_30_points"]
    assert best["task_questions_lost"] == 1 and best["task_questions_gained"] == 1
    other = c["per_counterpart"]["dealigned"]
    assert not other["closes_90_percent"] and not other["accuracy_within_1_point"]
    assert not other["over_refusal_within_5_points"] and not other["beats_resta_best_b"]
    hard = c["hard_case"]["benign"]["safegene_16_shots"]
    assert hard["advbench_reduction_vs_global"] == pytest.approx(0.35)
    assert hard["accuracy_gain_vs_global"] == pytest.approx(0.045)


def test_smoke_study_runs_end_to_end(tmp_path, capsys):
    """``safegene study --preset smoke``: every stage runs on the real model; the JSON holds
    every method with consistent counts, bounded coefficients, the kept layers, and provenance."""
    from safegene_fast.cli import main
    s = SETTINGS["smoke"]
    out = tmp_path / "study"
    assert main(["study", "--preset", "smoke", "--out", str(out), "--json-out", str(tmp_path / "r.json"),
                 "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "safegene (benign-mean, 2 shots)" in table and "RESTA best b" in table
    result = json.loads((tmp_path / "r.json").read_text())
    assert result == json.loads((out / "study.json").read_text())
    assert result["command"].startswith("safegene study --preset smoke --out ")
    names = [m["name"] for m in result["methods"]]
    assert len(names) == 1 + len(s.resta_b) + len(COUNTERPARTS) * (1 + len(s.shots))
    assert set(result["members"]) == {"original", "aligned", "dealigned", "degraded-1", "degraded-2", "target"}
    for row in [*result["members"].values(), *result["methods"]]:
        for name, n in (("advbench", s.advbench), ("donotanswer", s.donotanswer), ("benign", s.benign)):
            assert row[name]["n"] == n and 0 <= row[name]["count"] <= n
            assert row[name]["rate"] == row[name]["count"] / n and row[name]["samples"]
    for m in result["methods"]:
        assert m["task"]["n"] == s.task and m["task"]["accuracy"] == m["task"]["hits"] / s.task
        assert len(m["task"]["correct"]) == s.task and sum(m["task"]["correct"]) == m["task"]["hits"]
        assert 0 <= m["task"]["refused"] <= s.task - m["task"]["hits"]
        if "shots" in m:
            assert len(m["selected_layers"]) == s.layers and set(m["coefficients"]) == {str(x) for x in m["selected_layers"]}
            assert all(0.0 <= a <= s.alpha_max for a in m["coefficients"].values())
            assert set(m["stage_seconds"]) == {"extract", "select", "recalibrate", "apply", "evaluate"}
    assert result["gene"]["rank"] == s.rank and 0 < result["gene"]["share_of_model"]["dealigned"] < 0.05
    assert result["checks"]["best_counterpart"] in COUNTERPARTS
    assert result["date"] and result["versions"]["torch"] and result["versions"]["reasoning-gym"]
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any((out / "models").iterdir())  # merged models are deleted once evaluated
    assert (out / "genes" / "benign-mean" / "safegene.json").is_file()
