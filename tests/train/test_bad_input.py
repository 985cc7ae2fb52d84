"""Bad input fails fast, before training, with one sentence that names the fix (issue "End-to-end").

    .venv/bin/python -m pytest -q tests/train/test_bad_input.py

Covered: unknown config keys / method names / hyper-parameters, a model path that does not exist, a tokenizer
without a pad token, a reward function that raises or returns a non-number, a reward function that returns
None / NaN (training goes on; counted, masked, left out of the baseline), and batch arithmetic that cannot work.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from sevens_task import SevensTask
from steadyrl.config import ConfigError
from steadyrl.models import ModelLoadError, build_char_tokenizer, build_tiny_model, tiny_model_config
from steadyrl.models.tokenizer import ARITHMETIC_ALPHABET
from steadyrl.report import read_metrics
from steadyrl.runtime.checkpoint import save_pretrained_atomic
from steadyrl.runtime.distributed import DistInfo
from steadyrl.tasks import RewardError
from steadyrl.train.setup import validate_batch_arithmetic
from steadyrl.train.trainer import Trainer


class SpyTask(SevensTask):
    """SevensTask that counts how often prompts were drawn: 0 means no rollout was started."""

    def __init__(self) -> None:
        self.samples = 0

    def sample(self, split, n, seed):
        self.samples += 1
        return super().sample(split, n, seed)


def _fails_in_init(cfg, error: type[Exception], *fragments: str) -> str:
    """Trainer(cfg) raises ``error`` whose one-line message holds every fragment; nothing was sampled."""
    task = SpyTask()
    with pytest.raises(error) as info:
        Trainer(cfg, task=task)
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert task.samples == 0, "a rollout started before the error"
    return message


# ----------------------------------------------------------------------------- config


def test_unknown_config_key_lists_the_valid_keys(tiny_config):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'lrr' in section 'optim'; valid keys: steps, lr"):
        tiny_config("optim.lrr=1e-3")


def test_unknown_method_name_fails_in_init_before_the_model_is_loaded(tiny_config):
    # The model path is bad too: the registry error comes first, so nothing heavy was loaded before it.
    cfg = tiny_config("loss.name=ppo_clipp", "model.name_or_path=/no/such/model")
    _fails_in_init(cfg, ConfigError, "'ppo_clipp'", "valid names:", "ppo_clip,")


def test_unknown_hyperparameter_fails_in_init(tiny_config):
    cfg = tiny_config("loss.clip_hi=0.28")
    _fails_in_init(cfg, ConfigError, "'clip_hi'", "valid: clip_low, clip_high, dual_clip")


@pytest.mark.parametrize("coef", ["0.1", "0"])  # checked even while the penalty is off
def test_unknown_kl_estimator_fails_in_init(tiny_config, coef):
    cfg = tiny_config(f"kl.coef={coef}", "kl.estimator=k3")
    _fails_in_init(cfg, ConfigError, "unknown kl 'k3'", "kl_k3")


def test_negative_kl_coefficient_fails_in_init(tiny_config):
    _fails_in_init(tiny_config("kl.coef=-0.1"), ConfigError, "kl.coef=-0.1 is negative", ">= 0")


# ----------------------------------------------------------------------------- model and tokenizer


def test_model_path_that_does_not_exist(tiny_config, tmp_path):
    missing = tmp_path / "no-such-model"
    _fails_in_init(
        tiny_config(f"model.name_or_path={missing}"),
        ModelLoadError,
        f"model path {missing} does not exist",
        "pass a Hugging Face hub id or a directory containing config.json",
    )


def test_model_directory_without_a_checkpoint(tiny_config, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    task = SpyTask()
    with pytest.raises(ModelLoadError) as info:
        Trainer(tiny_config(f"model.name_or_path={empty}"), task=task)
    assert str(empty) in str(info.value) and "save_pretrained" in str(info.value)
    assert task.samples == 0


def test_model_directory_without_a_checkpoint_is_one_line(tiny_config, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails_in_init(tiny_config(f"model.name_or_path={empty}"), ModelLoadError, str(empty))


def test_unknown_embedded_model_lists_the_available_ones(tiny_config):
    _fails_in_init(tiny_config("model.name_or_path=embedded:no-such"), ConfigError, "no embedded model 'no-such'")


def _without_pad_token(src, dst):
    shutil.copytree(src, dst)
    config_file = dst / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    del config["pad_token"]
    config_file.write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def model_without_pad(tmp_path_factory):
    """A tiny Llama whose saved char tokenizer has no pad token.

    Llama, not the conftest's Qwen2: transformers 5 loads a Qwen2 checkpoint's tokenizer as Qwen2Tokenizer,
    which silently invents a pad token (caught by check_tokenizer_fits_model, see the test below).
    """
    tok = build_char_tokenizer(ARITHMETIC_ALPHABET)
    cfg = tiny_model_config("llama", vocab_size=len(tok), hidden_size=32, num_layers=1, num_heads=2)
    saved = tmp_path_factory.mktemp("llama") / "with-pad"
    save_pretrained_atomic(build_tiny_model(cfg, seed=0), tok, saved)
    return _without_pad_token(saved, saved.parent / "no-pad")


def test_tokenizer_without_a_pad_token_names_the_setting(tiny_config, model_without_pad):
    _fails_in_init(
        tiny_config(f"model.name_or_path={model_without_pad}"),
        ModelLoadError,
        "has no pad token",
        "set `model.pad_token`",
        "'<eos>'",  # it also suggests the value
    )


def test_tokenizer_without_a_pad_token_is_caught_for_qwen2_too(tiny_config, tiny_model_dir, tmp_path):
    no_pad = _without_pad_token(Path(tiny_model_dir), tmp_path / "qwen2-no-pad")
    task = SpyTask()
    try:
        trainer = Trainer(tiny_config(f"model.name_or_path={no_pad}"), task=task)
    except ModelLoadError as error:
        assert "model.pad_token" in str(error) and task.samples == 0
        return
    trainer.rl_step(1)  # what happens today: an embedding lookup of the invented pad id
    pytest.fail("a tokenizer without a pad token was accepted")


def test_the_suggested_pad_token_fixes_it(tiny_config, model_without_pad):
    trainer = Trainer(tiny_config(f"model.name_or_path={model_without_pad}", "model.pad_token=<eos>"), task=SevensTask())
    assert trainer.tokenizer.pad_token == "<eos>"
    assert math.isfinite(trainer.rl_step(1)["policy/loss"])


def test_pad_token_not_in_the_vocabulary(tiny_config, model_without_pad):
    _fails_in_init(
        tiny_config(f"model.name_or_path={model_without_pad}", "model.pad_token=<sep>"),
        ModelLoadError,
        "'<sep>' is not in the vocabulary",
        "set `model.pad_token`",
    )


# ----------------------------------------------------------------------------- reward functions


class RaisingTask(SevensTask):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []

    def reward(self, prompt, completion):
        self.seen.append((prompt.id, prompt.text, completion))
        raise KeyError("answer")


def test_reward_that_raises_names_the_prompt_and_the_completion(tiny_config):
    task = RaisingTask()
    trainer = Trainer(tiny_config(), task=task)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(RewardError) as info:
        trainer.train()
    message = str(info.value)
    prompt_id, prompt_text, completion = task.seen[0]  # the first completion of the first step
    assert len(task.seen) == 1
    assert f"prompt id {prompt_id!r}" in message and repr(prompt_text) in message
    assert f"completion {completion!r}" in message
    assert "KeyError" in message and "Fix the reward function" in message
    assert isinstance(info.value.__cause__, KeyError)  # the original traceback is kept
    for a, b in zip(before, trainer.model.parameters()):
        assert torch.equal(a, b)  # no update happened


@pytest.mark.parametrize("bad", ["1.0", math.inf, [1.0]])
def test_reward_that_is_not_a_finite_number(tiny_config, bad):
    class BadValueTask(SevensTask):
        def reward(self, prompt, completion):
            return bad

    trainer = Trainer(tiny_config(), task=BadValueTask())
    with pytest.raises(RewardError, match="return a finite float"):
        trainer.rl_step(1)


class SometimesUnscorableTask(SevensTask):
    """Every third completion cannot be scored: None, then NaN, alternately."""

    def __init__(self) -> None:
        self.calls = 0

    def reward(self, prompt, completion):
        self.calls += 1
        if self.calls % 3 == 0:
            return None if self.calls % 2 else math.nan
        return super().reward(prompt, completion)


def test_unscorable_completions_are_masked_and_left_out_of_the_baseline(tiny_config):
    trainer = Trainer(tiny_config(), task=SometimesUnscorableTask())
    collected = trainer.collector.collect(1)
    batch = collected.batch
    missing = torch.isnan(batch.rewards)
    assert missing.sum() == 5  # calls 3, 6, 9, 12, 15 of 16
    assert not batch.sample_mask[missing].any() and batch.sample_mask[~missing].all()
    assert (batch.advantages[missing] == 0).all()
    assert not batch.token_mask[missing].any()  # so they add nothing to the loss or to its normalisers
    assert collected.metrics["reward/nan_frac"].item() == pytest.approx(5 / 16)
    # Baseline over the scored members only (GRPO, §6.1): Â = (R − mean) / (std_unbiased + 1e-6), loop reference.
    group = trainer.cfg.rollout.group_size
    for g in range(batch.rewards.numel() // group):
        rows = list(range(g * group, (g + 1) * group))
        valid = [i for i in rows if not math.isnan(batch.rewards[i].item())]
        values = [batch.rewards[i].item() for i in valid]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))
        for i, v in zip(valid, values):
            expected = 0.0 if max(values) == min(values) else (v - mean) / (std + 1e-6)
            assert batch.advantages[i, 0].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_training_goes_on_and_counts_unscorable_completions(tiny_config):
    cfg = tiny_config()
    summary = Trainer(cfg, task=SometimesUnscorableTask()).train()
    rows = read_metrics(cfg.run.output_dir)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["reward/nan_frac"] > 0 for r in rows)
    assert all(math.isfinite(r["policy/loss"]) and math.isfinite(r["reward/mean"]) for r in rows)
    assert summary["skipped_steps"] == 0


# ----------------------------------------------------------------------------- batch arithmetic


@pytest.mark.parametrize(
    "overrides,world_size,fragments",
    [
        # 4 prompts cannot be shared by 3 ranks that each keep whole groups
        (("rollout.prompts_per_step=4",), 3, ("over 3 processes", "make it a multiple of 3")),
        # 4 prompts x 4 completions = 16 per process; 3 mini-batches do not divide it
        (("optim.mini_batches=3",), 1, ("16 completions per process", "choose a divisor of 16")),
        # 6 prompts / 2 ranks x 4 = 12 per process; 8 mini-batches do not divide it
        (("rollout.prompts_per_step=6", "optim.mini_batches=8"), 2, ("12 completions", "divisor of 12")),
        (("rollout.group_size=1",), 1, ("group_size is 1", "at least 2")),
        (("optim.micro_batch_size=0",), 1, ("micro_batch_size", "at least 1")),
        (("rollout.max_new_tokens=0",), 1, ("max_new_tokens must be at least 1",)),
        (("rollout.temperature=0",), 1, ("temperature must be > 0",)),
    ],
)
def test_batch_arithmetic_that_cannot_work(tiny_config, overrides, world_size, fragments):
    cfg = tiny_config(*overrides)
    with pytest.raises(ConfigError) as info:
        validate_batch_arithmetic(cfg, DistInfo(rank=0, world_size=world_size))
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_batch_arithmetic_that_works(tiny_config):
    # 6 prompts over 3 ranks: 2 prompts x 4 = 8 per rank, 4 mini-batches of 2 completions
    validate_batch_arithmetic(tiny_config("rollout.prompts_per_step=6", "optim.mini_batches=4"), DistInfo(0, 3))
    # one completion per prompt is fine for the estimator that does not need a group (MC-GRPO's pivot aside)
    validate_batch_arithmetic(tiny_config("rollout.group_size=1", "advantage.name=mc_grpo"), DistInfo())


def test_batch_arithmetic_is_checked_in_init(tiny_config):
    _fails_in_init(tiny_config("optim.mini_batches=5"), ConfigError, "optim.mini_batches=5", "choose a divisor of 16")


def test_reusing_a_run_directory_without_resume_is_refused(tiny_config, tmp_path):
    # A finished run, then a second one in the same directory with run.resume=false: refused before any
    # rollout, and the first run's files are untouched.
    out = tmp_path / "shared"
    Trainer(tiny_config(f"run.output_dir={out}"), task=SevensTask()).train()
    before = (out / "metrics.jsonl").read_text()
    _fails_in_init(tiny_config(f"run.output_dir={out}", "run.resume=false"), ConfigError, "already holds a run")
    assert (out / "metrics.jsonl").read_text() == before


def test_embedded_available_knows_the_shipped_models():
    from steadyrl.train.setup import embedded_available

    assert embedded_available("tiny-adder") and embedded_available("tiny-adder-moe")
    assert not embedded_available("no-such")


@pytest.mark.parametrize(
    "override,message",
    [
        ("loss.clip_high=abc", r"loss 'ppo_clip': clip_high='abc' is not valid; clip_high must be a number"),
        ("loss.clip_low=-0.2", r"loss 'ppo_clip': clip_low=-0.2 is negative; it must be >= 0"),
        ("correction={name: token_tis, cap: -1}", r"correction 'token_tis': cap=-1 is negative"),
        ("checkpoint.keep_last=0", r"keep_last >= 1"),
        ("checkpoint.every=-1", r"every must be >= 0"),
    ],
)
def test_bad_values_fail_before_anything_is_loaded(tiny_config, tmp_path, override, message):
    # the model path does not exist: reaching the loader would raise a different error
    cfg = tiny_config(override, f"model.name_or_path={tmp_path / 'no-model-here'}")
    with pytest.raises(ConfigError, match=message):
        Trainer(cfg, task=SevensTask())


def test_a_killed_run_has_checkpoints_to_resume_by_default(tiny_config):
    from steadyrl.config import CheckpointConfig

    assert CheckpointConfig().every == 10 and CheckpointConfig().keep_last >= 1


def test_a_tokenizer_larger_than_the_embedding_fails_at_start(tiny_config, tmp_path):
    tokenizer = build_char_tokenizer(ARITHMETIC_ALPHABET)
    small = tiny_model_config("qwen2", vocab_size=len(tokenizer) - 2, hidden_size=16, num_layers=1, num_heads=2)
    path = tmp_path / "small-embedding"
    save_pretrained_atomic(build_tiny_model(small, seed=0), tokenizer, path)
    with pytest.raises(ModelLoadError, match=rf"2 token\(s\) with ids from {len(tokenizer) - 2} up, outside the model's {len(tokenizer) - 2}-row"):
        Trainer(tiny_config(f"model.name_or_path={path}"), task=SevensTask())
