"""The seed formulas reproduce the brief's worked examples (docs/formulas.md F1-F4) and its sources' stated properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import job, workload

from memsweep.columns import Columns, base_params
from memsweep.formulas import FORMULAS
from memsweep.formulas.seeds import (
    KorthikantiConstants, MixedConstants, NaiveConstants, korthikanti_layer_activations,
    mixed_activations, mixed_gradients, mixed_optimizer, mixed_weights, naive_activations,
    naive_weights,
)
from memsweep.specs import Parallel
from memsweep.units import GIB

P_QWEN = 7.7e9  # docs/formulas.md F2: "Qwen1.5-7B (7.7e9 params, h=4096, L=32, s=2048)"


def truncate(gib: float) -> float:
    return math.floor(gib * 100) / 100


def f2_terms(trainable: float, all_params: float, states: int = 2) -> list[float]:
    k = MixedConstants()
    return [float(x) / GIB for x in (
        mixed_weights(np.array(all_params), np.array(1.0), np.array(2.0), k),
        mixed_activations(np.array(2048.0), np.array(4096.0), np.array(32.0), k),
        mixed_gradients(np.array(trainable), np.array(1.0), np.array(2.0), k),
        mixed_optimizer(np.array(trainable), np.array(states), k),
    )]


def test_f2_lora_worked_example():
    # docs/formulas.md F2: LoRA with 2% extra trainable params -> 43.88 + 0.5 + 0.57 + 1.72 = 46.67 GiB.
    terms = f2_terms(trainable=0.02 * P_QWEN, all_params=1.02 * P_QWEN)
    # The source truncates each term to 2 decimals and adds the truncated terms.
    assert [truncate(t) for t in terms] == pytest.approx([43.88, 0.5, 0.57, 1.72])
    assert sum(truncate(t) for t in terms) == pytest.approx(46.67)


def test_f2_full_finetune_zero3_worked_example():
    # docs/formulas.md F2: full fine-tune with ZeRO-3 -> 43.02 + 0.5 + 28.68 + 86.05 = 158.25 GiB.
    # (The source truncates: 6 * 7.7e9 B = 43.027 GiB; its total is the sum of truncated terms.)
    terms = f2_terms(trainable=P_QWEN, all_params=P_QWEN)
    assert [truncate(t) for t in terms] == pytest.approx([43.02, 0.5, 28.68, 86.05], abs=0.011)
    assert sum(terms) == pytest.approx(158.25, abs=0.02)


def test_f2_on_the_real_qwen_matches_the_example_within_its_param_rounding():
    spec = job("qwen1.5-7b", parallel="zero3")
    c = Columns.from_specs([spec])
    total = float(FORMULAS["seed_mixed"](c).total[0]) / GIB
    exact_p = float(base_params(c)[0])
    assert total == pytest.approx(158.27 * exact_p / P_QWEN, rel=2e-3)  # 16 B/param + 0.5 GiB


def test_f2_inference_is_params_times_dtype_bytes():
    for dtype, nbytes in (("fp16", 2), ("int8", 1), ("int4", 0.5)):
        c = Columns.from_specs([job("llama2-7b", wl="inference", dtype=dtype)])
        assert FORMULAS["seed_mixed"](c).total[0] == 6_738_415_616 * nbytes


def test_f1_naive_weights_and_quadratic_growth():
    k = NaiveConstants()
    c = Columns.from_specs([job("llama2-7b", seq=s) for s in (8192, 20 * 8192)])
    assert naive_weights(c, k)[0] == 4 * 32 * 4096**2 * 2
    acts = naive_activations(c)
    assert acts[0] == 32 * 1 * 32 * 8192 * (8192 + 2 * 128) * 2
    # docs/formulas.md F1: "20x longer sequence -> ~400x activation memory" for s >> d
    assert acts[1] / acts[0] == pytest.approx(400, rel=0.04)
    b = FORMULAS["seed_naive"](c)
    np.testing.assert_array_equal(b.total, naive_weights(c, k) + 2 * acts)


def test_f1_gradient_factor_is_a_named_constant():
    c = Columns.from_specs([job("llama2-7b")])
    one = FORMULAS["seed_naive"].with_constants("naive_1x", gradient_factor=1.0)(c)
    assert one.total[0] == naive_weights(c, NaiveConstants())[0] + naive_activations(c)[0]


def layer_bytes(recompute="none", tp=1, sp=False, **top):
    par = Parallel("p", tp=tp, sequence_parallel=sp)
    spec = job("tiny", parallel=par, recompute=recompute, precision="pure", **top)
    return spec, float(korthikanti_layer_activations(Columns.from_specs([spec]), KorthikantiConstants())[0])


def test_f3_korthikanti_variants():
    # Korthikanti et al. 2022, Table 2, per layer: sbh(34 + 5as/h); tp t: sbh(10 + 24/t + 5as/(ht));
    # + sequence parallel: sbh(34 + 5as/h)/t; selective: 34 sbh/t (with sp); full: 2 sbh.
    spec, none = layer_bytes(seq=256, batch=3)
    s, b, h, a = 256, 3, 64, 4
    sbh = s * b * h
    assert none == sbh * (34 + 5 * a * s / h)
    assert layer_bytes("selective", seq=256, batch=3)[1] == 34 * sbh
    assert layer_bytes("full", seq=256, batch=3)[1] == 2 * sbh
    assert layer_bytes(tp=2, seq=256, batch=3)[1] == sbh * (10 + 24 / 2 + 5 * a * s / (h * 2))
    assert layer_bytes(tp=2, sp=True, seq=256, batch=3)[1] == sbh * (34 + 5 * a * s / h) / 2
    assert layer_bytes("selective", tp=2, sp=True, seq=256, batch=3)[1] == 34 * sbh / 2


def test_f3_sequence_parallel_plus_selective_saves_about_5x_on_gpt3():
    # Korthikanti et al. 2022 (abstract): the two techniques reduce activation memory by ~5x.
    # GPT-3 175B: a=96, h=12288, s=2048, t=8.
    def gpt3(recompute: str, sp: bool) -> float:
        c = Columns.from_arrays(
            seq=2048, batch=1, hidden=12288, heads=96, tp=8, sequence_parallel=sp,
            recompute_full=0, recompute_selective=recompute == "selective", mixed=1, dtype_bytes=2)
        return float(korthikanti_layer_activations(c, KorthikantiConstants())[0])

    ratio = gpt3("none", False) / gpt3("selective", True)
    assert 5.0 <= ratio <= 6.0


def test_f4_training_is_4x_weights_with_adam_and_3x_with_sgd():
    for opt, mult in (("adamw", 4), ("adam", 4), ("sgd_momentum", 3), ("sgd", 3)):
        b = FORMULAS["seed_rule4x"](Columns.from_specs([job("llama2-7b", optimizer=opt)]))
        assert b.total[0] == pytest.approx(mult * b.weights[0])


def test_f4_lora_trains_only_the_adapters():
    wl = workload("lora", lora_rank=8, lora_targets=("q", "v"))
    b = FORMULAS["seed_rule4x"](Columns.from_specs([job("llama2-7b", wl=wl)]))
    assert b.gradients[0] == 4_194_304 * 2
    assert b.optimizer[0] == 2 * 4_194_304 * 2
