"""benchmarks/lora_memory.py: its byte counts checked by hand on the smoke shape, and the table's ratios.

Run: .venv/bin/python -m pytest -q tests/bench/test_lora_memory.py
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from extras import requires_extra

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("bench_lora_memory", ROOT / "benchmarks" / "lora_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


lora_memory = _load()


def test_full_fine_tune_bytes_by_hand():
    result = lora_memory.run_variant(lora_memory.parse_variant("full"), "smoke", 2, 4, 4, "cpu")
    # smoke Qwen2: vocab 512 x hidden 64 tied embedding = 32768; per layer q 64·64+64, k 64·32+32, v 64·32+32,
    # o 64·64, gate/up/down 3·64·128, two norms 2·64 = 37120; 2 layers + final norm 64 -> 107072 parameters
    assert result["num_parameters"] == result["num_trainable"] == 107072
    assert result["parameters"] == result["trainable"] == result["gradients"] == 4 * 107072
    # AdamW: exp_avg and exp_avg_sq per parameter, plus one fp32 step counter per parameter tensor: the embedding,
    # 12 per layer (q, k, v weight + bias, o, gate, up, down, two norms), the final norm = 1 + 24 + 1 = 26
    assert result["optimizer_state"] == 2 * 4 * 107072 + 4 * 26


@requires_extra("lora", "peft")
def test_lora_bytes_by_hand():
    result = lora_memory.run_variant(lora_memory.parse_variant("lora:4:all-linear"), "smoke", 2, 4, 4, "cpu")
    # r·(in + out) per linear layer: q 4·128, k 4·96, v 4·96, o 4·128, gate/up/down 3·4·192 = 4096 per layer
    assert result["num_trainable"] == 2 * 4096
    assert result["trainable"] == result["gradients"] == 4 * 8192
    assert result["num_parameters"] == 107072 + 8192
    assert result["optimizer_state"] == 2 * 4 * 8192 + 4 * 2 * 7 * 2  # + a step counter per A and per B


def test_table_ratios():
    full = dict(name="full", parameters=100, num_parameters=25, trainable=100, num_trainable=25, gradients=100, optimizer_state=200, peak=400)
    lora = dict(name="lora:8:q", parameters=104, num_parameters=26, trainable=4, num_trainable=1, gradients=4, optimizer_state=8, peak=100)
    text = lora_memory.table([full, lora], "header")
    row = next(line for line in text.splitlines() if line.startswith("| lora"))
    # 4/100 = 0.04, 8/200 = 0.04, 100/400 = 0.25
    assert "4 B (0.040x full)" in row and "8 B (0.040x full)" in row and "100 B (0.250x full)" in row


def test_bad_variant_is_refused():
    with pytest.raises(SystemExit, match="use full or lora:R:TARGETS"):
        lora_memory.parse_variant("lora:x")
