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
import sys
from collections.abc import Callable
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from memsweep.errors import ConfigError
from memsweep.specs import ACTIVATIONS, MAX_INT, MAX_LAYERS, ModelSpec, check_int, check_number, check_probability

# Keys that change neither the parameters nor the memory of a step: token ids, labels, epsilons,
# RoPE bases and scaling, initialisation, output and generation settings, router losses and
# jitter (a loss term and a multiplicative noise on the router input during training), value
# clamps and scalars (soft-capping is not among them: it keeps tensors, see SOFTCAP).
NEUTRAL = frozenset("""
_name_or_path architectures auto_map model_type transformers_version torch_dtype dtype use_cache
bos_token_id eos_token_id pad_token_id sep_token_id cls_token_id mask_token_id decoder_start_token_id
unk_token_id image_token_index boi_token_index eoi_token_index image_token_id video_token_id
vision_start_token_id vision_end_token_id vision_token_id
initializer_range initializer_factor init_std embedding_init_std rms_norm_eps layer_norm_eps
layer_norm_epsilon norm_eps norm_epsilon rope_theta rope_scaling rope_type rotary_emb_base
output_router_logits router_aux_loss_coef router_z_loss_coef aux_loss_alpha seq_aux router_jitter_noise
pretraining_tp quantization_config model_max_length initial_context_length
query_pre_attn_scalar logit_scale embedding_multiplier residual_multiplier attention_multiplier
logits_scaling scale_attn_weights scale_attention_softmax_in_fp32 attention_softmax_in_fp32
scale_attn_by_inverse_layer_idx reorder_and_upcast_attn summary_activation summary_proj_to_labels
summary_type summary_use_proj summary_first_dropout task_specific_params gradient_checkpointing
position_embedding_type is_decoder use_return_dict return_dict output_attentions output_hidden_states
output_scores return_dict_in_generate tokenizer_class prefix bad_words_ids num_nextn_predict_layers num_mtp_layers
topk_method routed_scaling_factor scoring_func norm_topk_prob topk_group n_group ep_size moe_layer_freq
swiglu_limit swiglu_alpha rope_local_base_freq cache_implementation runner_max_sequence_length
bias_dropout_fusion use_flash_attn apply_residual_connection_post_layernorm clip_qkv
rope_interleave mm_tokens_per_image n_ctx original_max_position_embeddings use_mrope expert_interval
id2label label2id problem_type finetuning_task use_bfloat16 tf_legacy_loss tie_encoder_decoder
max_length min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty temperature
top_k top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size
encoder_no_repeat_ngram_size num_return_sequences forced_bos_token_id forced_eos_token_id
remove_invalid_values exponential_decay_length_penalty suppress_tokens begin_suppress_tokens
use_bidirectional_attention attn_temperature_tuning floor_scale attn_scale
projector_hidden_act vision_feature_layer vision_feature_select_strategy spatial_merge_size
multimodal_projector_bias text_config_dict vision_config_dict
""".split())
# n_ctx: GPT-2's context, equal to n_positions; expert_interval: an unused Qwen1.5-MoE key (HF's
# Qwen2MoeConfig reads decoder_sparse_step); num_nextn_predict_layers / num_mtp_layers: DeepSeek's
# multi-token-prediction layers, which transformers does not build; use_mrope: Qwen2-VL position ids, not shapes;
# use_bidirectional_attention: Gemma-3's mask for embedding models (the same tensors);
# attn_temperature_tuning / floor_scale / attn_scale: Llama-4 scales the queries of its no-RoPE
# layers by a scalar per position (one query-sized product, as RoPE makes one on the other layers).
DROPOUT = frozenset("""
attention_dropout hidden_dropout hidden_dropout_prob attention_probs_dropout_prob attn_pdrop resid_pdrop
embd_pdrop classifier_dropout dropout embedding_dropout residual_dropout projector_dropout lora_dropout
activation_dropout ffn_dropout
""".split())
# Dropout probabilities: those transformers' model reads (DROPOUT_KEYS) become ModelSpec's
# attention / hidden / embedding dropout; the rest (classifier heads, vision projectors) are
# accepted at any value, as the causal LM transformers builds does not read them.
DROPOUT_KEYS: dict[str, dict[str, tuple[str, ...]]] = {
    # ModelSpec field -> the keys whose probability it takes (the modeling code's own reads, 5.x)
    "gpt2": {"attention_dropout": ("attn_pdrop",), "hidden_dropout": ("resid_pdrop",),
             "embedding_dropout": ("embd_pdrop",)},
    "gpt_bigcode": {"attention_dropout": ("attn_pdrop",), "hidden_dropout": ("resid_pdrop",),
                    "embedding_dropout": ("embd_pdrop",)},
    "bert": {"attention_dropout": ("attention_probs_dropout_prob",), "hidden_dropout": ("hidden_dropout_prob",),
             "embedding_dropout": ("hidden_dropout_prob",)},  # BertEmbeddings' dropout
    "starcoder2": {"attention_dropout": ("attention_dropout",), "hidden_dropout": ("residual_dropout",),
                   "embedding_dropout": ("embedding_dropout",)},
    # GPTNeoXModel.emb_dropout, post_attention_dropout, post_mlp_dropout: all hidden_dropout
    "gpt_neox": {"attention_dropout": ("attention_dropout",), "hidden_dropout": ("hidden_dropout",),
                 "embedding_dropout": ("hidden_dropout",)},
    # FalconDecoderLayer: one dropout_add of (attention + MLP) in a parallel block, where memsweep
    # counts one mask per branch (a t*h bool more per layer: the safe side)
    "falcon": {"attention_dropout": ("attention_dropout",), "hidden_dropout": ("hidden_dropout",)},
    "phi3": {"attention_dropout": ("attention_dropout",), "hidden_dropout": ("resid_pdrop",)},
}
"""Per model_type; every other one reads `attention_dropout` alone (its attention interface's)."""
VISION = frozenset({"vision_config"})
# A multimodal config's vision tower: memsweep sizes the language model (text_config) only.
SOFTCAP = frozenset({"attn_logit_softcapping", "final_logit_softcapping"})
# Gemma-2's soft-capping (tanh(x / cap) * cap on the scores and on the logits) keeps the capped
# tensors for backward: read by the importer (ModelSpec.attn_softcap, final_softcap).

# transformers 4.x saved these generic PretrainedConfig keys too; 5.x no longer has them.
# Their 4.x defaults; each changes memory when set (heads pruned, cross-attention added, the
# feed-forward chunked, an encoder-decoder, TorchScript's untied copy of the embeddings).
LEGACY_GENERIC = {"add_cross_attention": False, "cross_attention_hidden_size": None, "pruned_heads": {},
                  "torchscript": False}

# Multimodal configs: the outer model_type, its text tower's model_type when text_config does not
# say, and whether transformers reads the text keys from the top level when text_config is absent
# (Qwen2-VL's hub configs are flat).
WRAPPERS: dict[str, tuple[str, bool]] = {
    "gemma3": ("gemma3_text", False), "llama4": ("llama4_text", False), "mistral3": ("mistral", False),
    "qwen2_vl": ("qwen2_vl_text", True), "qwen2_5_vl": ("qwen2_5_vl_text", True),
}

LLAMA_LIKE = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
              "gemma2", "gemma3_text", "phi3", "granite", "cohere", "olmoe", "starcoder2",
              "deepseek_v3", "gpt_oss", "llama4_text", "olmo2", "deepseek_v2", "glm4", "qwen2_vl_text",
              "qwen2_5_vl_text")
MODEL_TYPES = LLAMA_LIKE + ("gpt2", "gpt_bigcode", "gpt_neox", "falcon", "bert")
QWEN2_LIKE = ("qwen2", "qwen2_moe", "qwen2_vl_text", "qwen2_5_vl_text")
SLIDING_QWEN = QWEN2_LIKE + ("qwen3", "qwen3_moe")
GATED_ACTS = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu": "geglu",
              "gelu_new": "geglu", "gelu_fast": "geglu"}
PLAIN_GELU = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_python")


TABLE_PATH = "data/hf_keys.json"
"""Every key of the supported transformers config classes (memsweep.hf_keys builds it)."""


@cache
def load_table() -> dict[str, Any]:
    """The shipped key table (package data), read without transformers."""
    return json.loads((files("memsweep") / TABLE_PATH).read_text())


def declared(model_type: str) -> dict[str, Any]:
    """{key: declared default} of a model type's configuration class in transformers (the table)."""
    return {k: row["default"] for k, row in load_table()["types"].get(model_type, {}).items()}


def kind_of_generic(key: str) -> str:
    if key in NEUTRAL:
        return "neutral"
    return "memory"  # chunk_size_feed_forward, is_encoder_decoder


def kind_of(model_type: str, key: str, reads: set[str]) -> str:
    """A key's kind in the table (hf_keys.py explains them)."""
    if key in reads or key in SOFTCAP:
        return "read"
    if key in NEUTRAL:
        return "neutral"
    if key in DROPOUT:
        return "dropout"
    if key in VISION:
        return "vision"
    return "memory"


def keys_read(model_type: str, cfg: dict[str, Any]) -> set[str]:
    """The keys the importer reads of `cfg` (a default-constructed config's to_dict())."""
    if model_type in WRAPPERS:
        return {"text_config", "tie_word_embeddings"}
    cfg = dict(cfg)
    for _ in range(8):  # a class default the mapper needs set (DeepSeek-V2's top-k is null): 1
        r = _Reader(cfg, model_type, "")
        try:
            MAPPERS[model_type](r)
            return r.used
        except ConfigError as exc:
            cfg[exc.key] = 1
    raise RuntimeError(f"{model_type}: the importer cannot read the class's default config")


class _Reader:
    """Reads keys of one config with the model type's declared defaults (the table), remembering
    which it used; `finish` then sorts the rest: neutral keys pass, a memory-changing key it does
    not read passes at its default only, and keys transformers does not know are collected."""

    def __init__(self, cfg: dict[str, Any], model_type: str, key_prefix: str) -> None:
        self.cfg, self.model_type, self.prefix = cfg, model_type, key_prefix
        self.defaults = declared(model_type)
        self.used: set[str] = {"model_type"}

    def has(self, key: str) -> bool:
        return key in self.cfg

    def get(self, key: str, *aliases: str, required: bool = False) -> Any:
        for k in (key, *aliases):
            self.used.add(k)
        for k in (key, *aliases):
            if k in self.cfg:
                return self.cfg[k]
        for k in (key, *aliases):
            if self.defaults.get(k) is not None:
                return self.defaults[k]
        if required:
            raise ConfigError(f"{self.prefix}{key}", "missing",
                              f"a value in a {self.model_type} config.json")
        return None

    def key_of(self, key: str, *aliases: str) -> str:
        """The name under which the config holds `key` (an alias when that is what it has)."""
        return self.prefix + next((k for k in (key, *aliases) if k in self.cfg), key)

    def touch(self, *keys: str) -> None:
        """Count `keys` as read: the importer decided on them without their values (a key the
        chosen layout ignores, as transformers does)."""
        self.used.update(keys)

    def int(self, key: str, *aliases: str, minimum: int = 1, required: bool = True,
            maximum: int = MAX_INT) -> int | None:
        """An integer in [minimum, maximum] (the specs' `check_int`): JSON floats, strings,
        booleans and null are refused, named by the config's key."""
        value = self.get(key, *aliases, required=required)
        if value is None and not required:
            return None
        check_int(self.key_of(key, *aliases), value, minimum, maximum)
        return value

    def bool(self, key: str, *aliases: str) -> bool:
        value = self.get(key, *aliases)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise ConfigError(self.key_of(key, *aliases), value, "true or false")
        return value

    def fail(self, key: str, allowed: str) -> ConfigError:
        return ConfigError(f"{self.prefix}{key}", self.cfg.get(key, self.defaults.get(key)), allowed)

    def finish(self) -> list[str]:
        """Refuse a key that changes memory, is not read and is not at its default; return the
        keys no configuration class has (the caller lists them in one warning line)."""
        generic = load_table()["generic"]
        unknown = []
        for key, value in self.cfg.items():
            if key in self.used or key in NEUTRAL or key in DROPOUT or key in VISION or key.startswith("_"):
                continue
            if key in self.defaults or key in generic or key in LEGACY_GENERIC:
                default = (self.defaults[key] if key in self.defaults
                           else generic[key]["default"] if key in generic else LEGACY_GENERIC[key])
                if generic.get(key, {}).get("kind") == "neutral":
                    continue
                if _same(value, default):
                    continue
                raise ConfigError(f"{self.prefix}{key}", value,
                                  f"{default!r}, the {self.model_type} default (another value changes the "
                                  "architecture or its memory in a way memsweep does not model)")
            unknown.append(self.prefix + key)
        return unknown


def _same(value: Any, default: Any) -> bool:
    """Equal as JSON values (a tuple default equals a list; 0 equals 0.0; {} equals null)."""
    if value in (None, {}, []) and default in (None, {}, []):
        return True
    try:
        return json.loads(json.dumps(value)) == json.loads(json.dumps(default))
    except (TypeError, ValueError):
        return False


def _pattern(kinds: list[str]) -> tuple[str, ...]:
    """The shortest repeating unit of a per-layer global/local list."""
    n = len(kinds)
    for period in range(1, n + 1):
        if all(kinds[i] == kinds[i % period] for i in range(n)):
            return tuple(kinds[:period])
    return tuple(kinds)


LOCAL_TYPES = ("sliding_attention", "chunked_attention")
"""Layer types attending within a span: a sliding window (Mistral, Gemma-2/3, gpt-oss) or fixed
chunks (Llama-4's chunked attention: a token sees its own chunk of attention_chunk_size). Both
keep at most that many tokens of keys and values per layer in the cache, which is what a local
layer is to memsweep (ModelSpec.sliding_window)."""


def _layer_kinds(r: _Reader, layers: int) -> tuple[tuple[str, ...], int]:
    """(layer_pattern, sliding_window) from `layer_types`, the type's pattern rule, or one window."""
    mt = r.model_type
    if mt == "llama4_text":
        window = r.int("attention_chunk_size", required=False) or 0
        r.touch("sliding_window")
    else:
        window = r.int("sliding_window", "sliding_window_size", minimum=0, required=False) or 0
    types = r.get("layer_types")
    if mt in SLIDING_QWEN:
        r.touch("max_window_layers", "use_sliding_window")
    if mt in SLIDING_QWEN and types is None:
        # Qwen: sliding attention only with use_sliding_window, from layer max_window_layers on.
        first = r.int("max_window_layers", minimum=0, required=False) or 0
        types = ["sliding_attention" if r.bool("use_sliding_window") and window and i >= first
                 else "full_attention" for i in range(layers)]
    elif mt == "gemma2" and types is None:
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    elif mt == "gemma3_text" and types is None:
        every = r.int("sliding_window_pattern", "_sliding_window_pattern", required=False) or 6
        types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(layers)]
    elif mt == "llama4_text" and types is None:
        # transformers: chunked attention on the layers that use RoPE (no_rope_layers[i] == 1)
        nope = _no_rope_layers(r, layers)
        types = ["chunked_attention" if rope else "full_attention" for rope in nope]
    elif mt in SLIDING_QWEN and not r.bool("use_sliding_window"):
        types = ["full_attention"] * layers  # layer_types lists sliding layers only when enabled
    elif types is None:
        types = ["sliding_attention" if window else "full_attention"] * layers
    else:  # layer_types decides; the pattern keys are transformers' defaults for it
        r.touch("sliding_window_pattern", "_sliding_window_pattern")
    if not isinstance(types, list) or len(types) != layers:
        raise r.fail("layer_types", f"a list of {layers} entries (one per layer)")
    kinds = []
    for t in types:
        if t not in ("full_attention",) + LOCAL_TYPES:
            raise ConfigError(f"{r.prefix}layer_types", t, ", ".join(("full_attention",) + LOCAL_TYPES))
        kinds.append("local" if t in LOCAL_TYPES else "global")
    if "local" not in kinds or not window:
        return ("global",), 0
    return _pattern(kinds), int(window)


def _no_rope_layers(r: _Reader, layers: int) -> list[int]:
    """Llama-4: 1 where a layer uses RoPE; by default every no_rope_layer_interval-th is NoPE."""
    nope = r.get("no_rope_layers")
    every = r.int("no_rope_layer_interval", required=False) or 4
    if not nope:
        nope = [int((i + 1) % every != 0) for i in range(layers)]
    if not isinstance(nope, list) or len(nope) != layers or any(v not in (0, 1) for v in nope):
        raise r.fail("no_rope_layers", f"a list of {layers} entries of 0 or 1")
    return nope


def _gated(r: _Reader) -> str:
    key = "hidden_activation" if r.model_type.startswith("gemma") and r.has("hidden_activation") else "hidden_act"
    act = r.get("hidden_activation", "hidden_act") if r.model_type.startswith("gemma") else r.get("hidden_act")
    if not isinstance(act, str) or act not in GATED_ACTS:
        raise r.fail(key, ", ".join(GATED_ACTS))
    return GATED_ACTS[act]


def _activation(value: Any) -> str:
    """ModelSpec.activation of a hidden_act: the GELUs transformers writes out op by op keep their
    name; every other GELU and SiLU is one kernel."""
    return value if value in ACTIVATIONS else "fused"


def _plain_gelu(r: _Reader, key: str) -> str:
    if r.get(key) not in PLAIN_GELU:
        raise r.fail(key, ", ".join(PLAIN_GELU))
    return "gelu"


def _heads(r: _Reader, h: int) -> tuple[int, int, int | None]:
    """(heads, kv_heads, head_dim or None when hidden / heads): 0 is refused, not taken as unset."""
    heads = r.int("num_attention_heads")
    kv = r.int("num_key_value_heads", minimum=1, required=False)
    head_dim = r.int("head_dim", required=False)
    return heads, kv or heads, head_dim if head_dim and head_dim * heads != h else None


def _rotary_fraction(r: _Reader, key: str = "partial_rotary_factor", default: float = 1.0) -> float | None:
    """The rotated fraction of each head: `key` at the top level (a hub file's), or inside
    rope_parameters (where transformers 5 moves it, and a to_dict() writes it), or `default`.
    None when it is 1 (every dimension rotates)."""
    fraction = r.get(key)
    rope = r.get("rope_parameters")
    if fraction is None and isinstance(rope, dict):
        fraction = rope.get("partial_rotary_factor")
    if fraction is None:
        fraction = default
    if fraction in (1, 1.0):
        return None
    return check_number(r.key_of(key), fraction, 0.0, 1.0, above_minimum=True)


def _softcap(r: _Reader, key: str) -> float:
    value = r.get(key)
    if value is None:
        return 0.0
    return check_number(r.key_of(key), value, 0.0, allowed="a number >= 0, or null (no soft-capping)")


def _llama_like(r: _Reader) -> dict[str, Any]:
    mt = r.model_type
    h = r.int("hidden_size")
    layers = r.int("num_hidden_layers", maximum=MAX_LAYERS)
    heads, kv, head_dim = _heads(r, h)
    bias = r.bool("attention_bias") if mt not in QWEN2_LIKE + ("starcoder2",) else None
    ffn_key = "intermediate_size_mlp" if mt == "llama4_text" else "intermediate_size"
    d: dict[str, Any] = dict(
        family="llama", layers=layers, hidden=h, heads=heads, kv_heads=kv,
        ffn=r.int(ffn_key, required=mt not in ("qwen3_moe", "olmoe", "gpt_oss")) or 0,
        vocab=r.int("vocab_size"), max_positions=r.int("max_position_embeddings"),
        norm="rmsnorm", mlp=_gated(r) if mt != "starcoder2" else _plain_gelu(r, "hidden_act"),
        position="rope", qkv_bias=bool(bias), out_bias=bool(bias), mlp_bias=False,
        tied_embeddings=r.bool("tie_word_embeddings"), head_dim=head_dim,
    )
    if d["mlp"] != "swiglu":
        d["activation"] = _activation(r.get("hidden_activation", "hidden_act") if mt.startswith("gemma")
                                      else r.get("hidden_act"))
    if mt in ("llama", "granite", "deepseek_v2"):
        d["mlp_bias"] = r.bool("mlp_bias")
    if mt in QWEN2_LIKE:
        d["qkv_bias"] = True  # Qwen2 q, k, v always carry a bias; o_proj none
        d["out_bias"] = False
        r.get("qkv_bias")
    if mt == "glm4":  # GLM-4: q, k, v biased by attention_bias, o_proj never; 4 norms per block
        d.update(out_bias=False, block_norms=4)
    if mt == "starcoder2":
        if r.get("mlp_type") not in (None, "default"):
            raise r.fail("mlp_type", "default")
        if r.get("norm_type") not in (None, "layer_norm"):
            raise r.fail("norm_type", "layer_norm")
        use_bias = r.bool("use_bias")
        d.update(norm="layernorm" if use_bias else "layernorm_nobias", qkv_bias=use_bias,
                 out_bias=use_bias, mlp_bias=use_bias)
    fraction = _rotary_fraction(r, default=0.5 if mt == "glm4" else 1.0)
    if fraction is not None:
        d["rotary_fraction"] = fraction
    if mt in ("gemma2", "gemma3_text"):
        d["block_norms"] = 4
    if mt in ("qwen3", "qwen3_moe", "gemma3_text"):
        d["qk_norm"] = "head"
    if mt in ("olmoe", "olmo2"):
        d["qk_norm"] = "full"  # (clip_qkv clips values, not shapes)
    if mt == "llama4_text":
        if r.bool("use_qk_norm"):
            d["qk_norm"] = "l2"  # Llama4TextL2Norm: per head, no weight
        _no_rope_layers(r, layers)
    if mt == "cohere":
        d.update(norm="layernorm_nobias", block="parallel", block_norms=1,
                 qk_norm="full" if r.bool("use_qk_norm") else "none")
    if mt == "gpt_oss":
        d.update(attention_sinks=True, mlp_bias=True, router_bias=True)
    if mt in ("gemma2", "gemma3_text"):
        d.update(attn_softcap=_softcap(r, "attn_logit_softcapping"),
                 final_softcap=_softcap(r, "final_logit_softcapping"))
    d["layer_pattern"], d["sliding_window"] = _layer_kinds(r, layers)
    d.update(_moe(r, layers))
    if mt in ("deepseek_v2", "deepseek_v3"):
        d.update(_mla(r, heads))
    if not d["ffn"]:
        d["ffn"] = d.get("expert_ffn") or 1
    return d


MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss", "llama4_text")


def _moe(r: _Reader, layers: int) -> dict[str, Any]:
    mt = r.model_type
    if mt not in MOE_TYPES:
        return {}
    experts = r.int("num_local_experts", "num_experts", "n_routed_experts", minimum=1)
    d: dict[str, Any] = dict(experts=experts,
                             experts_per_token=r.int("num_experts_per_tok", "experts_per_token", minimum=1))
    if d["experts_per_token"] > experts:
        raise ConfigError(r.key_of("num_experts_per_tok", "experts_per_token"), d["experts_per_token"],
                          f"at most the {experts} experts")
    if mt in ("qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"):
        d["expert_ffn"] = r.int("moe_intermediate_size")
    elif mt in ("gpt_oss", "llama4_text"):
        d["expert_ffn"] = r.int("intermediate_size")
    if mt in ("qwen2_moe", "qwen3_moe"):
        step, only = r.int("decoder_sparse_step", required=False) or 1, r.get("mlp_only_layers") or []
        if not isinstance(only, list):
            raise r.fail("mlp_only_layers", "a list of layer numbers")
        # Qwen-MoE: layer i is sparse when i is not in mlp_only_layers and (i + 1) % step == 0
        d["dense_layers"] = sum(1 for i in range(layers) if i in only or (i + 1) % step)
    if mt == "qwen2_moe":
        shared = r.int("shared_expert_intermediate_size", minimum=0, required=False)
        if shared:
            d.update(shared_experts=1, shared_ffn=shared, shared_expert_gate=True)
    if mt in ("deepseek_v2", "deepseek_v3"):
        d["router_fp32_logits"] = True  # DeepseekV2/V3TopkRouter: F.linear(hidden.float(), weight.float())
        d["dense_layers"] = min(r.int("first_k_dense_replace", minimum=0, required=False) or 0, layers)
        n_shared = r.int("n_shared_experts", minimum=0, required=False) or 0
        if n_shared:  # DeepSeek-V2 runs them as one MLP n_shared times as wide: the same weights
            d.update(shared_experts=n_shared, shared_ffn=d["expert_ffn"])
    if mt == "llama4_text":
        # Llama-4: MoE layers listed, or every interleave_moe_layer_step-th; the others a dense MLP
        # of intermediate_size_mlp; each MoE layer adds one shared expert of intermediate_size.
        moe = r.get("moe_layers")
        if moe is None:
            step = r.int("interleave_moe_layer_step", required=False) or 1
            moe = list(range(step - 1, layers, step))
        else:
            r.get("interleave_moe_layer_step")
        if not isinstance(moe, list) or any(not isinstance(i, int) or not 0 <= i < layers for i in moe):
            raise r.fail("moe_layers", f"a list of layer numbers in [0, {layers})")
        d.update(dense_layers=layers - len(set(moe)), shared_experts=1, shared_ffn=d["expert_ffn"])
    return d


def _mla(r: _Reader, heads: int) -> dict[str, Any]:
    nope, rope = r.int("qk_nope_head_dim"), r.int("qk_rope_head_dim")
    r.get("head_dim")  # DeepSeek's head_dim is the rope part; q/k heads are nope + rope
    qk = r.get("qk_head_dim")  # transformers derives it; a saved to_dict() writes it
    if qk is not None and qk != nope + rope:
        raise r.fail("qk_head_dim", f"qk_nope_head_dim + qk_rope_head_dim = {nope + rope}")
    if r.get("attention_bias"):
        raise r.fail("attention_bias", "false (MLA projections without biases)")
    return dict(head_dim=nope + rope, rope_head_dim=rope, kv_lora_rank=r.int("kv_lora_rank"),
                q_lora_rank=r.int("q_lora_rank", required=False) or 0, v_head_dim=r.int("v_head_dim"),
                kv_heads=heads)


def _gpt2(r: _Reader) -> dict[str, Any]:
    mt = r.model_type
    h, heads = r.int("n_embd", "hidden_size"), r.int("n_head", "num_attention_heads")
    _plain_gelu(r, "activation_function")
    mqa = mt == "gpt_bigcode" and r.bool("multi_query")
    if mt == "gpt_bigcode":  # transformers derives it from multi_query; a to_dict() writes it
        kv = r.get("num_key_value_heads")
        if kv is not None and kv != (1 if mqa else heads):
            raise r.fail("num_key_value_heads", f"{1 if mqa else heads} (multi_query={str(mqa).lower()})")
    return dict(family="gpt2", layers=r.int("n_layer", "num_hidden_layers", maximum=MAX_LAYERS), hidden=h,
                heads=heads, kv_heads=1 if mqa else heads, ffn=r.int("n_inner", required=False) or 4 * h,
                vocab=r.int("vocab_size"), max_positions=r.int("n_positions", "max_position_embeddings"),
                norm="layernorm", mlp="gelu", position="learned", qkv_bias=True, out_bias=True, mlp_bias=True,
                tied_embeddings=r.bool("tie_word_embeddings"))


def _encoder_or_neox(r: _Reader, family: str) -> dict[str, Any]:
    """The multi-head attention models with a plain GELU MLP and LayerNorms (BERT, GPT-NeoX)."""
    if r.get("hidden_act") not in PLAIN_GELU:
        raise r.fail("hidden_act", ", ".join(PLAIN_GELU))
    heads = r.int("num_attention_heads")
    return dict(family=family, layers=r.int("num_hidden_layers", maximum=MAX_LAYERS),
                hidden=r.int("hidden_size"), heads=heads, kv_heads=heads,
                ffn=r.int("intermediate_size"), vocab=r.int("vocab_size"),
                max_positions=r.int("max_position_embeddings"), norm="layernorm", mlp="gelu",
                qkv_bias=True, out_bias=True, mlp_bias=True, tied_embeddings=r.bool("tie_word_embeddings"))


def _gpt_neox(r: _Reader) -> dict[str, Any]:
    bias = r.bool("attention_bias")
    fraction = _rotary_fraction(r, "rotary_pct", default=0.25)  # GPTNeoXConfig's default
    return dict(_encoder_or_neox(r, "llama"), position="rope", qkv_bias=bias, out_bias=bias,
                activation=_activation(r.get("hidden_act")),
                rotary_fraction=fraction or 1.0,
                block="parallel" if r.bool("use_parallel_residual") else "sequential")


def _falcon(r: _Reader) -> dict[str, Any]:
    if r.get("alibi"):
        raise r.fail("alibi", "false (memsweep models rotary positions)")
    if _rotary_fraction(r) is not None:
        raise r.fail("partial_rotary_factor", "1 (Falcon rotates every dimension)")
    if r.get("activation") not in PLAIN_GELU:
        raise r.fail("activation", ", ".join(PLAIN_GELU))
    h, heads = r.int("hidden_size"), r.int("num_attention_heads")
    new_arch, parallel = r.bool("new_decoder_architecture"), r.bool("parallel_attn")
    r.touch("num_kv_heads", "num_ln_in_parallel_attn")  # read by the new architecture only
    if new_arch:  # Falcon-40B/180B: grouped KV heads, a norm for attention and one for the MLP
        kv = r.int("num_kv_heads", required=False) or heads
        norms = r.int("num_ln_in_parallel_attn", required=False) or 2
    else:  # Falcon-7B: multi-query, one norm shared by the parallel attention and MLP
        kv, norms = (1 if r.bool("multi_query") else heads), (1 if parallel else 2)
    bias = r.bool("bias")
    return dict(family="llama", layers=r.int("num_hidden_layers", maximum=MAX_LAYERS), hidden=h, heads=heads,
                kv_heads=kv, ffn=r.int("ffn_hidden_size", required=False) or 4 * h, vocab=r.int("vocab_size"),
                max_positions=r.int("max_position_embeddings"), norm="layernorm", mlp="gelu",
                position="rope", qkv_bias=bias, out_bias=bias, mlp_bias=bias, activation=_activation(r.get("activation")),
                tied_embeddings=r.bool("tie_word_embeddings"), sdpa_mask=True,
                block="parallel" if (parallel or new_arch) else "sequential", block_norms=norms)


def _bert(r: _Reader) -> dict[str, Any]:
    return dict(_encoder_or_neox(r, "bert"), position="learned",
                type_vocab=r.int("type_vocab_size", minimum=0), pooler=True)


MAPPERS: dict[str, Callable[[_Reader], dict[str, Any]]] = {
    **{mt: _llama_like for mt in LLAMA_LIKE}, "gpt2": _gpt2, "gpt_bigcode": _gpt2,
    "gpt_neox": _gpt_neox, "falcon": _falcon, "bert": _bert,
}


def _dropouts(r: _Reader) -> dict[str, float]:
    """ModelSpec's dropout probabilities from the keys transformers' model reads (DROPOUT_KEYS)."""
    out = {}
    for field, keys in DROPOUT_KEYS.get(r.model_type, {"attention_dropout": ("attention_dropout",)}).items():
        value = r.get(*keys)
        if value is None:
            continue
        out[field] = check_probability(r.key_of(*keys), value)
    return out


def text_config(cfg: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The language model's config and its key prefix: a multimodal config (Gemma-3, Llama-4,
    Mistral-3, Qwen2-VL / Qwen2.5-VL) nests it in text_config, or (Qwen's hub files) keeps the
    text keys at the top level. Tying is the outer config's (transformers 5 ties the whole
    model's lm_head by it; Qwen-VL also honours a text_config that ties, as transformers does)."""
    outer = cfg.get("model_type")
    if not isinstance(outer, str) or outer not in WRAPPERS:
        return cfg, ""
    inner_type, flat = WRAPPERS[outer]
    text = cfg.get("text_config")
    if isinstance(text, dict):
        inner, prefix = {"model_type": inner_type, **text}, "text_config."
    elif text is None and flat:
        own = set(load_table()["types"].get(outer, {})) | NEUTRAL | VISION
        inner, prefix = {k: v for k, v in cfg.items() if k not in own or k in declared(inner_type)}, ""
        inner["model_type"] = inner_type
    elif text is None:
        inner, prefix = {"model_type": inner_type}, "text_config."
    else:
        raise ConfigError("text_config", type(text).__name__, "a JSON object (the language model's config)")
    tie = cfg.get("tie_word_embeddings", declared(outer).get("tie_word_embeddings"))
    if outer in ("qwen2_vl", "qwen2_5_vl"):
        tie = bool(tie) or bool(inner.get("tie_word_embeddings"))
    inner["tie_word_embeddings"] = tie
    return inner, prefix


def import_config(cfg: dict[str, Any], name: str) -> tuple[ModelSpec, list[str]]:
    """The ModelSpec of one config.json's contents (the language model of a multimodal one), and
    the keys no configuration class of transformers has (ignored, as transformers ignores them)."""
    if not isinstance(cfg, dict):
        raise ConfigError("model.config", type(cfg).__name__, "a JSON object (a config.json)")
    inner, prefix = text_config(cfg)
    model_type = inner.get("model_type")
    if not isinstance(model_type, str) or model_type not in MAPPERS:
        raise ConfigError(f"{prefix}model_type", model_type, ", ".join(sorted(set(MAPPERS) | set(WRAPPERS))))
    r = _Reader(inner, model_type, prefix)
    fields = MAPPERS[model_type](r)
    fields.update(_dropouts(r))
    unknown = r.finish()
    if prefix and cfg.get("model_type") in WRAPPERS:  # the outer keys of a multimodal config
        outer = _Reader({k: v for k, v in cfg.items() if k != "text_config"}, cfg["model_type"], "")
        outer.used |= {"text_config", "tie_word_embeddings"}
        unknown = outer.finish() + unknown
    return ModelSpec(name=name, **fields), unknown


_WARNED: set[tuple[str, ...]] = set()


def spec_from_config(cfg: dict[str, Any], name: str, warn: Callable[[str], None] | None = None) -> ModelSpec:
    """`import_config`'s spec; unknown keys are listed in one line through `warn` (default: once
    per set of keys, on stderr), and the import goes on."""
    spec, unknown = import_config(cfg, name)
    if unknown:
        line = (f"warning: {name}: {len(unknown)} key(s) no transformers {cfg.get('model_type')} config has, "
                f"ignored: {', '.join(unknown)}")
        if warn is not None:
            warn(line)
        elif (name, *unknown) not in _WARNED:
            _WARNED.add((name, *unknown))
            print(line, file=sys.stderr)
    return spec


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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
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
