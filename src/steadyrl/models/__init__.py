"""Tokenizer and model factories, and Hugging Face loading with errors that name the fix."""

from steadyrl.models.factory import (
    DENSE_ARCHS,
    MOE_ARCHS,
    build_tiny_model,
    count_parameters,
    tiny_model_config,
)
from steadyrl.models.loading import ModelLoadError, load_model, load_tokenizer, resolve_dtype
from steadyrl.models.routing import (
    RoutingRecorder,
    RoutingReplayer,
    UnsupportedMoEError,
    replay_routing_weights,
    routing_agreement,
    supported_moe_layers,
)
from steadyrl.models.tokenizer import ARITHMETIC_ALPHABET, SPECIAL_TOKENS, build_char_tokenizer

__all__ = [
    "ARITHMETIC_ALPHABET",
    "DENSE_ARCHS",
    "MOE_ARCHS",
    "SPECIAL_TOKENS",
    "ModelLoadError",
    "RoutingRecorder",
    "RoutingReplayer",
    "UnsupportedMoEError",
    "build_char_tokenizer",
    "build_tiny_model",
    "count_parameters",
    "load_model",
    "load_tokenizer",
    "replay_routing_weights",
    "resolve_dtype",
    "routing_agreement",
    "supported_moe_layers",
    "tiny_model_config",
]
