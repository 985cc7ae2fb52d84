"""LossInputs checks its shapes once, at construction.

    .venv/bin/python -m pytest -q tests/test_types.py
"""

from __future__ import annotations

import pytest
import torch

from steadyrl.types import LossInputs


def _inputs(**over):
    base = dict(
        logprobs=torch.zeros(2, 3),
        old_logprobs=torch.zeros(2, 3),
        advantages=torch.zeros(2, 3),
        response_mask=torch.ones(2, 3, dtype=torch.bool),
    )
    return LossInputs(**{**base, **over})


def test_well_formed_inputs_construct():
    _inputs(entropy=torch.zeros(2, 3), token_ids=torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize(
    "over,match",
    [
        ({"advantages": torch.zeros(2, 1)}, r"advantages has shape \(2, 1\), logprobs \(2, 3\)"),  # no silent broadcast
        ({"ref_logprobs": torch.zeros(3, 2)}, "ref_logprobs has shape"),
        ({"response_mask": torch.ones(2, 3)}, "response_mask must be bool"),
        ({"logprobs": torch.zeros(6)}, r"logprobs must be \(B, T\)"),
    ],
)
def test_malformed_inputs_fail_with_the_field_named(over, match):
    with pytest.raises(ValueError, match=match):
        _inputs(**over)
