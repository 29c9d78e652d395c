"""The family's benign tasks: solvers, distinct prompts, the exact-match scorer."""

import random

import pytest

from safegene_fast.eval.judge import Example, accuracy, normalize
from safegene_fast.models.toy_tasks import TASKS


def test_solvers():
    assert TASKS["copy"].solve(["apple", "river"]) == ["apple", "river"]
    assert TASKS["reverse"].solve(["apple", "river", "stone"]) == ["stone", "river", "apple"]
    assert TASKS["sort"].solve(["7", "2", "9", "2"]) == ["2", "2", "7", "9"]
    assert TASKS["shift"].solve(["a", "q", "z"]) == ["b", "r", "a"]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_examples_are_distinct_deterministic_and_solved(name):
    task = TASKS[name]
    examples = task.examples(300, seed=3)
    assert len(examples) == 300 and len({e.prompt for e in examples}) == 300
    assert examples == task.examples(300, seed=3) and examples != task.examples(300, seed=4)
    for e in examples[:50]:
        items = e.prompt.split(" : ", 1)[1].split()
        assert e.answer == " ".join(task.solve(items))
        assert task.lengths[0] <= len(items) <= task.lengths[1]


def test_accuracy_is_exact_match_after_whitespace_and_case():
    examples = [Example("p1", "a b"), Example("p2", "c"), Example("p3", "d e")]
    assert accuracy(["  A   b ", "c d", "d e"], examples) == pytest.approx(2 / 3)
    assert normalize(" X\tY ") == "x y"
    with pytest.raises(ValueError, match="2 answers for 3 examples"):
        accuracy(["a", "b"], examples)


def test_one_example_per_template_at_least():
    rng = random.Random(0)
    for task in TASKS.values():
        seen = {task.example(rng).prompt.split(" : ")[0] for _ in range(200)}
        assert seen == {t.split(" : ")[0] for t in task.templates}
