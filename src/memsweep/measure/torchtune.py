"""`measure.impl=torchtune` (issue 25, part 4): the training step torchtune's single-device
recipes run (`full_finetune_single_device`, `lora_finetune_single_device`; torchtune 0.6.1), with
torchtune's own modules.

What runs, as recipes/full_finetune_single_device.py and lora_finetune_single_device.py write it:
- the model from torchtune's component builders, in the job's dtype (`training.set_default_dtype`,
  no autocast: torchtune trains bf16 or fp32 "pure"): `llama2`, `llama3`, `llama3_1`, `llama3_2`
  (tied embeddings: `TiedLinear`) and `qwen2` (q/k/v biases; Qwen2.5 is built by it), or their
  `lora_*` variants with the job's rank, targets and dropout; `quantize_base=True` for an NF4 base
  (QLoRA: torchao's `NF4Tensor`, block 64, scalers double-quantized in blocks of 256);
- `model(tokens)` (its attention: SDPA with K/V expanded to every query head, `is_causal`);
  logits upcast to fp32 in `unembed` (one piece) or `set_num_output_chunks(N)` and
  `CEWithChunkedOutputLoss(N)` (`loss.chunks=N`); labels shifted by `hstack` with an ignore
  column; the loss times the token count, `.backward()`;
- `training.set_activation_checkpointing(model, {TransformerSelfAttentionLayer})` for
  `recompute=full` (non-reentrant, no RNG state);
- `offload.activations=true`: torchtune's `OffloadActivations` (training/_activation_offloading.py),
  which needs CUDA streams; a trace on the CPU runs `HostOffload` below, the same hooks with the
  same bookkeeping (what is offloaded, the forward stash of 5, the backward stash freed one
  autograd node later), its host copies not counted as device memory;
- the optimizer as `train_step` builds it (memsweep's layouts); `optimizer.in_backward`: one
  optimizer per parameter stepped in its post-accumulate-grad hook, as torchtune's
  `register_optim_in_bwd_hooks` does.

Not run (status skipped with the reason): inference (torchtune's generation is not a recipe
memsweep models), mixed precision and fp16 (the recipes refuse them), recompute=selective
(torchtune's "selective" is every k-th layer, another technique), attention=eager (torchtune has
SDPA only), hidden / embedding dropout (torchtune's decoders have none), `loss.fused`, offloading
anything but activations, LoRA targets torchtune cannot express (the MLP is adapted as a whole).
`compile=True` in a recipe is not traced (torch.compile does not run under fake tensors here).

Building: on the meta device, outside the dispatch modes, then each parameter and buffer becomes a
fake tensor (NF4 parameters: their inner tensors); RoPE caches are built on the CPU first, as
the recipe builds them on the GPU (Llama3ScaledRoPE skips its cache on the meta device).

torchtune and torchao are the optional `torchtune` extra. torchtune 0.6.1's `training` package
imports torchao's old function names `int4_weight_only` and
`int8_dynamic_activation_int4_weight`; torchao 0.16 removed them (peft 0.21 needs torchao >= 0.16,
so both cannot be older), and they were aliases of `Int4WeightOnlyConfig` and
`Int8DynamicActivationInt4WeightConfig` (torchao 0.10 quantization/quant_api.py): the aliases are
restored before the import. Nothing measured here calls them.
"""

from __future__ import annotations

import importlib
from contextlib import nullcontext

import torch
from torch.autograd.graph import saved_tensors_hooks

from memsweep.measure.hf import _fake_mode, _fake_parameters, _outside_modes, not_llama_like
from memsweep.measure.parallel import shard
from memsweep.measure.tracker import StorageTracker
from memsweep.measure.workloads import (
    TORCH_DTYPES, Prepared, Unmeasurable, _NoTracker, check_layout, train_step,
)
from memsweep.specs import JobSpec, ModelSpec

INSTALL = "pip install -e '.[torchtune]'"
# torchao's names before 0.16 -> what they were aliases of
_TORCHAO_ALIASES = {"int4_weight_only": "Int4WeightOnlyConfig",
                    "int8_dynamic_activation_int4_weight": "Int8DynamicActivationInt4WeightConfig"}
# memsweep's LoRA targets -> torchtune's attention module names (the MLP is adapted as a whole)
ATTN_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "output_proj"}
MLP_TARGETS = frozenset(("gate", "up", "down"))
NF4_BLOCK = 64  # torchtune's to_nf4 defaults (torchao NF4Tensor: block_size 64, scaler_block_size 256)


def _import(name: str):
    try:
        with _outside_modes():
            if name.startswith("torchtune"):
                quantization = importlib.import_module("torchao.quantization")
                for old, new in _TORCHAO_ALIASES.items():
                    if not hasattr(quantization, old) and hasattr(quantization, new):
                        setattr(quantization, old, getattr(quantization, new))
            return importlib.import_module(name)
    except ImportError as exc:
        raise Unmeasurable(f"measure.impl=torchtune needs torchtune and torchao ({exc}); install: {INSTALL}") from None


def builder_name(m: ModelSpec) -> str:
    """torchtune's component builder for `m` ('qwen2', 'llama3_2', ...), or Unmeasurable with what
    torchtune's dense decoders cannot express."""
    found = not_llama_like(m, **{
        "a non-decoder": not m.decoder, f"position={m.position}": m.position != "rope",
        "sliding-window layers": m.local_layers > 0, "soft-capping": bool(m.attn_softcap or m.final_softcap),
        "output / MLP biases": m.out_bias or m.mlp_bias,
        f"head_dim {m.dim_per_head} != hidden / heads": m.dim_per_head * m.heads != m.hidden,
        "hidden / embedding dropout (torchtune's decoders have none)": bool(m.hidden_dropout or m.embedding_dropout),
    })
    if found:
        raise Unmeasurable(f"measure.impl=torchtune builds llama2 / llama3 / llama3_1 / llama3_2 / qwen2 decoders; "
                           f"{m.name} has {found}")
    if m.qkv_bias:
        return "qwen2"
    if m.tied_embeddings:
        return "llama3_2"
    if m.name.startswith("llama2"):
        return "llama2"
    return "llama3" if m.name == "llama3-8b" else "llama3_1"


def _builder_kwargs(m: ModelSpec, name: str) -> dict:
    kw = dict(vocab_size=m.vocab, num_layers=m.layers, num_heads=m.heads, num_kv_heads=m.kv_heads,
              embed_dim=m.hidden, max_seq_len=m.max_positions, intermediate_dim=m.ffn,
              attn_dropout=m.attention_dropout)
    if name in ("qwen2", "llama3_2"):
        kw["tie_word_embeddings"] = m.tied_embeddings
    return kw


def lora_arguments(targets: tuple[str, ...]) -> dict:
    """torchtune's `lora_attn_modules` and `apply_lora_to_mlp` for memsweep's targets."""
    mlp = MLP_TARGETS & set(targets)
    if mlp and mlp != MLP_TARGETS:
        raise Unmeasurable(f"measure.impl=torchtune adapts the MLP as a whole (apply_lora_to_mlp: gate, up and down); "
                           f"workload.lora_targets={list(targets)}")
    attn = [ATTN_MODULES[t] for t in targets if t in ATTN_MODULES]
    if not attn:  # the builders' own check (lora_*_self_attention: "Must pass one or more of ...")
        raise Unmeasurable(f"measure.impl=torchtune: its LoRA builders adapt at least one attention matrix "
                           f"(q, k, v or o); workload.lora_targets={list(targets)}")
    return dict(lora_attn_modules=attn, apply_lora_to_mlp=bool(mlp), apply_lora_to_output=False)


def check(spec: JobSpec) -> None:
    """What torchtune's single-device recipes run; the rest is status skipped with the reason."""
    w = spec.workload
    why = None
    if not w.training:
        why = "inference: torchtune's generation is not measured here (measure.impl=hf or reference)"
    elif spec.mixed:
        why = "mixed precision: torchtune's recipes train in the model's dtype, no autocast (mixed=false)"
    elif spec.dtype not in ("bf16", "fp32"):
        why = f"dtype={spec.dtype}: torchtune's recipes train bf16 or fp32"
    elif spec.recompute in ("selective", "op"):
        why = (f"recompute={spec.recompute}: torchtune checkpoints whole layers (its selective option: every "
               "k-th layer); recompute=none or full")
    elif spec.attention != "sdpa":
        why = "attention=eager: torchtune's attention calls SDPA (attention=sdpa)"
    elif spec.loss.fused:
        why = "loss.fused: torchtune's loss is CEWithChunkedOutputLoss or cross-entropy (loss.chunks)"
    elif any(getattr(spec.kernels, k) != "eager" for k in ("norm", "mlp", "rope", "loss")):
        why = "kernels: torchtune's modules run its own ops; of `kernels`, measure.impl=torchtune traces compile only"
    elif spec.kernels.compile and (spec.recompute != "none" or spec.loss.chunks != 1 or spec.offload.activations):
        why = "kernels.compile with measure.impl=torchtune: traced with recompute=none, loss.chunks=1, no offloading"
    elif spec.offload.optimizer or spec.offload.params:
        why = "offload.optimizer / offload.params: torchtune's single-device recipes offload activations only"
    elif w.use_cache:
        why = "workload.use_cache=true: torchtune's decoders build no cache in training (workload.use_cache=false)"
    elif spec.quant not in ("none", "nf4"):
        why = f"quant={spec.quant}: torchtune's QLoRA base is NF4 (quant=nf4)"
    elif spec.quant == "nf4":
        if w.kind != "lora":
            why = "quant=nf4 with a full fine-tune: torchtune quantizes a LoRA base (workload=qlora-torchtune)"
        elif w.kbit_prepare:
            why = "workload.kbit_prepare=true is peft's recipe; torchtune keeps embeddings and norms 16-bit (false)"
        elif not w.double_quant or spec.quant_group not in (0, NF4_BLOCK):
            why = f"torchtune's NF4 is block {NF4_BLOCK} with double-quantized scalers (quant_group 0 or 64, double_quant=true)"
    if why:
        raise Unmeasurable(why)


class HostOffload(saved_tensors_hooks):
    """torchtune's `OffloadActivations()` (use_streams=True, max_fwd_stash_size=5,
    min_offload_size=1024; training/_activation_offloading.py), its memory bookkeeping on one
    stream: a saved tensor of >= 1024 bytes that is no Parameter or Buffer gets a host copy (not
    device memory: the tracker forgets it) and the device tensor stays in a forward stash until 5
    newer ones are offloaded (its copy's event); in the backward a stashed tensor is returned as
    it is, any other is copied back to the device and kept in a backward stash until the hook of
    the next autograd node that unpacks one (or dropped at once if another reference took it);
    the first node hook empties the forward stash."""

    def __init__(self, tracker, stash: int = 5, min_bytes: int = 1024) -> None:
        self.saved: dict[int, tuple[torch.Tensor, bool]] = {}
        self.fwd_stash: dict[int, torch.Tensor] = {}
        self.bwd_stash: dict[int, torch.Tensor] = {}
        self.next_id = 0
        self.node = None

        def pack(t: torch.Tensor) -> int:
            self.next_id += 1
            i = self.next_id
            big = t.element_size() * t.nelement() >= min_bytes
            if big and not isinstance(t, (torch.nn.Parameter, torch.nn.Buffer)):
                for j in [j for j in self.fwd_stash if j <= i - stash]:
                    del self.fwd_stash[j]
                host = torch.empty_like(t)
                host.copy_(t)
                tracker.forget(host)  # pinned host memory, not the device's (after copy_, which re-counts it)
                self.saved[i] = (host, True)
                self.fwd_stash[i] = t
            else:
                self.saved[i] = (t, False)
            return i

        def unpack(i: int) -> torch.Tensor:
            t, offloaded = self.saved.pop(i)
            if not offloaded:
                return t
            node = torch._C._current_autograd_node()
            previous = []
            if node is not None and node is not self.node:
                self.node = node
                previous = list(self.bwd_stash)
            back = i not in self.fwd_stash
            if back:
                out = torch.empty_like(t)  # device memory again
                out.copy_(t)
                self.bwd_stash[i] = out
                uses = torch._C._storage_Use_Count(out.untyped_storage()._cdata)
            else:
                out = self.fwd_stash[i]
            del t

            def hook(outputs, inputs):
                if back and i in self.bwd_stash:
                    if torch._C._storage_Use_Count(self.bwd_stash[i].untyped_storage()._cdata) > uses:
                        del self.bwd_stash[i]  # record_stream: freed with its last other reference
                self.fwd_stash.clear()
                for j in previous:
                    self.bwd_stash.pop(j, None)
                return outputs

            if node is not None:
                node.register_hook(hook)
            return out

        super().__init__(pack, unpack)


def _rope_caches(model: torch.nn.Module) -> None:
    """Build the RoPE caches on the CPU, as the recipe builds them on the GPU (a meta build leaves
    them on meta, or, Llama3ScaledRoPE's `rope_init` returning early there, without them)."""
    for module in model.modules():
        if hasattr(module, "rope_init"):
            module.to_empty(device="cpu")
            module.rope_init()


def build(spec: JobSpec, device: str):
    """The model as the recipe's `config.instantiate` makes it (under `set_default_dtype`)."""
    w = spec.workload
    name = builder_name(spec.model)
    kw = _builder_kwargs(spec.model, name)
    dtype = TORCH_DTYPES[spec.dtype]
    builders = _import(f"torchtune.models.{name}._component_builders")
    training = _import("torchtune.training")
    if w.kind == "lora":
        fn = getattr(builders, f"lora_{name}")
        kw.update(lora_arguments(w.lora_targets), lora_rank=w.lora_rank, lora_alpha=2 * w.lora_rank,
                  lora_dropout=w.lora_dropout, quantize_base=spec.quant == "nf4")
    else:
        fn = getattr(builders, name)
    fake = _fake_mode()
    with _outside_modes(), training.set_default_dtype(dtype):
        if fake is None:
            with torch.device(device):
                model = fn(**kw)
        else:
            with torch.device("meta"):
                model = fn(**kw)
            _rope_caches(model)
            _fake_parameters(model, fake, device)
    if w.kind == "lora":
        peft = _import("torchtune.modules.peft")
        peft.set_trainable_params(model, peft.get_adapter_params(model))
    return model, training


def _compile(model: torch.nn.Module, loss_fn, layer_type: type):
    """torchtune's `compile_model` (every TransformerSelfAttentionLayer compiled on its own) and
    `compile_loss`, traced as measure/compiled.py traces a compiled block: AOTAutograd's partition,
    run as Inductor lays out memory."""
    from memsweep.measure.compiled import Compiler

    compiler = Compiler()
    for layer in [m for m in model.modules() if isinstance(m, layer_type)]:
        def forward(x, *args, _layer=layer, _eager=layer.forward, **kwargs):
            if args or any(v is not None for v in kwargs.values()):
                return _eager(x, *args, **kwargs)
            return compiler.module(("torchtune-layer",), _layer, _eager, [x])

        layer.forward = forward

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return compiler.run(("torchtune-loss",), lambda lg, lb: loss_fn(lg, lb), [logits, labels])

    loss.ignore_index = loss_fn.ignore_index
    return loss


def prepare_torchtune(spec: JobSpec, device: str, tracker: StorageTracker | None = None,
                      last_decode_only: bool = False) -> Prepared:
    """Like workloads.prepare, with torchtune's model, loss and memory techniques."""
    t = tracker or _NoTracker()
    check_layout(spec, device)
    check(spec)
    with t.section("setup", "weights"):
        model, training = build(spec, device)
        t.adopt(model)
    modules = _import("torchtune.modules")
    if spec.recompute == "full":
        training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    shard(spec, model, model.layers, t)  # the recipes shard after wrapping the checkpoints (training.shard_model)
    chunks = spec.loss.chunks
    if chunks > 1:
        loss_fn = _import("torchtune.modules.loss").CEWithChunkedOutputLoss(num_output_chunks=chunks)
        model.set_num_output_chunks(chunks)
    else:
        loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100)
    offload = HostOffload(t) if spec.offload.activations else None
    if offload is not None:  # the output head is not offloaded (get_act_offloading_ctx_manager)
        head = model.output.linear if hasattr(model.output, "linear") else model.output
        noop = training.NoOpManager()
        head.register_forward_pre_hook(lambda *args: noop.__enter__())
        head.register_forward_hook(lambda *args: noop.__exit__(), always_call=True)
    with t.section("setup", "activations"):
        tokens = torch.randint(0, spec.model.vocab, (spec.batch, spec.seq), device=device)
        ignore = torch.full((spec.batch, 1), loss_fn.ignore_index, device=device)
    if spec.kernels.compile:  # the recipes' compile=True: training.compile_model and compile_loss
        compiled_loss = _compile(model, loss_fn, modules.TransformerSelfAttentionLayer)
        loss_fn = compiled_loss if spec.kernels.compile_loss else loss_fn

    def forward_loss(autocast) -> torch.Tensor:  # recipes' _loss_step, times the token count
        with offload if offload is not None else nullcontext():
            logits = model(tokens)
        labels = torch.hstack((tokens[..., 1:], ignore))
        if not isinstance(logits, list):
            labels = labels.reshape(-1)
            logits = logits.reshape(-1, logits.size(-1))
        loss = loss_fn(logits, labels)
        del logits
        return loss * (labels != loss_fn.ignore_index).sum()

    return train_step(spec, model, tokens, t, forward_loss)
