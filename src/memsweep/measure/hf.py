"""`measure.impl=hf` (issue 12, first part): the step users run, with Hugging Face transformers.

The model is `AutoModelForCausalLM.from_config` of a transformers config built from the job's
ModelSpec (random init, no weights, no network), in the job's dtype and `attn_implementation`,
run the way users write it: `model(input_ids=ids, labels=ids).loss` (transformers shifts the
labels itself), `torch.autocast` for mixed precision, `activation_checkpointing_enable()` for
full recompute, LoRA through `peft.get_peft_model` with the job's rank and targets, and inference
through a real `DynamicCache` (prefill keeping one logit, then greedy decoding of every generated
token). The model's own defaults are kept, e.g. `use_cache=True` during training, which builds a
cache users pay for too.

Under FakeTensorMode the model is built on the meta device, with the dispatch modes off, and each
parameter and buffer then becomes a fake CPU tensor (`_fake_parameters`): `Module.to()`, which
peft calls on every adapter it adds, swaps the parameters of a module, and that fails for fake
ones (torch.nn.Module._apply, "Couldn't swap"). A real run (`measure=cpu`) builds on the device.

Adapters: fp32 when mixed, the job's dtype when pure, as the reference models keep them (peft's
own default, `autocast_adapter_dtype=True`, would make them fp32 in a pure bf16 model too).

Presets: dense llama-family models the config classes below express exactly (llama, qwen2's
q/k/v biases, mistral's all-layer sliding window) and gpt2. `model=hf model.config=PATH`: the
config.json itself (`source_config`), any model_type transformers builds (MoE, MLA, Gemma, ...).
What cannot run here is `status=skipped` with the reason (README, Measurement): a preset feature
the classes below cannot express, selective recompute, an attention transformers lacks for a
model, MoE experts with fp32 masters, LoRA module names not mapped. transformers and peft are the
optional `hf` extra: without them the job is skipped and says how to install them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from importlib.resources import files

import torch

from memsweep.hf_config import COMMON_KEYS, read_config, spec_from_config, text_config
from memsweep.measure.models import as_a_decode_step_leaves_it, new_tokens
from memsweep.measure.parallel import shard
from memsweep.measure.tracker import StorageTracker
from memsweep.measure.workloads import (
    Prepared, Unmeasurable, _NoTracker, check_layout, check_techniques, storage_dtypes, train_step,
)
from memsweep.specs import JobSpec, ModelSpec

INSTALL = "pip install -e '.[hf]'"


def _outside_modes():
    """Imports run with the dispatch modes off: transformers and peft create module-level tensors
    when first imported (peft's LoHa: `scale=torch.tensor(1)` defaults), which would otherwise be
    fake, or counted in the first measured job of a process and no later one."""
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


def _optional(name: str, needed_for: str):
    """An optional package of the `hf` extra, imported outside the dispatch modes; missing, the
    job is skipped and says how to install it."""
    import importlib

    try:
        with _outside_modes():
            return importlib.import_module(name)
    except ImportError as exc:
        raise Unmeasurable(f"{needed_for} needs {name} ({exc}); install: {INSTALL}") from None


def _transformers():
    return _optional("transformers", "measure.impl=hf")


def _peft():
    return _optional("peft", "measure.impl=hf with workload=lora")


def auto_class(tf, cfg):
    """The class users train: a causal LM, or BERT's masked LM (memsweep's bert workload)."""
    return tf.AutoModelForMaskedLM if cfg.model_type == "bert" else tf.AutoModelForCausalLM


def _import_model_code(tf, cfg) -> None:
    """transformers imports a model's module (and its tensors) on first use: do it now, outside."""
    with _outside_modes():
        auto_class(tf, cfg)._model_mapping[type(cfg)]  # noqa: B018 (the lazy import)
        tf.DynamicCache  # noqa: B018


# memsweep's LoRA targets as the module names of transformers' models, per model_type (one name
# for several targets: a fused matrix, which takes one adapter)
_LLAMA = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
          "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
LORA_MODULES: dict[str, dict[str, str | tuple[str, ...]]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "granite",
                     "cohere"), _LLAMA),
    "starcoder2": {**_LLAMA, "up": "c_fc", "down": "c_proj"},
    "phi3": {"q": "qkv_proj", "k": "qkv_proj", "v": "qkv_proj", "o": "o_proj",
             "gate": "gate_up_proj", "up": "gate_up_proj", "down": "down_proj"},
    **dict.fromkeys(("gpt2", "gpt_bigcode"), {"q": "c_attn", "k": "c_attn", "v": "c_attn", "o": "attn.c_proj",
                                              "up": "c_fc", "down": "mlp.c_proj"}),
    "gpt_neox": {"q": "query_key_value", "k": "query_key_value", "v": "query_key_value",
                 "o": "attention.dense", "up": "dense_h_to_4h", "down": "dense_4h_to_h"},
    "falcon": {"q": "query_key_value", "k": "query_key_value", "v": "query_key_value",
               "o": "self_attention.dense", "up": "dense_h_to_4h", "down": "dense_4h_to_h"},
    # MoE models: attention only. Their routed experts are 3-D parameters (gate_up_proj, down_proj
    # of shape (E, ., .)), not nn.Linear modules, so peft's target_modules cannot adapt them.
    **dict.fromkeys(("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"),
                    {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}),
    # MLA (memsweep's lora_params): q adapts q_a and q_b (or q_proj), k the joint kv_a, v kv_b
    "deepseek_v3": {"q": ("q_a_proj", "q_b_proj", "q_proj"), "k": "kv_a_proj_with_mqa", "v": "kv_b_proj",
                    "o": "o_proj"},
}


def peft_target_modules(model_type: str, targets: tuple[str, ...]) -> list[str]:
    """peft's `target_modules` for memsweep's targets. Where transformers fuses matrices (GPT-2's
    `c_attn` holds q, k and v; Phi-3's `gate_up_proj`), the fused matrix takes one adapter, so
    its targets are adapted together or not at all."""
    names = LORA_MODULES.get(model_type)
    if names is None:
        raise Unmeasurable(f"measure.impl=hf: LoRA module names of model_type {model_type} are not mapped yet; "
                           f"mapped: {', '.join(sorted(LORA_MODULES))}")
    out: list[str] = []
    for t in targets:
        if t not in names:
            raise Unmeasurable(f"measure.impl=hf: {model_type}'s {t} is not an nn.Linear module peft adapts "
                               f"(its MoE experts are 3-D parameters); adaptable: {', '.join(names)}")
        module = names[t]
        together = sorted(k for k, v in names.items() if v == module)
        if not set(together) <= set(targets):
            raise Unmeasurable(f"measure.impl=hf: {model_type}'s {', '.join(together)} are one matrix ({module}), "
                               f"adapted as one; workload.lora_targets={list(targets)} names only "
                               f"{sorted(set(together) & set(targets))} of them")
        for name in (module,) if isinstance(module, str) else module:
            if name not in out:
                out.append(name)
    return out


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return next((m for m in _get_current_dispatch_mode_stack() if isinstance(m, FakeTensorMode)), None)


def _fake_parameters(model: torch.nn.Module, mode, device: str) -> None:
    """Replace every parameter and buffer by a fake tensor on `device` (shared ones once): meta
    tensors by shape, real ones (e.g. RoPE caches built on the CPU) from their values; a wrapper
    subclass (torchao's NF4Tensor) keeps its class, its inner tensors made fake."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    conv, made = mode.fake_tensor_converter, {}  # id -> (the tensor, kept alive so ids stay unique; its fake)

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            if is_traceable_wrapper_subclass(t):
                names, ctx = t.__tensor_flatten__()
                out = type(t).__tensor_unflatten__({n: fake(getattr(t, n)) for n in names}, ctx, t.size(), t.stride())
            elif t.is_meta:
                out = conv.from_meta_and_device(mode, t, torch.device(device))
            else:
                out = mode.from_tensor(t)
            made[id(t)] = (t, out)
        return made[id(t)][1]

    params: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in params:
                    inner = p if is_traceable_wrapper_subclass(p) else p.data
                    params[id(p)] = torch.nn.Parameter(fake(inner), requires_grad=p.requires_grad)
                module._parameters[name] = params[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = fake(b)


def not_llama_like(m: ModelSpec, **more: bool) -> str | None:
    """What `m` has that a llama-style dense decoder (RMSNorm, SwiGLU, full rotary, two norms a
    block, sequential, no MoE / MLA / q-k norms / sinks) has not, and the `more` features a caller
    cannot build, named; None when nothing. transformers' llama-family classes (`unsupported`) and
    torchtune's builders (measure/torchtune.py) build such decoders."""
    features = {
        "mixture of experts": m.experts > 0, "MLA": m.mla, "parallel blocks": m.block == "parallel",
        f"norm={m.norm}": m.norm != "rmsnorm", f"mlp={m.mlp}": m.mlp != "swiglu",
        f"block_norms={m.block_norms}": m.block_norms != 2, f"qk_norm={m.qk_norm}": m.qk_norm != "none",
        "partial rotary": m.rotary_fraction != 1.0, "attention sinks": m.attention_sinks, **more,
    }
    return ", ".join(name for name, on in features.items() if on) or None


def unsupported(m: ModelSpec) -> str | None:
    """Why this slice cannot express `m` as a transformers config yet (None: it can)."""
    if m.family == "bert":
        return "encoders (bert)"
    if m.family == "gpt2":
        return None if m.tied_embeddings and m.position == "learned" else "a gpt2 variant"
    return not_llama_like(m, **{"a mix of local and global layers": 0 < m.local_layers < m.layers,
                                "an output bias without q/k/v biases": m.out_bias and not m.qkv_bias})


def source_config(m: ModelSpec):
    """The transformers config of the config.json `m` was read from (`model=hf model.config=PATH`):
    the file itself, every key as written (the language model's part of a multimodal one)."""
    inner, _ = text_config(read_config(m.source))
    return _auto_config(inner)


def _auto_config(inner: dict):
    """transformers' config class of a (language model's) config.json, every key as written."""
    tf = _transformers()
    fields = {k: v for k, v in inner.items() if k != "model_type"}
    with _outside_modes():
        return tf.AutoConfig.for_model(inner["model_type"], **fields)


def with_layers(cfg: dict, layers: int, dense_layers: int) -> dict:
    """A config.json's language model cut (or grown) to `layers` layers, the first
    `dense_layers` of them dense: the layer count, the per-layer lists cut to it
    (`layer_types`), `first_k_dense_replace` (DeepSeek) and `mlp_only_layers` (Qwen-MoE)."""
    out = dict(cfg)
    for key in COMMON_KEYS["layers"]:
        if key in out:
            out[key] = layers
    if isinstance(out.get("layer_types"), list):
        out["layer_types"] = out["layer_types"][:layers]
    if "first_k_dense_replace" in out:
        out["first_k_dense_replace"] = dense_layers
    if isinstance(out.get("mlp_only_layers"), list):
        out["mlp_only_layers"] = [i for i in out["mlp_only_layers"] if i < layers]
    return out


def preset_config(m: ModelSpec):
    """The transformers config of a shipped preset `hf_config` cannot build from fields (or of one
    with its layers cut, as a sweep or `scripts/accuracy.py --random` may): the preset's own
    config.json, shipped in memsweep/data/hf_configs/ (the files conf/model/*.yaml were imported
    from, for the presets `unsupported` names), with `m`'s layer
    count. Used only when importing that file gives back `m` exactly, so the model transformers
    builds is the one every formula reads (None: no shipped file)."""
    shipped = files("memsweep") / "data" / "hf_configs" / f"{m.name}.json"
    if not shipped.is_file():
        return None
    inner, _ = text_config(read_config(shipped))
    inner = with_layers(inner, m.layers, m.dense_layers)
    imported = spec_from_config(inner, m.name, warn=lambda line: None)
    if imported != dataclasses.replace(m, source=""):
        differ = [f.name for f in dataclasses.fields(m)
                  if f.name != "source" and getattr(imported, f.name) != getattr(m, f.name)]
        raise Unmeasurable(f"measure.impl=hf: {m.name} differs from its config.json in {', '.join(differ)}; "
                           "measure.impl=reference measures it")
    return _auto_config(inner)


def hf_config(m: ModelSpec):
    """The transformers config whose model has exactly `m`'s shapes (parameter counts equal):
    the source config.json when `m` was read from one, a shipped preset's own, else one built
    from `m`'s fields."""
    if m.source:
        return source_config(m)
    why = unsupported(m)
    if why:
        cfg = preset_config(m)
        if cfg is not None:
            return cfg
        raise Unmeasurable(f"measure.impl=hf does not build {why} yet ({m.name}); use measure.impl=reference")
    tf = _transformers()
    if m.family == "gpt2":
        return tf.GPT2Config(n_embd=m.hidden, n_layer=m.layers, n_head=m.heads, n_inner=m.ffn,
                             vocab_size=m.vocab, n_positions=m.max_positions, resid_pdrop=m.hidden_dropout,
                             embd_pdrop=m.embedding_dropout, attn_pdrop=m.attention_dropout,
                             bos_token_id=None, eos_token_id=None)
    if m.hidden_dropout or m.embedding_dropout:
        raise Unmeasurable(f"measure.impl=hf: {m.name}'s hidden / embedding dropout: the llama-family "
                           "classes read attention_dropout alone; a config.json (model=hf model.config=PATH) "
                           "of a family that has them is measured")
    common = dict(hidden_size=m.hidden, intermediate_size=m.ffn, num_hidden_layers=m.layers,
                  attention_dropout=m.attention_dropout,
                  num_attention_heads=m.heads, num_key_value_heads=m.kv_heads, head_dim=m.dim_per_head,
                  vocab_size=m.vocab, max_position_embeddings=m.max_positions, rms_norm_eps=1e-5,
                  tie_word_embeddings=m.tied_embeddings, bos_token_id=None, eos_token_id=None)
    if m.qkv_bias and not m.out_bias:  # Qwen2: biases on q, k, v only
        return tf.Qwen2Config(**common)
    if m.local_layers:  # every layer local: Mistral v0.1
        return tf.MistralConfig(sliding_window=m.sliding_window, **common)
    return tf.LlamaConfig(attention_bias=m.qkv_bias, mlp_bias=m.mlp_bias, **common)


def prepare_hf(spec: JobSpec, device: str, tracker: StorageTracker | None = None,
               last_decode_only: bool = False) -> Prepared:
    """Like workloads.prepare, with the transformers model. `last_decode_only` (fake runs): the
    cache jumps to prompt + generated - 1 tokens in one concatenation per layer, then the last
    token is decoded: a DynamicCache grows by concatenation (each step holds the old and the new
    copy of one layer at a time), so the last step, with the longest cache, is the decode peak,
    and the jump's transient (old + the block + new, of one layer) is smaller than that step's."""
    t = tracker or _NoTracker()
    w = spec.workload
    grouped_mm_as_cuda()
    if spec.recompute == "selective":
        raise Unmeasurable("measure.impl=hf: transformers has no selective recompute; recompute=none or full")
    check_layout(spec, device)
    check_techniques(spec, "hf")
    if w.prefill_logits == "all" and w.kind == "inference":
        raise Unmeasurable("workload.prefill_logits=all: this transformers keeps the last position's logits; "
                           "measure.impl=reference traces the whole prompt's")
    base_dtype, adapter_dtype = storage_dtypes(spec)
    cfg = hf_config(spec.model)
    tf = _transformers()
    targets = peft_target_modules(cfg.model_type, w.lora_targets) if w.kind == "lora" else []
    peft = _peft() if targets else None

    def build() -> torch.nn.Module:
        try:
            model = auto_class(tf, cfg).from_config(cfg, dtype=base_dtype, attn_implementation=spec.attention)
        except ValueError as exc:  # e.g. Gemma-2 and gpt-oss have no sdpa path in transformers
            if "does not support an attention implementation" in str(exc):
                first = str(exc).split(". ")[0].rstrip(".")  # transformers adds a paragraph of advice
                raise Unmeasurable(f"measure.impl=hf: {first} (attention=eager runs)") from None
            raise
        if peft is not None:
            lora = peft.LoraConfig(r=w.lora_rank, lora_alpha=2 * w.lora_rank, lora_dropout=w.lora_dropout,
                                   target_modules=targets, bias="none")
            model = peft.get_peft_model(model, lora, autocast_adapter_dtype=False)
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.to(adapter_dtype)
        return model

    _import_model_code(tf, cfg)
    fake = _fake_mode()
    with t.section("setup", "weights"):
        if fake is None:
            with torch.device(device):
                model = build()
        else:
            with _outside_modes():
                with torch.device("meta"):
                    model = build()
                _fake_parameters(model, fake, device)
            t.adopt(model)
    with t.section("setup", "activations"):
        vocab = getattr(cfg, "vocab_size", None) or spec.model.vocab  # an unmodelled spec's may be a stand-in
        ids = torch.randint(0, vocab, (spec.batch, spec.seq), device=device)
    if w.training:
        return _train(spec, model, ids, t)
    return _inference(spec, model, cfg, ids, t, tf, last_decode_only)


@contextlib.contextmanager
def _one_sequence_per_row():
    """Data-dependent code met under fake tensors, handled explicitly: without a cache (training
    with use_cache=False) transformers looks for packed sequences in the position ids
    (`masking_utils.find_packed_sequence_indices`), and its `(mask[:, -1] == 0).all()` check
    cannot be read from a fake tensor, so it answers "packed" and a materialised mask follows
    (sdpa then repeats K/V instead of sharing them). Every row here is one sequence with positions
    0..T-1, for which the real check answers None: that answer, fake or real."""
    from transformers import masking_utils

    original = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


@functools.cache
def grouped_mm_as_cuda() -> torch.library.Library:
    """Let fake tensors run `aten::_grouped_mm` on what CUDA runs it on. transformers' MoE experts
    call `grouped_mm(input.to(weight.dtype), weight)` outside autocast (integrations/moe.py), so
    mixed precision's fp32 master weights run the experts in fp32. CUDA accepts that: its kernel
    takes the CUTLASS path for bf16 and otherwise `_grouped_mm_fallback`, a loop of `mm_out` into
    the one output (aten/src/ATen/native/cuda/GroupedBlas.cpp, torch >= 2.9), nothing else
    allocated; the CPU kernel accepts it too. Only the meta kernel (torch/_meta_registrations.py,
    `_meta_grouped_mm_common`) still checks for bf16, so a fake step failed where the real one
    runs. This registers a meta kernel with CUDA's dtype rule (a and b of one floating dtype, the
    output of that dtype; the shapes as the stock kernel makes them), once per process (the cache
    keeps the library, and with it the registration, alive)."""
    from torch._meta_registrations import _create_grouped_mm_output_tensor

    def meta(mat_a, mat_b, offs=None, bias=None, out_dtype=None):
        floating = (torch.float32, torch.float16, torch.bfloat16)
        torch._check(mat_a.dtype == mat_b.dtype and mat_a.dtype in floating,
                     lambda: f"grouped_mm: mat_a {mat_a.dtype} and mat_b {mat_b.dtype} must be one floating dtype")
        torch._check(mat_a.dim() in (2, 3) and mat_b.dim() in (2, 3), lambda: "grouped_mm: 2D or 3D operands")
        return _create_grouped_mm_output_tensor(mat_a, mat_b, offs, out_dtype or mat_a.dtype)

    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():  # "overriding a previously registered kernel": the point
        warnings.simplefilter("ignore")
        lib.impl("_grouped_mm", meta, "Meta")
    return lib


def decoder_layers(model: torch.nn.Module, layers: int) -> torch.nn.ModuleList:
    """The model's stack of blocks (`model.layers`, GPT-2's `transformer.h`, BERT's
    `encoder.layer`, under peft's wrappers): the first ModuleList of `layers` modules."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == layers:
            return module
    raise Unmeasurable(f"measure.impl=hf: no list of {layers} blocks found in {type(model).__name__}")


def _train(spec: JobSpec, model, ids: torch.Tensor, tracker) -> Prepared:
    if spec.recompute in ("full", "op"):  # every decoder layer (transformers 5.x renamed gradient_checkpointing_enable)
        kwargs = {"use_reentrant": False}
        if spec.recompute == "op":  # its kwargs go to torch.utils.checkpoint.checkpoint as they are
            from memsweep.measure.models import per_op_sac_context

            kwargs["context_fn"] = per_op_sac_context
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    shard(spec, model, decoder_layers(model, spec.model.layers), tracker)

    cache_kw = {"use_cache": spec.workload.use_cache} if spec.model.decoder else {}

    def forward_loss(autocast) -> torch.Tensor:
        with autocast, _one_sequence_per_row():
            # transformers shifts the labels itself; use_cache as workload.use_cache (its default: True)
            out = model(input_ids=ids, labels=ids, **cache_kw)
        return out.loss  # the logits and any cache die with `out`, as in a loop keeping only the loss

    return train_step(spec, model, ids, tracker, forward_loss)


def _retag_layer(tracker, layer) -> None:
    for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
        if isinstance(tensor, torch.Tensor) and tensor.numel():
            tracker.retag(tensor, "kv_cache")


def _retag_cache(tracker, cache) -> None:
    for layer in cache.layers:
        _retag_layer(tracker, layer)


def _tag_updates(tracker, cache) -> None:
    """Count what each cache layer holds as kv_cache as soon as its `update` makes it (as the
    reference's KVCache does), not only after the forward."""
    import weakref

    for layer in cache.layers:
        if not hasattr(type(layer), "update"):  # a fixed-state layer (Mamba): tagged after each step
            continue
        # the class's function and a weak reference: a closure holding the layer (or its bound
        # method) would be a reference cycle, and the cache would die at a garbage collection
        # instead of when its last reference goes, at a different moment in fake and real runs
        def update(*args, _update=type(layer).update, _layer=weakref.ref(layer), **kwargs):
            out = _update(_layer(), *args, **kwargs)
            _retag_layer(tracker, _layer())
            return out
        layer.update = update


def _jumpable(cache) -> bool:
    """Every layer of the cache holds growing keys and values (a state-space or linear-attention
    layer of a model no formula models holds a fixed state: decoding it token by token is exact)."""
    return all(isinstance(getattr(layer, "keys", None), torch.Tensor)
               and isinstance(getattr(layer, "values", None), torch.Tensor) for layer in cache.layers)


def _jump(cache, tokens: int) -> None:
    """Append `tokens` positions to every layer of a DynamicCache, as decoding them would."""
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        k_new, v_new = new_tokens(k, 2, tokens), new_tokens(v, 2, tokens)
        del k, v  # no local names for the old tensors: they die when the layer replaces them
        layer.update(k_new, v_new)
        del k_new, v_new
        window = getattr(layer, "sliding_window", None)
        if window and layer.keys.size(2) == window - 1:
            layer.keys = as_a_decode_step_leaves_it(layer.keys, 2)
            layer.values = as_a_decode_step_leaves_it(layer.values, 2)


def _inference(spec: JobSpec, model, cfg, ids: torch.Tensor, tracker, tf, last_decode_only: bool = False) -> Prepared:
    model.eval()
    gen = spec.gen_tokens

    @torch.no_grad()
    def step(prepared: Prepared) -> None:
        t, clock = prepared.tracker, prepared.timer
        if cfg.model_type == "bert":  # an encoder: one forward, no cache
            with clock.phase("prefill"), t.section("prefill", "activations"):
                model(input_ids=ids)
            return
        with clock.phase("prefill"):  # the cache's allocation and the prompt's forward
            cache = tf.DynamicCache(config=cfg)
            _tag_updates(t, cache)
            with t.section("prefill", "activations"):
                out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                logits = out.logits
                del out
        _retag_cache(t, cache)
        with t.section("decode", "activations"):
            steps = gen
            if last_decode_only and gen > 1 and _jumpable(cache):
                _jump(cache, gen - 1)
                _retag_cache(t, cache)
                steps = 1
            for _ in range(steps):
                with clock.phase("decode_token"):  # greedy pick + one forward
                    out = model(input_ids=logits.argmax(-1), past_key_values=cache, use_cache=True,
                                logits_to_keep=1)
                    logits = out.logits
                    del out
                _retag_cache(t, cache)

    return Prepared(model, None, spec.batch * (spec.seq + gen), step, tracker)
