"""The policy in Hugging Face format inside each checkpoint (``checkpoint.hf_format``).

    RUN_DIR/checkpoints/step-00000050/hf/           config.json, model.safetensors, tokenizer files
    RUN_DIR/checkpoints/step-00000050/hf-adapter/   LoRA only: adapter_config.json, adapter weights

``hf/`` is always a plain causal LM: ``AutoModelForCausalLM.from_pretrained(".../hf")`` loads the policy of that
step without steadyrl or peft (with LoRA: the base weights with the adapters merged, W + (α/r)·B·A). ``hf-adapter/``
is what ``PeftModel.from_pretrained(base, ".../hf-adapter")`` loads. Both are written by
``runtime.checkpoint.save_checkpoint`` into the step's temporary directory, so they appear atomically with the
resumable state and are pruned with it (``checkpoint.keep_last``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from steadyrl.models.lora import is_peft_model, merged_state_dict, unwrap_peft

HF_DIR = "hf"
ADAPTER_DIR = "hf-adapter"

Writer = Callable[[Path], None]


def _plain(model: torch.nn.Module) -> torch.nn.Module:
    """The module that has ``save_pretrained`` (torch.compile's ``_orig_mod`` unwrapped)."""
    while isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
        model = model._orig_mod
    return model


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _save_adapter(model: torch.nn.Module, path: Path) -> None:
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing: their call
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model.save_pretrained(path)


def hf_checkpoint_writers(
    model: torch.nn.Module, tokenizer: Any | None, *, state_dict: dict[str, Tensor] | None = None
) -> dict[str, Writer]:
    """``{"hf": write(path)[, "hf-adapter": write(path)]}`` for ``save_checkpoint(exports=...)``.

    ``state_dict``: the full weights to write when the live model does not hold them (an FSDP-sharded policy:
    the state dict gathered on rank 0, ``runtime.fsdp.full_model_state_dict``); None = the model's own.
    """
    model = _plain(model)

    def with_tokenizer(save: Callable[[Path], None]) -> Writer:
        def write(path: Path) -> None:
            with _no_progress_bar():  # a checkpoint mid-run must not draw over the trainer's own progress line
                save(path)
                if tokenizer is not None:
                    tokenizer.save_pretrained(path)

        return write

    if is_peft_model(model):
        if state_dict is not None:
            raise ValueError("a gathered state dict is not supported with LoRA adapters (FSDP with LoRA is refused).")
        merged = with_tokenizer(lambda path: unwrap_peft(model).save_pretrained(path, state_dict=merged_state_dict(model)))
        adapter = with_tokenizer(lambda path: _save_adapter(model, path))
        return {HF_DIR: merged, ADAPTER_DIR: adapter}
    return {HF_DIR: with_tokenizer(lambda path: model.save_pretrained(path, state_dict=state_dict))}


class _WithStateDict:
    """What ``save_pretrained_atomic`` calls: ``model.save_pretrained`` with the given full weights."""

    def __init__(self, model: torch.nn.Module, state_dict: dict[str, Tensor]) -> None:
        self.model, self.state_dict = _plain(model), state_dict

    def save_pretrained(self, path: Path) -> None:
        self.model.save_pretrained(path, state_dict=self.state_dict)


def with_state_dict(model: torch.nn.Module, state_dict: dict[str, Tensor] | None) -> Any:
    """``model`` for ``save_pretrained_atomic``, saving ``state_dict`` instead of its own weights when given
    (an FSDP-sharded policy's gathered weights)."""
    return model if state_dict is None else _WithStateDict(model, state_dict)
