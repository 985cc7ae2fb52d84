"""Load causal language models and tokenizers from a hub id or a local directory, failing with a fix.

Both hub ids (``Qwen/Qwen2.5-0.5B``) and local directories go through ``from_pretrained``. A name that looks
like a path (starts with ``/``, ``.``, ``~``, has more than one ``/``, or its first component exists on disk)
is treated as local and checked before anything is fetched, so a typo in a checkpoint path is reported as a
missing path instead of a confusing hub error.

Before a hub id is fetched, one short TCP connection to the hub endpoint (or the configured HTTPS proxy) tells
whether the hub can be reached at all: without a network, huggingface_hub retries every file for about a
minute. Unreachable and cached: the cached snapshot directory is loaded. Unreachable and not cached:
a ModelLoadError at once, saying too that no local directory has that name.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


class ModelLoadError(ValueError):
    """A model, tokenizer or dtype could not be loaded; the message says what to change."""


_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}

# transformers renamed from_pretrained's `torch_dtype=` to `dtype=` in 4.56; 5.x still accepts the old name.
_DTYPE_KWARG = "dtype" if Version(transformers.__version__) >= Version("4.56.0") else "torch_dtype"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32" | "fp32" | "bfloat16" | "bf16" | "float16" | "fp16"`` (or ``"torch.bfloat16"``, or a
    ``torch.dtype``) -> the ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or a torch.dtype")


def _looks_local(name_or_path: str) -> bool:
    if name_or_path.startswith(("/", ".", "~")) or "\\" in name_or_path:
        return True
    if name_or_path.count("/") > 1:  # hub ids are "name" or "org/name"
        return True
    first_component = name_or_path.split("/", 1)[0]
    return os.path.exists(name_or_path) or ("/" in name_or_path and os.path.isdir(first_component))


def _check_local_path(name_or_path: str, *, required_file: str | None) -> str | None:
    """Return the expanded local path, or None for a hub id; raise if a local-looking path is unusable."""
    if not _looks_local(name_or_path):
        return None
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model path {name_or_path} does not exist; pass a Hugging Face hub id or a directory "
            "containing config.json"
        )
    if not path.is_dir():
        raise ModelLoadError(
            f"model path {name_or_path} is a file; pass the directory that contains it (with config.json)"
        )
    if required_file is not None and not (path / required_file).is_file():
        raise ModelLoadError(
            f"directory {name_or_path} has no {required_file}; pass a directory written by save_pretrained "
            "(config.json + weights) or a Hugging Face hub id"
        )
    return str(path)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_tokenizer_fits_model(tokenizer, model: torch.nn.Module, name_or_path: str = "the model") -> None:
    """Every special token the trainer uses must index the model's embedding.

    Some tokenizer classes invent a default pad token (transformers 5's Qwen2Tokenizer adds
    '<|endoftext|>') that a small custom vocabulary does not have; catching it here turns an IndexError at
    the first rollout into an error that names the fix.
    """
    vocab = model.get_input_embeddings().num_embeddings
    for role in ("pad", "eos"):
        token_id = getattr(tokenizer, f"{role}_token_id")
        if token_id is None or not 0 <= int(token_id) < vocab:
            raise ModelLoadError(
                f"the tokenizer of {name_or_path} gives the {role} token {getattr(tokenizer, f'{role}_token')!r} "
                f"id {token_id}, outside the model's {vocab}-row embedding; set `model.pad_token` in the config to "
                f"a token the model has (its EOS token {tokenizer.eos_token!r} is the usual choice)"
            )
    # Text can encode to any non-special token: one past the embedding is an IndexError at the first rollout.
    # (Special tokens the tokenizer invents but never emits for text, e.g. a default pad, are checked above.)
    special = set(tokenizer.all_special_ids)
    outside = sorted(i for i in tokenizer.get_vocab().values() if i >= vocab and i not in special)
    if outside:
        raise ModelLoadError(
            f"the tokenizer of {name_or_path} has {len(outside)} token(s) with ids from {outside[0]} up, outside the "
            f"model's {vocab}-row embedding; use the tokenizer saved with this model (or resize the model's "
            "embeddings to the tokenizer before training)"
        )


_PROBE_TIMEOUT_S = 3.0
_probe_cache: dict[tuple, tuple[float, str | None]] = {}


def hub_unreachable_reason(timeout: float = _PROBE_TIMEOUT_S) -> str | None:
    """None when a TCP connection to the hub endpoint (or the HTTPS proxy in the environment) opens within
    ``timeout`` seconds, else why not; HF_HUB_OFFLINE counts as unreachable. Remembered for 60 s."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = parsed.hostname or "", parsed.port or 8080
    key = (host, port)
    now = time.monotonic()
    if key in _probe_cache and now - _probe_cache[key][0] < 60.0:
        return _probe_cache[key][1]
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        reason = None
    except OSError as error:
        reason = f"{host}:{port}: {error.strerror or error or type(error).__name__}"
    _probe_cache[key] = (now, reason)
    return reason


def _is_cached(repo_id: str, files: tuple[str, ...]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    for file in files:
        try:
            if isinstance(try_to_load_from_cache(repo_id, file), str):
                return True
        except ValueError:  # not a valid repo id
            return False
    return False


def _hub_source(name_or_path: str, files: tuple[str, ...]) -> str:
    """What ``from_pretrained`` should load for a hub id: the id itself when the hub answers; the cached
    snapshot's directory when it does not but the files are cached (a local path, so that no lookup of
    transformers' own, e.g. for an adapter config, tries the network and backs off); a ModelLoadError at once
    when it does not and nothing is cached."""
    reason = hub_unreachable_reason()
    if reason is None:
        return name_or_path
    if _is_cached(name_or_path, files):
        from huggingface_hub import snapshot_download

        return snapshot_download(name_or_path, local_files_only=True)
    raise ModelLoadError(
        f"model {name_or_path!r}: no such local directory ({Path(name_or_path).absolute()}), and it could not be "
        f"fetched from the Hugging Face hub, which is unreachable ({reason}), nor found in the local cache; pass "
        "a local directory containing config.json, or connect to the network (HF_ENDPOINT for a mirror)"
    )


def _fetch_error(name_or_path: str, what: str, error: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"{what} {name_or_path!r} could not be fetched from the Hugging Face hub ({type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else ''}); check the id (and network / HF_TOKEN for gated "
        "models), or pass a local directory containing config.json"
    )


def load_model(
    name_or_path: str,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with path checks, a dtype by name, and a device.

    Args:
      name_or_path: hub id or local directory (with config.json).
      dtype: parameter dtype, see :func:`resolve_dtype`.
      device: where to put the model after loading.
      gradient_checkpointing: enable activation checkpointing (non-reentrant) for training.
      attn_implementation: ``"eager" | "sdpa" | "flash_attention_2" | ...``; None lets transformers choose.
      trust_remote_code: forwarded to ``from_pretrained``.
    """
    torch_dtype = resolve_dtype(dtype)
    local_path = _check_local_path(name_or_path, required_file="config.json")
    kwargs: dict = {_DTYPE_KWARG: torch_dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    source = local_path or _hub_source(name_or_path, ("config.json",))
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as error:
        if local_path is not None:
            raise ModelLoadError(
                f"could not load a model from {name_or_path} ({error}); the directory needs config.json and "
                "weights written by save_pretrained"
            ) from error
        raise _fetch_error(name_or_path, "model", error) from error
    model = model.to(device)
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing under the name this transformers release uses."""
    checkpoint_kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
    model.config.use_cache = False  # the KV cache is useless during a checkpointed training forward


def load_tokenizer(
    name_or_path: str,
    *,
    pad_token: str | None = None,
    padding_side: str = "left",
    trust_remote_code: bool = False,
) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` with path checks and a guaranteed pad token.

    Args:
      name_or_path: hub id or local directory (tokenizer files).
      pad_token: token to pad with; must already be in the vocabulary (adding one would need the model's
        embeddings resized). None keeps the tokenizer's own pad token, and fails if it has none.
      padding_side: ``"left"`` (generation) or ``"right"``.
    """
    if padding_side not in ("left", "right"):
        raise ModelLoadError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    local_path = _check_local_path(name_or_path, required_file=None)
    source = local_path or _hub_source(name_or_path, ("tokenizer_config.json", "config.json"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        if local_path is not None:
            raise ModelLoadError(
                f"could not load a tokenizer from {name_or_path} ({_first_line(error)}); the directory needs the files "
                "written by tokenizer.save_pretrained (tokenizer.json, tokenizer_config.json)"
            ) from error
        raise _fetch_error(name_or_path, "tokenizer", error) from error
    if pad_token is not None:
        pad_id = tokenizer.convert_tokens_to_ids(pad_token)
        if pad_id is None or (pad_id == tokenizer.unk_token_id and pad_token != tokenizer.unk_token):
            raise ModelLoadError(
                f"pad token {pad_token!r} is not in the vocabulary of {name_or_path}; set `model.pad_token` "
                f"to a token it has, for example its EOS token {tokenizer.eos_token!r}"
            )
        tokenizer.pad_token = pad_token
    elif tokenizer.pad_token is None:
        raise ModelLoadError(
            f"the tokenizer of {name_or_path} has no pad token; set `model.pad_token` in the config "
            f"(its EOS token {tokenizer.eos_token!r} is the usual choice)"
        )
    tokenizer.padding_side = padding_side
    return tokenizer
