"""A Hugging Face `config.json` as a `ModelSpec`, read locally, without `transformers`.

    spec = spec_from_file("path/to/config.json")        # or a snapshot folder holding one

Each supported `model_type` maps its config keys onto ModelSpec fields. A key the config does not
set takes the default of that model type's configuration class in transformers 5.23.0 (written
out below, so the analytic path never imports transformers). A key that changes the architecture
in a way memsweep does not model (ALiBi, an unknown activation, biases where a family has none) is
a one-line `ConfigError` naming the key, never a silent approximation; keys that change neither
parameters nor memory (token ids, epsilons, RoPE bases and scaling, dropouts, initialisation) are
ignored, and any other unknown key is refused too.

`tests/test_hf_config.py` checks every mapping against the real model classes: the parameter
count of the spec equals `num_parameters()` of the transformers model built on the meta device.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memsweep.errors import ConfigError
from memsweep.specs import ModelSpec

# Keys that change neither the parameters nor the memory of a step.
HARMLESS = frozenset("""
_name_or_path architectures auto_map model_type transformers_version torch_dtype dtype use_cache
bos_token_id eos_token_id pad_token_id sep_token_id cls_token_id mask_token_id decoder_start_token_id
unk_token_id image_token_index boi_token_index eoi_token_index image_token_id
initializer_range initializer_factor init_std embedding_init_std rms_norm_eps layer_norm_eps
layer_norm_epsilon norm_eps norm_epsilon rope_theta rope_scaling rope_parameters rotary_emb_base rope_type
attention_dropout hidden_dropout hidden_dropout_prob attention_probs_dropout_prob attn_pdrop
resid_pdrop embd_pdrop summary_first_dropout classifier_dropout dropout embedding_dropout
output_router_logits router_aux_loss_coef router_z_loss_coef aux_loss_alpha seq_aux
pretraining_tp quantization_config model_max_length initial_context_length
attn_logit_softcapping final_logit_softcapping query_pre_attn_scalar logit_scale
embedding_multiplier residual_multiplier attention_multiplier logits_scaling
scale_attn_weights scale_attention_softmax_in_fp32 attention_softmax_in_fp32
scale_attn_by_inverse_layer_idx reorder_and_upcast_attn summary_activation summary_proj_to_labels
summary_type summary_use_proj task_specific_params gradient_checkpointing position_embedding_type
is_decoder use_return_dict return_dict output_attentions output_hidden_states
tokenizer_class prefix bad_words_ids num_nextn_predict_layers topk_method routed_scaling_factor
scoring_func norm_topk_prob topk_group n_group ep_size moe_layer_freq swiglu_limit
rope_local_base_freq cache_implementation runner_max_sequence_length bias_dropout_fusion
use_flash_attn apply_residual_connection_post_layernorm clip_qkv max_window_layers
use_sliding_window layer_types sliding_window_pattern _sliding_window_pattern
rope_interleave qk_layernorm use_qk_norm vision_config text_config mm_tokens_per_image
n_ctx original_max_position_embeddings use_mrope residual_dropout expert_interval
embd_pdrop attention_probs_dropout_prob classifier_dropout
""".split())
# n_ctx: GPT-2's context, equal to n_positions; expert_interval: an unused Qwen1.5-MoE key (HF's
# Qwen2MoeConfig reads decoder_sparse_step); use_mrope: Qwen2-VL position ids, not shapes.

# transformers 5.23.0 configuration-class defaults of the keys read below, per model_type.
DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(num_key_value_heads=None, tie_word_embeddings=False, attention_bias=False,
                  mlp_bias=False, hidden_act="silu", max_position_embeddings=2048, vocab_size=32000),
    "mistral": dict(num_key_value_heads=8, tie_word_embeddings=False, hidden_act="silu",
                    sliding_window=4096, max_position_embeddings=131072, vocab_size=32000),
    "mixtral": dict(num_key_value_heads=8, tie_word_embeddings=False, hidden_act="silu",
                    sliding_window=None, num_local_experts=8, num_experts_per_tok=2,
                    max_position_embeddings=131072, vocab_size=32000),
    "qwen2": dict(num_key_value_heads=32, tie_word_embeddings=False, hidden_act="silu",
                  use_sliding_window=False, sliding_window=None, max_window_layers=28,
                  max_position_embeddings=32768, vocab_size=151936),
    "qwen2_moe": dict(num_key_value_heads=16, tie_word_embeddings=False, hidden_act="silu",
                      use_sliding_window=False, sliding_window=None, max_window_layers=28,
                      num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                      shared_expert_intermediate_size=5632, decoder_sparse_step=1, mlp_only_layers=[],
                      max_position_embeddings=32768, vocab_size=151936),
    "qwen3": dict(num_key_value_heads=32, head_dim=128, tie_word_embeddings=False, attention_bias=False,
                  hidden_act="silu", use_sliding_window=False, sliding_window=None, max_window_layers=28,
                  max_position_embeddings=32768, vocab_size=151936),
    "qwen3_moe": dict(num_key_value_heads=4, head_dim=None, tie_word_embeddings=False, attention_bias=False,
                      hidden_act="silu", use_sliding_window=False, sliding_window=None,
                      num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                      decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=32768,
                      vocab_size=151936),
    "gemma": dict(num_key_value_heads=16, head_dim=256, tie_word_embeddings=True, attention_bias=False,
                  hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192, vocab_size=256000),
    "gemma2": dict(num_key_value_heads=4, head_dim=256, tie_word_embeddings=True, attention_bias=False,
                   hidden_activation="gelu_pytorch_tanh", sliding_window=4096,
                   max_position_embeddings=8192, vocab_size=256000, hidden_size=2304,
                   intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8),
    "gemma3_text": dict(num_key_value_heads=4, head_dim=256, tie_word_embeddings=True, attention_bias=False,
                        hidden_activation="gelu_pytorch_tanh", sliding_window=4096, sliding_window_pattern=6,
                        max_position_embeddings=131072, vocab_size=262208, hidden_size=2304,
                        intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8),
    "phi3": dict(num_key_value_heads=None, tie_word_embeddings=False, hidden_act="silu",
                 sliding_window=None, partial_rotary_factor=1.0, max_position_embeddings=4096,
                 vocab_size=32064),
    "granite": dict(num_key_value_heads=None, tie_word_embeddings=False, attention_bias=False,
                    mlp_bias=False, hidden_act="silu", max_position_embeddings=2048, vocab_size=32000),
    "cohere": dict(num_key_value_heads=None, tie_word_embeddings=True, attention_bias=False,
                   hidden_act="silu", use_qk_norm=False, max_position_embeddings=8192, vocab_size=256000),
    "olmoe": dict(num_key_value_heads=None, tie_word_embeddings=False, attention_bias=False,
                  hidden_act="silu", num_experts=64, num_experts_per_tok=8, max_position_embeddings=4096,
                  vocab_size=50304, clip_qkv=None),
    "starcoder2": dict(num_key_value_heads=2, tie_word_embeddings=True, use_bias=True,
                       hidden_act="gelu_pytorch_tanh", sliding_window=None,
                       max_position_embeddings=4096, vocab_size=49152),
    "deepseek_v3": dict(num_key_value_heads=128, tie_word_embeddings=False, attention_bias=False,
                        hidden_act="silu", n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1,
                        first_k_dense_replace=3, moe_intermediate_size=2048, q_lora_rank=1536,
                        kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                        max_position_embeddings=4096, vocab_size=129280),
    "gpt_oss": dict(num_key_value_heads=8, head_dim=64, tie_word_embeddings=False, attention_bias=True,
                    hidden_act="silu", num_local_experts=128, num_experts_per_tok=4, sliding_window=128,
                    max_position_embeddings=131072, vocab_size=201088),
    "gpt2": dict(n_inner=None, n_positions=1024, vocab_size=50257, tie_word_embeddings=True,
                 activation_function="gelu_new"),
    "gpt_bigcode": dict(n_inner=None, n_positions=1024, vocab_size=50257, tie_word_embeddings=True,
                        multi_query=True, activation_function="gelu_pytorch_tanh"),
    "gpt_neox": dict(tie_word_embeddings=False, attention_bias=True, use_parallel_residual=True,
                     rotary_pct=0.25, hidden_act="gelu", max_position_embeddings=2048, vocab_size=50432),
    "falcon": dict(tie_word_embeddings=True, parallel_attn=True, new_decoder_architecture=False,
                   multi_query=True, bias=False, num_kv_heads=None, alibi=False, ffn_hidden_size=None,
                   num_ln_in_parallel_attn=None, max_position_embeddings=2048, vocab_size=65024),
    "bert": dict(type_vocab_size=2, max_position_embeddings=512, vocab_size=30522, hidden_act="gelu",
                 tie_word_embeddings=True),
}
MODEL_TYPES = tuple(DEFAULTS)
LLAMA_LIKE = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
              "gemma2", "gemma3_text", "phi3", "granite", "cohere", "olmoe", "starcoder2",
              "deepseek_v3", "gpt_oss")
GATED_ACTS = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu": "geglu",
              "gelu_new": "geglu", "gelu_fast": "geglu"}
PLAIN_GELU = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_python")


class _Reader:
    """Reads keys of one config with the model type's defaults, remembering which it used."""

    def __init__(self, cfg: dict[str, Any], model_type: str, key_prefix: str) -> None:
        self.cfg, self.model_type, self.prefix = cfg, model_type, key_prefix
        self.used: set[str] = {"model_type"}

    def has(self, key: str) -> bool:
        return key in self.cfg

    def get(self, key: str, *aliases: str, required: bool = False) -> Any:
        for k in (key, *aliases):
            self.used.add(k)
        for k in (key, *aliases):
            if k in self.cfg:
                return self.cfg[k]
        defaults = DEFAULTS[self.model_type]
        for k in (key, *aliases):
            if k in defaults:
                return defaults[k]
        if required:
            raise ConfigError(f"{self.prefix}{key}", "missing",
                              f"a value in a {self.model_type} config.json")
        return None

    def fail(self, key: str, allowed: str) -> ConfigError:
        return ConfigError(f"{self.prefix}{key}", self.cfg.get(key, DEFAULTS[self.model_type].get(key)), allowed)

    def check_unused(self) -> None:
        for key, value in self.cfg.items():
            if key not in self.used and key not in HARMLESS and not key.startswith("_"):
                raise ConfigError(f"{self.prefix}{key}", value,
                                  f"a key the {self.model_type} importer knows (memsweep does not model "
                                  "it, so it will not guess: file an issue or remove the key)")


def _pattern(kinds: list[str]) -> tuple[str, ...]:
    """The shortest repeating unit of a per-layer global/local list."""
    n = len(kinds)
    for period in range(1, n + 1):
        if all(kinds[i] == kinds[i % period] for i in range(n)):
            return tuple(kinds[:period])
    return tuple(kinds)


def _layer_kinds(r: _Reader, layers: int) -> tuple[tuple[str, ...], int]:
    """(layer_pattern, sliding_window) from `layer_types`, the type's pattern rule, or one window."""
    mt = r.model_type
    window = r.get("sliding_window", "sliding_window_size") or 0
    types = r.get("layer_types")
    if mt in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe") and types is None:
        # Qwen: sliding attention only with use_sliding_window, from layer max_window_layers on.
        first = r.get("max_window_layers") or 0
        types = ["sliding_attention" if r.get("use_sliding_window") and window and i >= first
                 else "full_attention" for i in range(layers)]
    elif mt == "gemma2" and types is None:
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    elif mt == "gemma3_text" and types is None:
        every = r.get("sliding_window_pattern", "_sliding_window_pattern") or 6
        types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(layers)]
    elif mt in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe") and not r.get("use_sliding_window"):
        types = ["full_attention"] * layers  # layer_types lists sliding layers only when enabled
    elif types is None:
        types = ["sliding_attention" if window else "full_attention"] * layers
    if not isinstance(types, list) or len(types) != layers:
        raise r.fail("layer_types", f"a list of {layers} entries (one per layer)")
    kinds = []
    for t in types:
        if t not in ("full_attention", "sliding_attention"):
            raise ConfigError(f"{r.prefix}layer_types", t, "full_attention, sliding_attention")
        kinds.append("local" if t == "sliding_attention" else "global")
    if "local" not in kinds or not window:
        return ("global",), 0
    return _pattern(kinds), int(window)


def _gated(r: _Reader) -> str:
    act = r.get("hidden_activation", "hidden_act") if r.model_type.startswith("gemma") else r.get("hidden_act")
    if act not in GATED_ACTS:
        key = "hidden_activation" if r.has("hidden_activation") else "hidden_act"
        raise r.fail(key, ", ".join(GATED_ACTS))
    return GATED_ACTS[act]


def _plain_gelu(r: _Reader, key: str) -> str:
    if r.get(key) not in PLAIN_GELU:
        raise r.fail(key, ", ".join(PLAIN_GELU))
    return "gelu"


def _llama_like(r: _Reader) -> dict[str, Any]:
    mt = r.model_type
    h = r.get("hidden_size", required=True)
    layers = r.get("num_hidden_layers", required=True)
    heads = r.get("num_attention_heads", required=True)
    kv = r.get("num_key_value_heads") or heads
    head_dim = r.get("head_dim")
    bias = bool(r.get("attention_bias")) if mt not in ("qwen2", "qwen2_moe", "starcoder2") else None
    d: dict[str, Any] = dict(
        family="llama", layers=layers, hidden=h, heads=heads, kv_heads=kv,
        ffn=r.get("intermediate_size", required=mt not in ("qwen3_moe", "olmoe", "gpt_oss")) or 0,
        vocab=r.get("vocab_size"), max_positions=r.get("max_position_embeddings"),
        norm="rmsnorm", mlp=_gated(r) if mt != "starcoder2" else _plain_gelu(r, "hidden_act"),
        position="rope", qkv_bias=bool(bias), out_bias=bool(bias), mlp_bias=False,
        tied_embeddings=bool(r.get("tie_word_embeddings")),
        head_dim=head_dim if head_dim and head_dim * heads != h else None,
    )
    if mt in ("llama", "granite"):
        d["mlp_bias"] = bool(r.get("mlp_bias"))
    if mt in ("qwen2", "qwen2_moe"):
        d["qkv_bias"] = True  # Qwen2 q, k, v always carry a bias; o_proj none
        d["out_bias"] = False
        r.get("qkv_bias")
    if mt == "starcoder2":
        if r.get("mlp_type") not in (None, "default"):
            raise r.fail("mlp_type", "default")
        if r.get("norm_type") not in (None, "layer_norm"):
            raise r.fail("norm_type", "layer_norm")
        use_bias = bool(r.get("use_bias"))
        d.update(norm="layernorm" if use_bias else "layernorm_nobias", qkv_bias=use_bias,
                 out_bias=use_bias, mlp_bias=use_bias)
    fraction = r.get("partial_rotary_factor")
    if fraction not in (None, 1, 1.0):
        d["rotary_fraction"] = float(fraction)
    if mt in ("gemma2", "gemma3_text"):
        d["block_norms"] = 4
    if mt in ("qwen3", "qwen3_moe", "gemma3_text"):
        d["qk_norm"] = "head"
    if mt == "olmoe":
        d["qk_norm"] = "full"  # (clip_qkv clips values, not shapes)
    if mt == "cohere":
        d.update(norm="layernorm_nobias", block="parallel", block_norms=1,
                 qk_norm="full" if r.get("use_qk_norm") else "none")
    if mt == "gpt_oss":
        d.update(attention_sinks=True, mlp_bias=True, router_bias=True)
    d["layer_pattern"], d["sliding_window"] = _layer_kinds(r, layers)
    d.update(_moe(r, layers))
    if mt == "deepseek_v3":
        d.update(_mla(r, heads))
    if not d["ffn"]:
        d["ffn"] = d.get("expert_ffn") or 1
    return d


def _moe(r: _Reader, layers: int) -> dict[str, Any]:
    mt = r.model_type
    if mt not in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"):
        return {}
    experts = r.get("num_local_experts", "num_experts", "n_routed_experts")
    d: dict[str, Any] = dict(experts=experts, experts_per_token=r.get("num_experts_per_tok", "experts_per_token"))
    if mt in ("qwen2_moe", "qwen3_moe", "deepseek_v3"):
        d["expert_ffn"] = r.get("moe_intermediate_size")
    elif mt == "gpt_oss":
        d["expert_ffn"] = r.get("intermediate_size")
    if mt in ("qwen2_moe", "qwen3_moe"):
        step, only = r.get("decoder_sparse_step") or 1, r.get("mlp_only_layers") or []
        # Qwen-MoE: layer i is sparse when i is not in mlp_only_layers and (i + 1) % step == 0
        d["dense_layers"] = sum(1 for i in range(layers) if i in only or (i + 1) % step)
    if mt == "qwen2_moe":
        shared = r.get("shared_expert_intermediate_size")
        if shared:
            d.update(shared_experts=1, shared_ffn=shared, shared_expert_gate=True)
    if mt == "deepseek_v3":
        d["dense_layers"] = r.get("first_k_dense_replace") or 0
        n_shared = r.get("n_shared_experts") or 0
        if n_shared:
            d.update(shared_experts=n_shared, shared_ffn=d["expert_ffn"])
    return d


def _mla(r: _Reader, heads: int) -> dict[str, Any]:
    nope, rope = r.get("qk_nope_head_dim"), r.get("qk_rope_head_dim")
    r.get("head_dim")  # DeepSeek's head_dim is the rope part; q/k heads are nope + rope
    if r.get("attention_bias"):
        raise r.fail("attention_bias", "false (MLA projections without biases)")
    return dict(head_dim=nope + rope, rope_head_dim=rope, kv_lora_rank=r.get("kv_lora_rank"),
                q_lora_rank=r.get("q_lora_rank") or 0, v_head_dim=r.get("v_head_dim"), kv_heads=heads)


def _gpt2(r: _Reader) -> dict[str, Any]:
    mt = r.model_type
    h, heads = r.get("n_embd", "hidden_size"), r.get("n_head", "num_attention_heads")
    _plain_gelu(r, "activation_function")
    mqa = mt == "gpt_bigcode" and r.get("multi_query")
    return dict(family="gpt2", layers=r.get("n_layer", "num_hidden_layers"), hidden=h, heads=heads,
                kv_heads=1 if mqa else heads, ffn=r.get("n_inner") or 4 * h, vocab=r.get("vocab_size"),
                max_positions=r.get("n_positions", "max_position_embeddings"), norm="layernorm", mlp="gelu",
                position="learned", qkv_bias=True, out_bias=True, mlp_bias=True,
                tied_embeddings=bool(r.get("tie_word_embeddings")))


def _encoder_or_neox(r: _Reader, family: str) -> dict[str, Any]:
    """The multi-head attention models with a plain GELU MLP and LayerNorms (BERT, GPT-NeoX)."""
    if r.get("hidden_act") not in PLAIN_GELU:
        raise r.fail("hidden_act", ", ".join(PLAIN_GELU))
    heads = r.get("num_attention_heads", required=True)
    return dict(family=family, layers=r.get("num_hidden_layers", required=True),
                hidden=r.get("hidden_size", required=True), heads=heads, kv_heads=heads,
                ffn=r.get("intermediate_size", required=True), vocab=r.get("vocab_size"),
                max_positions=r.get("max_position_embeddings"), norm="layernorm", mlp="gelu",
                qkv_bias=True, out_bias=True, mlp_bias=True, tied_embeddings=bool(r.get("tie_word_embeddings")))


def _gpt_neox(r: _Reader) -> dict[str, Any]:
    bias = bool(r.get("attention_bias"))
    return dict(_encoder_or_neox(r, "llama"), position="rope", qkv_bias=bias, out_bias=bias,
                rotary_fraction=float(r.get("rotary_pct")),
                block="parallel" if r.get("use_parallel_residual") else "sequential")


def _falcon(r: _Reader) -> dict[str, Any]:
    if r.get("alibi"):
        raise r.fail("alibi", "false (memsweep models rotary positions)")
    h, heads = r.get("hidden_size", required=True), r.get("num_attention_heads", required=True)
    new_arch, parallel = bool(r.get("new_decoder_architecture")), bool(r.get("parallel_attn"))
    if new_arch:  # Falcon-40B/180B: grouped KV heads, a norm for attention and one for the MLP
        kv, norms = r.get("num_kv_heads") or heads, r.get("num_ln_in_parallel_attn") or 2
    else:  # Falcon-7B: multi-query, one norm shared by the parallel attention and MLP
        kv, norms = (1 if r.get("multi_query") else heads), (1 if parallel else 2)
    bias = bool(r.get("bias"))
    return dict(family="llama", layers=r.get("num_hidden_layers", required=True), hidden=h, heads=heads,
                kv_heads=kv, ffn=r.get("ffn_hidden_size") or 4 * h, vocab=r.get("vocab_size"),
                max_positions=r.get("max_position_embeddings"), norm="layernorm", mlp="gelu",
                position="rope", qkv_bias=bias, out_bias=bias, mlp_bias=bias,
                tied_embeddings=bool(r.get("tie_word_embeddings")),
                block="parallel" if (parallel or new_arch) else "sequential", block_norms=norms)


def _bert(r: _Reader) -> dict[str, Any]:
    return dict(_encoder_or_neox(r, "bert"), position="learned", type_vocab=r.get("type_vocab_size"), pooler=True)


MAPPERS: dict[str, Callable[[_Reader], dict[str, Any]]] = {
    **{mt: _llama_like for mt in LLAMA_LIKE}, "gpt2": _gpt2, "gpt_bigcode": _gpt2,
    "gpt_neox": _gpt_neox, "falcon": _falcon, "bert": _bert,
}


def text_config(cfg: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The language model's config and its key prefix: multimodal configs (Gemma-3) nest it."""
    if cfg.get("model_type") == "gemma3" and isinstance(cfg.get("text_config"), dict):
        return {"model_type": "gemma3_text", **cfg["text_config"]}, "text_config."
    return cfg, ""


def spec_from_config(cfg: dict[str, Any], name: str) -> ModelSpec:
    """The ModelSpec of one config.json's contents (the language model of a multimodal one)."""
    if not isinstance(cfg, dict):
        raise ConfigError("model.config", type(cfg).__name__, "a JSON object (a config.json)")
    inner, prefix = text_config(cfg)
    model_type = inner.get("model_type")
    if model_type not in MAPPERS:
        raise ConfigError(f"{prefix}model_type", model_type, ", ".join(sorted(MAPPERS)))
    r = _Reader(inner, model_type, prefix)
    fields = MAPPERS[model_type](r)
    r.check_unused()
    return ModelSpec(name=name, **fields)


# The common keys of configs no mapper reads, for the record of an unmodelled model's spec
# (`unmodelled_spec`): transformers' names first, then GPT-2's, T5's and others'.
COMMON_KEYS = {
    "layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "hidden": ("hidden_size", "n_embd", "d_model", "dim"),
    "heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "kv_heads": ("num_key_value_heads", "n_head_kv", "num_kv_heads"),
    "ffn": ("intermediate_size", "n_inner", "ffn_dim", "d_ff"),
    "vocab": ("vocab_size", "n_vocab"),
    "max_positions": ("max_position_embeddings", "n_positions", "max_seq_len"),
}


def unmodelled_spec(cfg: dict[str, Any], name: str, source: str, why: str) -> ModelSpec:
    """The spec of a config.json no mapper models (`why`: the mapper's refusal), for a measurement
    by transformers alone: family `hf`, the common keys' numbers as a record (1 where a key is
    absent or not a positive integer); no formula reads them (ModelSpec.unmodelled)."""
    inner, _ = text_config(cfg)
    values = {}
    for field, keys in COMMON_KEYS.items():
        found = next((inner[k] for k in keys if k in inner), None)
        values[field] = found if isinstance(found, int) and not isinstance(found, bool) and found > 0 else 1
    return ModelSpec(name=name, family="hf", norm="rmsnorm", mlp="swiglu", position="rope", qkv_bias=False,
                     out_bias=False, mlp_bias=False, tied_embeddings=bool(inner.get("tie_word_embeddings", False)),
                     source=source, unmodelled=f"{inner.get('model_type')}: {why}", **values)


def config_path(path: str | Path) -> Path:
    """`path` itself, or the config.json inside a snapshot folder."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ConfigError("model.config", str(path), "a local config.json, or a folder holding one")
    return p


def default_name(path: str | Path) -> str:
    """A preset name from the path: the snapshot folder (or the file's stem when it is not
    called config.json), lower-cased, with anything but letters, digits, '.', '-', '_' as '-'."""
    p = config_path(path)
    stem = p.parent.name if p.name == "config.json" else p.stem
    if stem.startswith("models--"):  # a Hugging Face cache folder: models--org--name
        stem = stem.split("--")[-1]
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-") or "model"


def read_config(path: str | Path) -> dict[str, Any]:
    p = config_path(path)
    try:
        return json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError("model.config", str(path), f"a readable JSON file ({type(exc).__name__})") from None


def spec_from_file(path: str | Path, name: str | None = None) -> ModelSpec:
    return spec_from_config(read_config(path), name or default_name(path))


def preset_yaml(spec: ModelSpec, header: list[str]) -> str:
    """A conf/model/ preset for `spec`, `header` lines as comments on top. Every field is written,
    defaults too, so any of them can be overridden on the command line (`model.experts=16`)."""
    import dataclasses

    import yaml

    lines = [f"# {h}" for h in header]
    for key, value in dataclasses.asdict(spec).items():
        if key in ("source", "unmodelled"):  # run-time reads only: a preset is its own source, and modelled
            continue
        if isinstance(value, tuple):
            value = list(value)
        text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
        lines.append(f"{key}: {text.removesuffix(chr(10) + '...').strip()}")
    return "\n".join(lines) + "\n"
