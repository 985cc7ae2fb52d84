"""benchmarks/memory_estimate.py: the parameter count and every computed term against hand arithmetic on a
small shape, the activation model's linearity (its per-token slope is what the estimate extrapolates), and
FSDP's per-rank division.

Run: .venv/bin/python -m pytest -q tests/bench/test_memory_estimate.py
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_memory_estimate", ROOT / "benchmarks" / "memory_estimate.py")
estimate_module = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = estimate_module
_spec.loader.exec_module(estimate_module)

# smoke: vocab 512, hidden 64, intermediate 128, 2 layers, 4 heads of 16, 2 KV heads (KV width 32), tied
# per layer: q 64·64+64, k 64·32+32, v 64·32+32, o 64·64, MLP 3·64·128, 2 norms of 64
LAYER = (64 * 64 + 64) + 2 * (64 * 32 + 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64  # 37,120
PARAMS = 2 * LAYER + 512 * 64 + 64  # two layers, tied embeddings once, final norm: 107,072
# LoRA per unit of r: Σ (in + out) over q, k, v, o, gate, up, down of both layers
LORA_PER_R = 2 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))  # 2,048


def test_architecture_counts_by_hand():
    arch = estimate_module.architecture("smoke")
    assert (arch.params, arch.block, arch.lora_per_rank, arch.kv_width) == (PARAMS, LAYER, LORA_PER_R, 32)
    assert arch.head == 512 * 64 + 64  # the (tied) head and the final norm


def test_activation_bytes_grow_linearly_with_tokens():
    k, c, residual = estimate_module.activation_model("smoke", autocast_bf16=False)
    k_long, c_long, _ = estimate_module.activation_model("smoke", autocast_bf16=False, tokens=(128, 256))
    assert k > 0 and residual == 4
    assert k_long == pytest.approx(k, rel=0.02)  # no tokens² term: the slope extrapolates to long sequences
    assert c_long == pytest.approx(c, rel=0.05, abs=2048)


def test_every_term_by_hand(monkeypatch):
    monkeypatch.setattr(estimate_module, "activation_model", lambda *a, **k: (1000.0, 500.0, 4))
    common = dict(dtype="float32", autocast_bf16=False, checkpointing=True, kl_reference=True, sampler_dtype="bfloat16",
                  sequences=8, prompt_tokens=8, new_tokens=8, micro_batch=4)
    full = estimate_module.estimate("smoke", lora_r=None, **common)
    gb = 1e9
    assert full["weights"] * gb == pytest.approx(PARAMS * 4)
    assert full["gradients"] * gb == pytest.approx(PARAMS * 4)
    assert full["AdamW state"] * gb == pytest.approx(PARAMS * 8)
    assert full["reference"] * gb == pytest.approx(PARAMS * 4)
    assert full["sampler copy"] * gb == pytest.approx(PARAMS * 2)  # bf16 sampler beside fp32 weights
    # KV: 8 sequences × 16 tokens × 2 layers × (K, V) × 32 × 2 bytes, + 3 fp32 (8, 512) logit buffers
    assert full["KV cache + decode logits"] * gb == pytest.approx(8 * 16 * 2 * 2 * 32 * 2 + 3 * 8 * 512 * 4)
    # checkpointing, M = 4 × 16 = 64 tokens: 2 layers × 64 × 64 × 4 + 2 (64 k + c) + head chunk + final hidden
    activations = 2 * 64 * 64 * 4 + 2 * (64 * 1000 + 500) + 3 * 1024 * 512 * 4 + 64 * 64 * 4
    assert full["activations (one micro-batch)"] * gb == pytest.approx(activations)
    static = PARAMS * (4 + 8 + 4 + 2)
    assert full["peak"] * gb == pytest.approx(static + max(full["KV cache + decode logits"] * gb, PARAMS * 4 + activations))

    lora = estimate_module.estimate("smoke", lora_r=4, **common)
    trainable = 4 * LORA_PER_R
    assert lora["trainable (B)"] * 1e9 == trainable and lora["AdamW state"] * gb == pytest.approx(trainable * 8)
    assert lora["reference"] == 0  # the base model with adapters disabled

    sharded = estimate_module.estimate("smoke", lora_r=None, ranks=4, fsdp=True, **common)
    for key in ("weights", "gradients", "AdamW state", "reference"):
        assert sharded[key] == pytest.approx(full[key] / 4), key
    assert sharded["sampler copy"] == full["sampler copy"]  # every rank samples with full weights
    assert sharded["FSDP gathered units"] * gb == pytest.approx((512 * 64 + 64 + 3 * LAYER) * 4)


def test_smoke_prints_a_table(capsys):
    assert estimate_module.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "| peak |" in out and "lora r=4" in out
