"""Hardware presets' speeds (issue 15 part 2) and the published-throughput table (part 6 data).

The preset values themselves are cited in each conf/hardware/*.yaml and docs/hardware.md; these
tests hold them to the datasheets' own relations (dense, not sparse; Hopper FP8 = 2x BF16) and keep
docs/data/published_throughput.yaml loadable against the presets it names.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from memsweep.errors import ConfigError
from memsweep.presets import load_preset, preset_names
from memsweep.specs import QUANT_METHODS, RECOMPUTES, Hardware

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "docs" / "data" / "published_throughput.yaml"

SPEEDS = ("tflops_fp32", "tflops_tf32", "tflops_bf16", "tflops_fp16", "tflops_fp8", "tops_int8",
          "hbm_gbs", "nvlink_gbs", "pcie_gbs", "network_gbs")
DATACENTER = ("a100-40g", "a100-80g", "h100-80g", "h200-141g")
HOPPER = ("h100-80g", "h200-141g")


def hardware(name: str) -> Hardware:
    return Hardware(**load_preset("hardware", name))


def test_every_shipped_preset_is_tested():
    assert set(preset_names("hardware")) == {*DATACENTER, "rtx4090-24g", "rtx3050-4g"}


@pytest.mark.parametrize("name", preset_names("hardware"))
def test_preset_speeds_load_and_are_consistent(name):
    hw = hardware(name)
    for key in SPEEDS:
        v = getattr(hw, key)
        assert isinstance(v, float) and v >= 0, key
    assert hw.gpus_per_node >= 1
    # every preset gives its compute and memory speeds (only fp8 / links may be absent)
    for key in ("tflops_fp32", "tflops_tf32", "tflops_bf16", "tflops_fp16", "tops_int8", "hbm_gbs", "pcie_gbs"):
        assert getattr(hw, key) > 0, key
    # tensor cores beat CUDA cores; bf16 / fp16 (FP32 accumulate) run at twice or more TF32
    assert hw.tflops_bf16 >= hw.tflops_tf32 >= hw.tflops_fp32
    assert hw.tflops_fp16 == hw.tflops_bf16
    assert hw.tops_int8 >= hw.tflops_bf16
    if hw.tflops_fp8:
        assert hw.tflops_fp8 == pytest.approx(2 * hw.tflops_bf16, rel=1e-3)
    # a collective leaves a node over some link, NVLink or PCIe
    assert hw.nvlink_gbs > 0 or hw.pcie_gbs > 0


@pytest.mark.parametrize("name", DATACENTER)
def test_datacenter_parts_know_every_link(name):
    hw = hardware(name)
    assert hw.nvlink_gbs > hw.pcie_gbs > 0 and hw.network_gbs > 0 and hw.gpus_per_node == 8
    assert hw.hbm_gbs > 1000


def test_dense_not_sparse_and_unidirectional():
    """The datasheets print sparse tensor rates and bidirectional links; the presets halve both."""
    a100, h100, h200 = hardware("a100-80g"), hardware("h100-80g"), hardware("h200-141g")
    assert (a100.tflops_bf16, a100.tflops_tf32, a100.nvlink_gbs, a100.pcie_gbs) == (312, 156, 300, 32)
    assert (h100.tflops_bf16, h100.tflops_fp8, h100.nvlink_gbs, h100.pcie_gbs) == (989.5, 1979, 450, 64)
    for key in ("tflops_fp32", "tflops_bf16", "tflops_fp8", "nvlink_gbs"):  # same GH100 compute
        assert getattr(h200, key) == getattr(h100, key)
    assert h200.hbm_gbs > h100.hbm_gbs
    for name in HOPPER:
        assert hardware(name).tflops_fp8 == 2 * hardware(name).tflops_bf16
    assert hardware("a100-40g").tflops_fp8 == hardware("a100-80g").tflops_fp8 == 0  # no FP8 in Ampere


def test_geforce_uses_fp32_accumulate_and_has_no_nvlink():
    rtx = hardware("rtx4090-24g")
    assert rtx.tflops_fp16 == 165.2 and rtx.nvlink_gbs == 0  # not 330.3 (FP16 accumulate)
    assert hardware("rtx3050-4g").gpus_per_node == 1


def test_a_preset_without_speeds_still_loads():
    hw = Hardware("mine", memory_mib=16384)
    assert all(getattr(hw, k) == 0.0 for k in SPEEDS) and hw.gpus_per_node == 8
    assert Hardware("mine", memory_mib=16384, hbm_gbs=300).hbm_gbs == 300.0  # an integer reads as float


@pytest.mark.parametrize("key, value", [("hbm_gbs", -1), ("tflops_bf16", float("nan")), ("nvlink_gbs", "fast"),
                                        ("tops_int8", True), ("network_gbs", float("inf")), ("gpus_per_node", 0)])
def test_a_bad_speed_is_a_one_line_config_error(key, value):
    with pytest.raises(ConfigError) as err:
        Hardware("x", memory_mib=4096, **{key: value})
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"hardware.{key}=")


# --- docs/data/published_throughput.yaml ---------------------------------------------------------

REQUIRED = ("id", "source", "kind", "model", "hardware", "gpus", "tp", "pp", "dp", "seq", "global_batch",
            "micro_batch", "dtype", "recompute", "metric", "value", "notes")
METRICS = ("tokens_per_s_per_gpu", "mfu", "hfu", "tflops_per_gpu", "step_time_s", "output_tokens_per_s",
           "peak_memory_gb")
OPTIONAL = ("cp", "ep", "also", "workload", "quant", "input_len", "output_len", "shape", "sequence_parallel")


@pytest.fixture(scope="module")
def published() -> list[dict]:
    entries = yaml.safe_load(PUBLISHED.read_text())
    assert isinstance(entries, list) and 10 <= len(entries)
    return entries


def test_published_entries_have_every_key(published):
    ids = [e.get("id") for e in published]
    assert len(set(ids)) == len(ids), "duplicate id"
    for e in published:
        missing = [k for k in REQUIRED if k not in e]
        assert not missing, (e.get("id"), missing)
        unknown = set(e) - set(REQUIRED) - set(OPTIONAL)
        assert not unknown, (e["id"], unknown)
        assert e["kind"] in ("train", "inference", "serve"), e["id"]
        assert e["metric"] in METRICS and isinstance(e["value"], (int, float)) and e["value"] > 0, e["id"]
        for metric, value in (e.get("also") or {}).items():
            assert metric in METRICS and value > 0, (e["id"], metric)
        for metric in ("mfu", "hfu"):
            values = [e["value"]] if e["metric"] == metric else []
            values += [v for k, v in (e.get("also") or {}).items() if k == metric]
            assert all(0 < v < 1 for v in values), (e["id"], "mfu / hfu are fractions")
        assert e["dtype"] in ("bf16", "fp16", "fp8", "fp32", None), e["id"]
        assert e["recompute"] in (*RECOMPUTES, None), e["id"]
        assert e.get("quant", "none") in QUANT_METHODS, e["id"]
        assert "http" in e["source"] and e["notes"], e["id"]


def test_published_layouts_multiply_out(published):
    for e in published:
        assert e["gpus"] == e["tp"] * e["pp"] * e["dp"] * e.get("cp", 1) * e.get("ep", 1), e["id"]
        if e["kind"] == "serve":
            assert e["seq"] == e["input_len"] + e["output_len"], e["id"]


def test_published_presets_exist(published):
    models, hardwares = set(preset_names("model")), set(preset_names("hardware"))
    workloads = set(preset_names("workload"))
    for e in published:
        assert e["model"] is None or e["model"] in models, (e["id"], e["model"])
        assert e["hardware"] is None or e["hardware"] in hardwares, (e["id"], e["hardware"])
        assert e.get("workload") is None or e["workload"] in workloads, (e["id"], e["workload"])


def test_a_shaped_entry_names_an_existing_base_and_model_fields(published):
    from dataclasses import fields

    from memsweep.specs import ModelSpec

    names = {f.name for f in fields(ModelSpec)}
    shaped = [e for e in published if e.get("shape")]
    assert shaped
    for e in shaped:
        shape = dict(e["shape"])
        assert shape.pop("base") in preset_names("model") and set(shape) <= names, e["id"]
