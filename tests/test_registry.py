"""The registry: every name resolves, hyper-parameters are checked, every family keeps its uniform signature.

    .venv/bin/python -m pytest -q tests/test_registry.py

The family-wide tests are parametrised over ``registry.FAMILIES``, so an entry added later is checked
automatically: it must run on random inputs with masked NaN garbage, return the family's documented types and
shapes with finite values, and its function (or class) must be named in at least one other test file.
"""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import pytest
import torch

from steadyrl import registry
from steadyrl.config import ConfigError, MethodSpec
from steadyrl.stabilisers.combiners import GradientCombiner
from steadyrl.stabilisers.filters import TokenFilter
from steadyrl.types import AdvantageResult, CorrectionResult, GlobalCounts, LossInputs, LossResult

TESTS_DIR = Path(__file__).parent
NO_BASELINE = {"raw_reward"}
"""Advantage estimators without a group baseline: a group of equal rewards keeps them (documented)."""
ALL_ENTRIES = [(family, name) for family in registry.METHOD_FAMILIES for name in registry.FAMILIES[family].table]
"""The stabilisation methods; tasks and rollout backends have tests of their own below and in their packages."""


def _entries(family: str) -> list[str]:
    return list(registry.FAMILIES[family].table)


def _random_inputs(
    seed: int, batch: int = 6, length: int = 5, garbage: float = math.nan, vocab: int = 24
) -> LossInputs:
    """Random log-probs of three nearby policies, right-padded masks, ``garbage`` at every masked position.

    Every optional field of LossInputs is filled, so any family member finds what it reads.
    """
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[0] = length  # one full row, so the padding column is not all-masked by accident
    mask = torch.arange(length)[None, :] < lengths[:, None]  # (B, T)

    def near(base: torch.Tensor, spread: float) -> torch.Tensor:
        return (base + spread * torch.randn(batch, length, generator=gen)).clamp(max=-1e-3)

    old = -3.0 * torch.rand(batch, length, generator=gen) - 0.05
    logprobs = near(old, 0.2)
    rollout = near(old, 0.2)
    ref = near(old, 0.3)
    entropy = 2.0 * torch.rand(batch, length, generator=gen)
    advantages = torch.randn(batch, 1, generator=gen).expand(batch, length).clone()
    old_logits = 2.0 * torch.randn(batch, length, generator=gen)
    logits = old_logits + 0.2 * torch.randn(batch, length, generator=gen)
    token_ids = torch.randint(4, vocab, (batch, length), generator=gen).masked_fill(~mask, 0)  # 0 = pad

    def dirty(x: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, x, torch.full_like(x, garbage))

    return LossInputs(
        logprobs=dirty(logprobs).requires_grad_(True),
        old_logprobs=dirty(old),
        advantages=dirty(advantages),
        response_mask=mask,
        rollout_logprobs=dirty(rollout),
        ref_logprobs=dirty(ref),
        entropy=dirty(entropy),
        token_logits=dirty(logits).requires_grad_(True),
        old_token_logits=dirty(old_logits),
        token_ids=token_ids,
    )


def _check_metrics(metrics: dict, where: str) -> None:
    assert isinstance(metrics, dict), f"{where}: metrics must be a dict, got {type(metrics).__name__}"
    for key, value in metrics.items():
        assert isinstance(key, str) and "/" in key, f"{where}: metric name {key!r} is not namespaced (a/b)"
        assert isinstance(value, torch.Tensor) and value.dim() == 0, f"{where}: {key} must be a 0-d tensor"
        if key.endswith(("_max", "_min")):
            assert not torch.isnan(value), f"{where}: {key} is NaN"  # ±inf is the empty-set identity
        else:
            assert torch.isfinite(value), f"{where}: {key} = {value}"


# ----------------------------------------------------------------------------- lookup and hyper-parameters


@pytest.mark.parametrize("family,name", ALL_ENTRIES)
def test_every_registered_name_resolves(family, name):
    entry = registry.lookup(family, name)
    assert entry.name == name
    assert entry.description.strip() and entry.reference.strip(), f"{family} {name}: empty description/reference"
    plain = registry.resolve(family, name)
    assert plain.entry is entry and plain.kwargs == {}  # no hyper-parameters: the function as registered
    defaults = registry.hyperparameters(family, name)
    for key, default in defaults.items():
        # A hyper-parameter without a default would make a config that omits it fail at the first step.
        assert default is not inspect.Parameter.empty, f"{family} {name}: hyper-parameter {key!r} has no default"
    # Every reported hyper-parameter is accepted back, and binds as given.
    bound = registry.resolve(family, MethodSpec(name, dict(defaults)))
    assert bound.entry.fn is entry.fn and bound.kwargs == defaults


@pytest.mark.parametrize(
    "family,name,expected",
    [
        ("advantage", "grpo", {"eps": 1e-6, "std_unbiased": True}),  # grpo_advantages(*, eps=1e-6, std_unbiased=True)
        ("advantage", "rloo", {}),
        ("loss", "ppo_clip", {"clip_low": 0.2, "clip_high": 0.2, "dual_clip": None}),
        ("loss", "cispo", {"clip_high": 4.0, "clip_low": None}),
        ("correction", "token_tis", {"anchor": "old", "cap": 2.0}),
        ("aggregation", "token_mean", {}),  # the data arguments (loss, mask, counts) are not hyper-parameters
        ("kl", "kl_k3", {"log_ratio_clamp": 20.0, "kl_clamp": 10.0}),
        ("combiner", "sum", {}),  # model / distributed are context, not hyper-parameters
    ],
)
def test_hyperparameters_are_the_signature_defaults(family, name, expected):
    assert registry.hyperparameters(family, name) == expected


def test_partial_binds_only_the_given_hyperparameters():
    bound = registry.resolve("loss", MethodSpec("ppo_clip", {"clip_high": 0.28}))
    assert bound.kwargs == {"clip_high": 0.28}
    inputs = _random_inputs(0)
    expected = registry.lookup("loss", "ppo_clip").fn(inputs, clip_high=0.28).loss
    torch.testing.assert_close(bound(inputs).loss, expected)


@pytest.mark.parametrize("family", list(registry.FAMILIES))
def test_unknown_name_lists_every_valid_name(family):
    with pytest.raises(ConfigError) as info:
        registry.check(family, MethodSpec("no_such_method"))
    message = str(info.value)
    assert "no_such_method" in message and family in message
    for name in registry.FAMILIES[family].table:
        assert name in message, f"valid {family} {name!r} missing from: {message}"


def test_unknown_family_lists_the_families():
    with pytest.raises(ConfigError) as info:
        registry.lookup("losses", "ppo_clip")
    for family in registry.FAMILIES:
        assert family in str(info.value)


@pytest.mark.parametrize("family,name", ALL_ENTRIES)
def test_unknown_hyperparameter_lists_the_valid_keys(family, name):
    with pytest.raises(ConfigError) as info:
        registry.resolve(family, MethodSpec(name, {"not_a_knob": 1.0}))
    message = str(info.value)
    assert "'not_a_knob'" in message and repr(name) in message
    valid = registry.hyperparameters(family, name)
    for key in valid:
        assert key in message, f"valid key {key!r} of {family} {name!r} missing from: {message}"
    if not valid:
        assert "(none)" in message


def test_data_arguments_are_not_hyperparameters():
    # `mask` is data for an aggregation: binding it from a config must be refused, not silently accepted.
    with pytest.raises(ConfigError, match="'mask'"):
        registry.resolve("aggregation", MethodSpec("token_mean", {"mask": 1}))


# ----------------------------------------------------------------------------- uniform signatures


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", _entries("loss"))
def test_every_loss_keeps_the_uniform_signature(name, seed):
    inputs = _random_inputs(seed)
    result = registry.resolve("loss", name)(inputs)
    assert isinstance(result, LossResult) or (isinstance(result, tuple) and len(result) == 2)
    loss, metrics = result
    mask = inputs.response_mask
    assert loss.shape == mask.shape, f"{name}: loss shape {tuple(loss.shape)} != (B, T) {tuple(mask.shape)}"
    assert torch.isfinite(loss).all(), f"{name}: non-finite per-token loss (masked NaN garbage leaked?)"
    assert torch.equal(loss[~mask], torch.zeros_like(loss[~mask])), f"{name}: loss not 0 at masked positions"
    assert loss.requires_grad, f"{name}: the loss carries no gradient"
    _check_metrics(metrics, f"loss {name}")
    grads = torch.autograd.grad(loss.sum(), [inputs.logprobs, inputs.token_logits], allow_unused=True)
    assert any(g is not None for g in grads), f"{name}: no gradient reaches log-probs or logits"
    for grad in grads:
        if grad is not None:
            assert torch.isfinite(grad).all(), f"{name}: non-finite gradient"
            assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask])), f"{name}: gradient at masked positions"


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", _entries("correction"))
def test_every_correction_keeps_the_uniform_signature(name, seed):
    inputs = _random_inputs(seed)
    result = registry.resolve("correction", name)(inputs)
    assert isinstance(result, CorrectionResult) or (isinstance(result, tuple) and len(result) == 3)
    weights, keep, metrics = result
    mask = inputs.response_mask
    assert weights.shape == mask.shape and keep.shape == mask.shape, name
    assert keep.dtype == torch.bool, f"{name}: mask dtype {keep.dtype}"
    assert not weights.requires_grad, f"{name}: importance weights must be detached"
    assert torch.isfinite(weights).all(), f"{name}: non-finite weights"
    assert (weights[mask] >= 0).all(), f"{name}: negative importance weight"
    _check_metrics(metrics, f"correction {name}")


@pytest.mark.parametrize("name", _entries("aggregation"))
def test_every_aggregation_is_a_finite_scalar_that_splits_exactly(name):
    # Architecture rule: with the same GlobalCounts, micro-batch pieces add up to the whole-batch value.
    inputs = _random_inputs(3, batch=8)
    loss_bt, mask = inputs.logprobs.detach(), inputs.response_mask  # NaN at masked positions
    counts = GlobalCounts(num_tokens=mask.sum().double(), num_seqs=float(mask.shape[0]), max_len=5.0)
    aggregate = registry.resolve("aggregation", name)
    whole = aggregate(loss_bt, mask, counts)
    assert whole.dim() == 0 and torch.isfinite(whole), f"{name}: {whole}"
    pieces = aggregate(loss_bt[:3], mask[:3], counts) + aggregate(loss_bt[3:], mask[3:], counts)
    torch.testing.assert_close(pieces, whole, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", _entries("kl"))
def test_every_kl_estimator_is_zero_at_the_reference_and_finite(name):
    inputs = _random_inputs(4)
    kl = registry.resolve("kl", name)
    mask = inputs.response_mask
    value = kl(inputs.logprobs, inputs.ref_logprobs, mask)
    assert value.shape == mask.shape and torch.isfinite(value).all(), name
    assert torch.equal(value[~mask], torch.zeros_like(value[~mask])), f"{name}: not 0 at masked positions"
    (grad,) = torch.autograd.grad(value.sum(), inputs.logprobs)
    assert torch.isfinite(grad).all()
    # Every estimator of KL(π‖π_ref) is exactly 0 when π = π_ref (k1 = 0, k2 = 0, k3 = e⁰ − 0 − 1 = 0).
    same = kl(inputs.ref_logprobs, inputs.ref_logprobs, mask)
    assert torch.equal(same, torch.zeros_like(same)), name


@pytest.mark.parametrize("name", _entries("advantage"))
def test_every_advantage_estimator_keeps_the_uniform_signature(name):
    group_size = 4
    gen = torch.Generator().manual_seed(5)
    rewards = torch.randint(0, 2, (5 * group_size,), generator=gen).float()  # binary: valid for BNPO too
    rewards[:group_size] = 1.0  # group 0 has no signal
    rewards[group_size : 2 * group_size] = torch.tensor([0.0, 1.0, 1.0, 0.0])
    rewards[2 * group_size + 1] = math.nan  # a completion the reward function could not score
    data = {}
    if registry.lookup("advantage", name).reads_old_statistics:  # π_old's per-token statistics, T = 3
        per_token = torch.full((rewards.shape[0], 3), 0.5)
        data = {"old_logprobs": per_token.log(), "sum_pi_squared": per_token, "response_mask": per_token > 0}
    result = registry.resolve("advantage", name)(rewards, group_size, **data)
    assert isinstance(result, AdvantageResult)
    advantages, sample_mask, metrics = result
    if data:  # (B, T) advantages: check the first token of each completion
        assert advantages.shape == data["response_mask"].shape, name
        advantages = advantages[:, 0]
    assert advantages.shape == rewards.shape and sample_mask.shape == rewards.shape, name
    assert sample_mask.dtype == torch.bool
    assert torch.isfinite(advantages).all(), f"{name}: {advantages}"
    assert not advantages.requires_grad
    # Shared behaviour (ops/advantages.py docstring): a NaN reward gets advantage 0 and is left out of the loss;
    # a group whose rewards are all equal gets advantages exactly 0.
    assert advantages[2 * group_size + 1] == 0 and not sample_mask[2 * group_size + 1], name
    if name not in NO_BASELINE:
        assert torch.equal(advantages[:group_size], torch.zeros(group_size)), name
    assert advantages[group_size : 2 * group_size].abs().sum() > 0, f"{name}: a group with signal got no advantage"
    _check_metrics(metrics, f"advantage {name}")
    assert metrics["reward/nan_frac"].item() == pytest.approx(1 / 20)  # 1 NaN among 5 × 4 rewards


class _TinyNet(torch.nn.Module):
    """An `mlp` block and a head: combiners that track MLP parameters (PCR's default) find something."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh())
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(x))


@pytest.mark.parametrize("name", _entries("combiner"))
def test_every_combiner_produces_a_finite_gradient(name):
    model = _TinyNet()
    combiner = registry.build("combiner", name, model=model, distributed=False)
    assert isinstance(combiner, GradientCombiner), f"{name} is not a GradientCombiner"
    params = list(model.parameters())
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    combiner.begin(params)
    for chunk in x.split(2):  # three micro-batches
        out = model(chunk)
        combiner.backward({"policy": out[:, 0].pow(2).sum(), "kl": out[:, 1].sum()})
    metrics = combiner.finalize(params)
    _check_metrics(metrics, f"combiner {name}")
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), f"{name}: no gradient"
    for p in params:
        assert p.grad is None or torch.isfinite(p.grad).all()


def test_sum_combiner_gradient_is_the_gradient_of_the_sum():
    w = torch.nn.Parameter(torch.tensor([2.0]))
    combiner = registry.build("combiner", "sum", model=None, distributed=False)
    combiner.begin([w])
    combiner.backward({"policy": (w**2).sum(), "kl": (3 * w).sum()})  # d/dw (w² + 3w) = 2w + 3 = 7 at w = 2
    combiner.backward({"policy": w.sum()})  # second micro-batch accumulates: 7 + 1 = 8
    assert combiner.finalize([w]) == {}
    assert w.grad.tolist() == [8.0]


@pytest.mark.parametrize("name", _entries("token_filter"))
def test_every_token_filter_returns_masks_and_detached_weights(name):
    from steadyrl.models import build_tiny_model, tiny_model_config

    model = build_tiny_model(tiny_model_config("qwen2", vocab_size=24, hidden_size=16, num_layers=1, num_heads=2), seed=0)
    token_filter = registry.build("token_filter", name, model=model, distributed=False)
    assert isinstance(token_filter, TokenFilter), f"{name} is not a TokenFilter"
    inputs = _random_inputs(6)
    b, t = inputs.response_mask.shape
    hidden = torch.randn(b, t, 16) if token_filter.needs_hidden else None
    keep, weights, penalty, metrics = token_filter(inputs, hidden, 1e-3)
    assert keep.shape == (b, t) and keep.dtype == torch.bool
    assert weights.shape == (b, t) and not weights.requires_grad and torch.isfinite(weights).all()
    _check_metrics(metrics, f"token_filter {name}")
    assert penalty is None or (penalty.shape == (b, t) and torch.isfinite(penalty).all())


# ----------------------------------------------------------------------------- protocols and facts


@pytest.mark.parametrize("family,name", [(f, n) for f, n in ALL_ENTRIES if registry.FAMILIES[f].protocol])
def test_every_function_takes_its_familys_protocol_arguments_first(family, name):
    protocol = registry.FAMILIES[family].protocol
    expected = [p for p in inspect.signature(protocol.__call__).parameters if p != "self"]
    params = list(inspect.signature(registry.lookup(family, name).fn).parameters.values())
    positional = [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert positional == expected, f"{family} {name}: positional {positional}, the {protocol.__name__} takes {expected}"
    assert set(expected) <= set(registry.FAMILIES[family].data_params)


@pytest.mark.parametrize("name", _entries("loss"))
def test_trust_region_facts_name_real_numeric_hyperparameters(name):
    entry = registry.lookup("loss", name)
    defaults = registry.hyperparameters("loss", name)
    for key in entry.trust_region:
        assert key in defaults, f"loss {name}: trust_region names {key!r}, not a hyper-parameter"
    tightened = registry.resolve("loss", name).with_trust_region_scale(0.5)
    for key in entry.trust_region:
        if isinstance(defaults[key], float):
            assert tightened.kwargs[key] == pytest.approx(0.5 * defaults[key])


def test_trust_region_scale_starts_from_the_configured_widths():
    ppo = registry.resolve("loss", MethodSpec("ppo_clip", {"clip_high": 0.28}))
    assert ppo.with_trust_region_scale(0.5).kwargs == {"clip_low": 0.1, "clip_high": 0.14}
    assert registry.resolve("loss", "cispo").with_trust_region_scale(0.5).kwargs == {"clip_high": 2.0}  # None stays
    dppo = registry.resolve("loss", MethodSpec("dppo_binary_tv", {"is_cap": 10.0})).with_trust_region_scale(0.5)
    assert dppo.kwargs["is_cap"] == 10.0 and dppo.kwargs["delta_low"] == pytest.approx(0.5 * 0.15)
    lco = registry.resolve("loss", MethodSpec("lco_kld", {"rho_pos": 1.8})).with_trust_region_scale(0.5)
    assert lco.kwargs == {"rho_pos": 1.8}  # LCO has no trust region to tighten


def test_min_group_size_is_a_fact_of_the_advantage():
    assert registry.lookup("advantage", "grpo").min_group_size == 2
    assert registry.lookup("advantage", "mc_grpo").min_group_size == 1


def test_tasks_and_backends_build_from_the_registry():
    from steadyrl.models import ARITHMETIC_ALPHABET, build_char_tokenizer, build_tiny_model, tiny_model_config

    task = registry.build_task("arithmetic", max_digits=2, eval_size=5)
    assert len(task.eval_prompts()) == 5
    tokenizer = build_char_tokenizer(ARITHMETIC_ALPHABET)
    config = tiny_model_config("qwen2", vocab_size=len(tokenizer), hidden_size=16, num_layers=1, num_heads=2)
    model = build_tiny_model(config, seed=0)
    backend = registry.build_backend(MethodSpec("native", {"stop_check_every": 4}), model, tokenizer)
    assert type(backend).__name__ == "NativeRolloutBackend" and backend.stop_check_every == 4
    with pytest.raises(ConfigError, match="unknown setting.*'warp'.*valid: .*compile"):
        registry.check("rollout_backend", MethodSpec("native", {"warp": 9}))


# ----------------------------------------------------------------------------- every name has tests


def test_every_registered_function_is_named_in_another_test_file():
    texts = [p.read_text() for p in TESTS_DIR.rglob("*.py") if p.name != Path(__file__).name]
    missing = []
    for family, name in ALL_ENTRIES:
        symbol = registry.lookup(family, name).fn.__name__
        if not any(re.search(rf"\b{re.escape(symbol)}\b", text) for text in texts):
            missing.append(f"{family} {name!r} ({symbol})")
    assert not missing, (
        "registered methods without a test of their own (name the function or class in a test under tests/ "
        "other than test_registry.py): " + ", ".join(missing)
    )


def test_every_source_folder_is_a_package():
    # a folder without __init__.py works in an editable install and is missing from a wheel
    root = Path(__file__).resolve().parents[1] / "src" / "steadyrl"
    missing = [str(d.relative_to(root)) for d in root.rglob("*") if d.is_dir() and any(d.glob("*.py"))
               and not (d / "__init__.py").is_file()]
    assert not missing, f"add __init__.py to {missing}"
