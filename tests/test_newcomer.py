"""A newcomer's dead ends (issue 27), each now a correct answer or one error line naming the key:
a capped ask that does not fit, a seq beyond the model's context, `objective=fastest` without a
GPU budget, `--help` cut mid-formula, a formula help citing a file the repo lacks, `measure=fake`
without torch, a legend over the title, and README's `plan ask` samples gone stale."""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys

import polars as pl
import pytest
from conftest import CONF, REPO

from memsweep.app.help import first_comment, help_text, top_level_keys
from memsweep.plan import PlanSpec, make_plan
from memsweep.plan.ask import answer, main as ask_main, parse_args

GIB_PAIR = re.compile(r"needs ([\d.]+) GiB > capacity ([\d.]+) GiB")


def ask(*argv: str) -> str:
    return answer(parse_args(list(argv)))


# --- 1. a capped question that does not fit says so on the cap, and what would fit ---------------

def test_70b_on_one_gpu_is_its_own_shortfall_and_points_to_what_fits():
    # was "every layout up to 4096 GPUs needs 23.49 GiB > 75.19 GiB": the closest of any size, not
    # of one GPU, a shortfall smaller than the capacity
    text = ask("model=llama2-70b", "hardware=h100-80g", "max_gpus=1")
    assert "nothing fits on 1 GPU (max_gpus=1)" in text and "4096" not in text and "4,096" not in text
    need, capacity = map(float, GIB_PAIR.search(text).groups())
    assert need > capacity == pytest.approx(75.19)
    assert "without max_gpus it fits on 32 GPUs (tp8 zero3 dp4, recompute=full)" in text
    assert "with workload=qlora it fits on 1 GPU" in text


@pytest.mark.parametrize("argv, where", [
    (("workload=inference", "max_gpus=1"), "on 1 GPU (max_gpus=1)"),
    (("max_gpus=8",), "on up to 8 GPUs (max_gpus=8)"),
    # no cap: the largest layout searched (llama2-70b fits on 64 such cards since uneven pipelines)
    (("model=llama3.1-405b", "hardware=rtx4090-24g"), "on up to 8,192 GPUs"),
    (("workload=inference", "hardware=rtx4090-24g", "layouts.pp=[1]", "layouts.tp=[1,2]"), "on up to 2 GPUs"),
])
def test_every_shortfall_exceeds_the_capacity_of_the_gpus_it_names(argv, where):
    argv = ("model=llama2-70b", "hardware=h100-80g", *argv)
    text = ask(*argv)
    assert f"nothing fits {where}" in text
    need, capacity = map(float, GIB_PAIR.search(text).groups())
    assert need > capacity


def test_plan_rows_that_do_not_fit_name_the_closest_layout_within_the_cap():
    t = make_plan(PlanSpec(models=("llama2-70b", "llama3-8b"), hardware=("a100-40g",), seqs=(2048,),
                           workloads=("train", "inference"), max_gpus=2), questions=("min_gpus",)).table
    short = t.filter(pl.col("status") == "none_fits")
    assert short.height == 3  # all but llama3-8b inference
    for r in short.iter_rows(named=True):
        assert r["reason"].startswith("on up to 2 GPUs (max_gpus=2): the closest")
        need, capacity = map(float, GIB_PAIR.search(r["reason"]).groups())
        assert need > capacity and r["total_bytes"] > r["capacity_bytes"] and r["limit"] == 2


# --- 2. a question that is not a valid configuration: one line naming the key, exit 2 ------------

@pytest.mark.parametrize("argv, line", [
    # llama3-8b's context is 8,192 and inference decodes 128 tokens after the prompt
    (("model=llama3-8b", "workload=inference", "seq=8192"),
     "error: seq=8192: not allowed; allowed: 1 to 8,064 for llama3-8b · inference: max_positions=8,192 "
     "less workload.gen_tokens=128 (rope_scaling=F stretches it F-fold)"),
    (("model=gpt2", "workload=inference", "seq=1024"), "error: seq=1024: not allowed; allowed: 1 to 896 "),
    (("model=llama3-8b", "precision=int8"), "error: precision='int8': not allowed; allowed: fp32, fp16, bf16"),
    (("model=llama3-8b", "layouts.tp=[3]"), "error: layouts.tp=[3]: not allowed; allowed: a list with a divisor"),
])
def test_an_invalid_question_is_one_error_line_naming_the_key(argv, line, capsys):
    assert ask_main(["hardware=h100-80g", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith(line), err


def test_the_command_exits_2_for_a_seq_beyond_the_context_and_answers_at_it():
    proc = subprocess.run([sys.executable, "-m", "memsweep.app.main", "plan", "ask", "model=llama3-8b",
                           "hardware=h100-80g", "workload=inference", "seq=8192"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: seq=8192:") and proc.stderr.count("\n") == 1
    assert "fits on 1 GPU" in ask("model=llama3-8b", "hardware=h100-80g", "workload=inference", "seq=8064")


def test_the_plans_excluded_reason_says_what_the_context_rule_is():
    # was "learned positions count the generated tokens too" for llama3-8b, a RoPE model
    t = make_plan(PlanSpec(models=("llama3-8b",), hardware=("h100-80g",), seqs=(8192,), workloads=("inference",)),
                  questions=("min_gpus",)).table
    reason = t.row(0, named=True)["reason"]
    assert reason == ("seq > 8,064: the model's context (max_positions) less the 128 generated tokens (gen_tokens); "
                      "rope_scaling stretches a RoPE model's")


# --- 3. fastest: the fewest whole nodes that fit, not the largest layout searched -----------------

def test_fastest_without_max_gpus_stays_on_the_fewest_whole_nodes_that_fit():
    # was 4,096 GPUs (tp8 pp8 zero2 dp64) at 4 % MFU for llama3-8b
    base = dict(models=("llama3.2-1b", "llama3-8b", "llama2-70b"), hardware=("h100-80g", "a100-40g"), seqs=(2048,),
                workloads=("train", "lora"))
    fast = make_plan(PlanSpec(**base, objective="fastest"), questions=("min_gpus",), with_curves=False).table
    fewest = make_plan(PlanSpec(**base), questions=("min_gpus",), with_curves=False).table
    key = ["model", "workload", "hardware"]
    both = fast.filter(pl.col("rank") == 1).join(fewest.filter(pl.col("rank") == 1), on=key, suffix="_fewest")
    assert both.height == 12 and (both["status"] == "ok").all()
    for r in both.iter_rows(named=True):
        budget = math.ceil(r["gpus_fewest"] / 8) * 8  # every preset here: 8 GPUs per node
        assert r["limit"] == budget and r["gpus_fewest"] <= r["gpus"] <= budget, r
        assert r["est_tokens_per_s"] * r["gpus"] >= r["est_tokens_per_s_fewest"] * r["gpus_fewest"]
    assert both.filter(pl.col("model") == "llama3-8b", pl.col("workload") == "train")["est_mfu"].min() > 0.3


def test_fastest_says_its_budget_and_max_gpus_still_rules():
    text = ask("model=llama3-8b", "hardware=h100-80g", "objective=fastest")
    assert "fastest within 8 GPUs (the fewest whole nodes it fits on: 1 × 8; max_gpus=N allows more): 8 GPUs" in text
    assert "Fewest GPUs: 2 GPUs" in text and "4096" not in text and "4,096" not in text
    wide = ask("model=llama3-8b", "hardware=h100-80g", "objective=fastest", "max_gpus=64", "global_batch=512")
    assert wide.split(": fastest within max_gpus=64: ")[1].startswith(("16 GPUs", "32 GPUs", "64 GPUs"))


# --- 4, 5. --help: no entry cut, no citation of a file the repo lacks ------------------------------

def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("width", [80, 100, 140])
@pytest.mark.parametrize("prog", ["memsweep", "python sweep.py"])
def test_help_cuts_no_entry_and_keeps_every_line_within_the_width(width, prog):
    text = help_text(CONF, prog=prog, width=width)
    lines = text.splitlines()
    assert all(len(x) <= width for x in lines), [x for x in lines if len(x) > width]
    assert not any(x.rstrip().endswith("…") for x in lines)
    flat = _flat(text)
    for p in sorted(CONF.glob("*/*.yaml")):
        if p.parent.name != "hydra" and first_comment(p):
            assert _flat(f"{p.stem} {first_comment(p)}") in flat, p
    for key, value, comment in top_level_keys(CONF / "config.yaml"):
        assert _flat(f"{key}={value} {comment}" if value else f"{key} {comment}") in flat, key
    # the entry that was cut: "fits = total <= (memory - reserve) x (1 - margin)"
    assert "fits = total <= (memory - reserve) x (1 - margin)" in flat


def test_help_and_formula_presets_cite_real_sources():
    text = help_text(CONF, width=100)
    assert "SPEC.md" not in text
    for p in sorted((CONF / "formula").glob("*.yaml")):
        assert "SPEC.md" not in p.read_text(), p
    assert "arXiv:2205.05198" in first_comment(CONF / "formula" / "seed_korthikanti.yaml")
    for name, section in (("seed_naive", "F1"), ("seed_mixed", "F2"), ("seed_korthikanti", "F3"),
                          ("seed_rule4x", "F4")):
        assert f"docs/formulas.md, {section}" in first_comment(CONF / "formula" / f"{name}.yaml")
        assert re.search(rf"^## {section} `{name}`", (REPO / "docs" / "formulas.md").read_text(), re.M), name


# --- 6. measure=fake without torch: one line before any job ---------------------------------------

@pytest.fixture
def torch_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "torch" else real(name, *a, **k))


@pytest.mark.parametrize("argv, named", [
    (["measure=fake"], "measure=fake"),
    (["-m", "measure=none,fake", "seq=128,256"], "measure=fake"),   # a sweep refuses if any job measures
    (["measure.backend=cpu"], "measure.backend=cpu"),
])
def test_measuring_without_torch_is_one_line_before_any_job(argv, named, torch_missing, tmp_path, capsys):
    from memsweep.app import sweep

    out = tmp_path / "out"
    assert sweep.run([*argv, f"hydra.run.dir={out}", f"hydra.sweep.dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {named}: needs torch (pip install \"memsweep[measure]\"); allowed: measure=none")
    assert err.count("\n") == 1 and not out.exists()


def test_analytic_sweeps_need_no_torch(torch_missing):
    from memsweep.app.sweep import check_torch

    assert check_torch(["model=tiny"]) is None and check_torch(["-m", "measure=none", "seq=1,2"]) is None
    assert check_torch(["--cfg", "job", "measure=fake"]) is None  # prints the config, runs nothing


def test_measuring_with_torch_is_not_refused(monkeypatch):
    from memsweep.app.sweep import check_torch

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: object() if name == "torch" else real(name, *a, **k))
    assert check_torch(["-m", "measure=none,fake,cpu"]) is None


# --- 7. the legend clears the panels and the title -------------------------------------------------

def _errors(workloads: tuple[str, ...], formulas: tuple[str, ...]) -> pl.DataFrame:
    from memsweep.fit import with_errors
    from memsweep.units import GIB

    rows = []
    for i, (m, gib) in enumerate((("tiny", 0.02), ("gpt2", 2.3), ("llama2-7b", 60.0))):
        for w in workloads:
            for seq in (128, 1024):
                measured = int(gib * GIB * (1 + seq / 4096))
                rows += [{"job_id": f"{m}-{w}-{seq}", "model": m, "workload": w, "seq": seq, "formula": f,
                          "status": "ok", "measure_backend": "fake", "measured_peak_bytes": measured,
                          "total_bytes": int(measured * (1.0 if f == "exact" else 0.6 + 0.1 * i))} for f in formulas]
    return with_errors(pl.DataFrame(rows))


@pytest.mark.parametrize("figure", ["predicted_vs_measured_figure", "error_vs_seq_figure"])
@pytest.mark.parametrize("shape", [(("train",), ("exact",)), (("train", "inference"), ("exact", "seed_off"))])
def test_the_legend_sits_outside_every_panel_and_clear_of_the_title(figure, shape):
    pytest.importorskip("matplotlib")
    from memsweep import plots

    fig = getattr(plots, figure)(_errors(*shape))
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        legend = fig.legends[0].get_window_extent(renderer)
        title = fig._suptitle.get_window_extent(renderer)
        for ax in fig.axes:
            if ax.get_visible():
                assert not legend.overlaps(ax.get_tightbbox(renderer)), (figure, shape)
        assert not legend.overlaps(title)
        box = fig.bbox
        for part in (legend, title):  # nothing runs off the figure
            assert box.x0 <= part.x0 and part.x1 <= box.x1 and box.y0 <= part.y0 and part.y1 <= box.y1, (part, box)
    finally:
        plots._plt().close(fig)


# --- 8. README's `plan ask` samples are what ask answers today --------------------------------------

def test_readme_ask_samples_are_current():
    text = (REPO / "README.md").read_text()
    samples = re.findall(r"^\$ python scripts/plan\.py ask (.+)\n(.+)$", text, re.M)
    assert len(samples) >= 3
    for argv, shown in samples:
        assert ask(*argv.split()) == shown, argv
