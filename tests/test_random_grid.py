"""Issue 25, part 6: configurations drawn from the whole key space, detailed against the fake
trace moment by moment (memsweep.randomgrid; `python scripts/accuracy.py --random N --seed S`)."""

from __future__ import annotations

import pytest

from memsweep.randomgrid import FEATURES, compare, draw, worst_by_feature

pytest.importorskip("torch")


def test_a_draw_is_reproducible_and_covers_the_key_space():
    a, b = draw(60, seed=3, small=True), draw(60, seed=3, small=True)
    assert [s.to_dict() for s, _ in a] == [s.to_dict() for s, _ in b]
    assert [s.to_dict() for s, _ in draw(60, seed=4, small=True)] != [s.to_dict() for s, _ in a]
    seen = {f: {str(feat[f]) for _, feat in a} for f in FEATURES}
    assert {"train", "lora", "inference"} <= seen["workload"] and len(seen["model"]) >= 10
    assert {"mixed", "pure"} <= seen["precision"] and {"none", "full"} <= seen["recompute"]
    assert {"sdpa", "eager"} <= seen["attention"] and len(seen["optimizer"]) >= 5
    assert all(s.seq & (s.seq - 1) for s, _ in a)  # never a power of two


@pytest.mark.parametrize("half", [0, 1])  # two halves, so the two CI workers share the draw
def test_a_small_draw_is_measured_and_detailed_is_right_in_the_median(half):
    """24 small configurations (1-2 layers, seq <= 512), seed 0. Every one is measured or skipped
    with the backend's one-line reason. The median errors hold the line; the worst cases are
    the open part of issue 25 (this draw, 2026-12-07: full training's backward phase on 1-2 layer
    models, -37 % DeepSeek-V3 ... -5 %, BERT's total -34 %, chunked losses -10 %: see
    `python scripts/accuracy.py --random 40 --seed 0 --small`)."""
    errors = compare(draw(24, seed=0, small=True)[12 * half:12 * half + 12])
    assert errors["config"].n_unique() == 12
    skipped = errors.filter(errors["status"] != "ok")
    assert set(skipped["status"]) <= {"skipped"} and all("\n" not in e for e in skipped["error"])
    ok = errors.filter(errors["phase"].is_not_null())
    assert ok["config"].n_unique() >= 9
    assert ok.unique("config")["total_error_pct"].abs().median() <= 0.5
    assert ok["error_pct"].abs().median() <= 0.5
    table = worst_by_feature(errors)
    assert set(table["feature"]) == set(FEATURES) and (table["configs"] > 0).all()
