"""LoRA adapters with peft (``pip install 'steadyrl[lora]'``): wrap, reference forward, merged weights, export.

    model = apply_lora(model, LoraConfig(r=16, alpha=32, dropout=0.0, target_modules=("all-linear",)))
    with adapters_disabled(model):          # π_ref = the base model: no second copy of the weights
        ref = policy_forward(model, batch)
    export_adapter(model, tokenizer, "out/adapter")   # adapter_config.json + adapter weights
    export_merged(model, tokenizer, "out/merged")     # a plain HF checkpoint with W + (α/r)·B·A

Only the adapters train: the optimizer holds their parameters and state, a checkpoint stores them
(``AdapterState``; the frozen base weights are reloaded from the model's source on resume), and the gradient
all-reduce moves them alone. The LM head may not be a LoRA target: the chunked log-prob path
(``ops.logprobs.logprobs_from_hidden``) multiplies the hidden states by the head's weight directly.

Samplers: the policy's own sampler runs the wrapped modules (the unwrapped causal LM with LoRA layers in it);
a separate low-precision sampler (``rollout.sampler_dtype``) is a plain copy holding the merged weights,
refreshed by :func:`merged_state_dict` in ``sync_weights``, so the native backend's fused decode applies to it.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from steadyrl.config import LoraConfig

ALL_LINEAR = "all-linear"
_LORA_PARAM_OWNER = re.compile(r"\.lora_(?:A|B|embedding_A|embedding_B|magnitude_vector)(?:\.[^.]+)?$")


class LoraError(ValueError):
    """LoRA is configured wrongly or cannot be used here; the message says what to change."""


def import_peft() -> Any:
    try:
        import peft
    except ImportError as error:
        raise LoraError("LoRA needs the peft package; install it with pip install 'steadyrl[lora]'") from error
    return peft


def is_peft_model(model: Any) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def unwrap_peft(model: Any) -> Any:
    """The causal LM inside a PeftModel (its LoRA layers in place, adapters active); any other model as is."""
    return model.get_base_model() if is_peft_model(model) else model


def apply_lora(model: torch.nn.Module, settings: LoraConfig) -> torch.nn.Module:
    """``peft.get_peft_model`` with ``settings``: the base weights frozen, B = 0 so the model starts unchanged."""
    if settings.r < 1:
        raise LoraError(f"model.lora.r must be >= 1, got {settings.r}")
    if not 0.0 <= settings.dropout < 1.0:
        raise LoraError(f"model.lora.dropout must be in [0, 1), got {settings.dropout}")
    if not settings.target_modules:
        raise LoraError("model.lora.target_modules is empty; name modules (q_proj, v_proj, ...) or all-linear")
    head = model.get_output_embeddings()
    head_names = {name.rpartition(".")[2] for name, module in model.named_modules() if module is head}
    if head_names & set(settings.target_modules):
        raise LoraError(
            f"model.lora.target_modules includes the LM head {sorted(head_names)}, which steadyrl's chunked log-prob "
            "path reads as a plain weight; leave it out (all-linear already does)"
        )
    peft = import_peft()
    targets = ALL_LINEAR if tuple(settings.target_modules) == (ALL_LINEAR,) else list(settings.target_modules)
    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft reads transformers' deprecated is_gradient_checkpointing: their call, not ours
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        try:
            return peft.get_peft_model(model, config)
        except ValueError as error:
            linears = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise LoraError(f"{error} The model's linear layers are named {linears}; set model.lora.target_modules") from error


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` as its base model (every adapter bypassed) inside the block: the KL reference of LoRA."""
    if not is_peft_model(model):
        raise LoraError(f"{type(model).__name__} has no LoRA adapters to disable; the reference needs its own model")
    with model.disable_adapter():
        yield


def _lora_layers(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    from peft.tuners.lora import LoraLayer

    for name, module in unwrap_peft(model).named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "base_layer"):
            yield name, module


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """The state dict of the plain causal LM that equals ``model``: W + Σ_adapters (α/r)·B·A in every adapted
    layer, named as in the unwrapped model (no ``base_layer`` / ``lora_*`` keys). Nothing is changed in place."""
    inner = unwrap_peft(model)
    merged = {
        key.replace(".base_layer.", "."): value
        for key, value in inner.state_dict().items()
        if "lora_" not in key
    }
    for name, layer in _lora_layers(model):
        weight = layer.base_layer.weight
        if layer.merged or layer.disable_adapters:
            continue
        adapters = [a for a in layer.active_adapters if a in layer.lora_A or a in layer.lora_embedding_A]
        if adapters:
            delta = sum(layer.get_delta_weight(a) for a in adapters)
            merged[f"{name}.weight"] = (weight + delta.to(weight.dtype)).detach()
    return merged


def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain causal LM (no peft modules) holding the merged weights of ``model``; ``model`` is unchanged."""
    import copy

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return copy.deepcopy(model).merge_and_unload()


def export_adapter(model: torch.nn.Module, tokenizer: Any | None, out_dir: str | Path) -> Path:
    """The adapter alone (``PeftModel.from_pretrained(base, out_dir)`` loads it), written atomically."""
    from steadyrl.runtime.checkpoint import save_pretrained_atomic

    if not is_peft_model(model):
        raise LoraError(f"{type(model).__name__} has no LoRA adapters to export")
    return save_pretrained_atomic(model, tokenizer, out_dir)


class _MergedExport:
    """What save_pretrained_atomic calls: the unwrapped model saved with the merged weights."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def save_pretrained(self, path: Path) -> None:
        unwrap_peft(self.model).save_pretrained(path, state_dict=merged_state_dict(self.model))


def export_merged(model: torch.nn.Module, tokenizer: Any | None, out_dir: str | Path) -> Path:
    """A plain Hugging Face checkpoint with the adapters merged in (``AutoModelForCausalLM.from_pretrained``
    loads it without peft), written atomically; the live model keeps its adapters unmerged."""
    from steadyrl.runtime.checkpoint import save_pretrained_atomic

    return save_pretrained_atomic(_MergedExport(model), tokenizer, out_dir)


class AdapterState:
    """``state_dict`` / ``load_state_dict`` of a PeftModel's adapter weights only, for checkpoints and the
    stability guard's snapshots (the frozen base weights come back from the model's source). Loading is strict:
    every adapter weight of the model must be in the state, and nothing else."""

    def __init__(self, model: torch.nn.Module) -> None:
        if not is_peft_model(model):
            raise LoraError(f"{type(model).__name__} has no LoRA adapters")
        self.model = model

    def state_dict(self) -> dict[str, Tensor]:
        peft = import_peft()
        return peft.get_peft_model_state_dict(self.model, save_embedding_layers=False)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        peft = import_peft()
        expected = set(self.state_dict())
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise LoraError(
                f"the saved adapter weights do not match this model's adapters (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}); resume with the model.lora settings the run was started with"
            )
        peft.set_peft_model_state_dict(self.model, state)


def adapted_module_name(owner: str) -> str:
    """The module a LoRA parameter adapts: ``...mlp.up_proj`` for ``...mlp.up_proj.lora_A.default``; any other
    module path unchanged (PCR's blocks: one block per adapted layer, its A and B together)."""
    return _LORA_PARAM_OWNER.sub("", owner)
