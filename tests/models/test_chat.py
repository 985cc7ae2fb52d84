"""Prompt rendering: the tokenizer's chat template (system prompt, generation prompt) or raw text, the same in
rollouts, evaluation and demonstration batches. The templated tokenizer is built here (no download).

Run: .venv/bin/python -m pytest -q tests/models/test_chat.py
"""

from __future__ import annotations

import random
import string

import pytest
import torch

from sevens_task import SevensTask
from steadyrl.config import ConfigError, ModelConfig
from steadyrl.evaluate import evaluate
from steadyrl.models import build_char_tokenizer, build_tiny_model, tiny_model_config
from steadyrl.models.chat import PromptRenderer, renderer_for
from steadyrl.models.tokenizer import ARITHMETIC_ALPHABET
from steadyrl.rollout.base import SamplingParams
from steadyrl.rollout.hf import HFRolloutBackend
from steadyrl.rollout.text import encode_prompts
from steadyrl.tasks import Prompt
from steadyrl.tasks.demonstrations import demonstration_batch
from steadyrl.train.trainer import Trainer

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
ALPHABET = ARITHMETIC_ALPHABET + string.ascii_letters + "<>.?,"
PROMPT = Prompt(id="p", text="2+2=", answer="4")


@pytest.fixture
def chat_tokenizer():
    tokenizer = build_char_tokenizer(ALPHABET)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_auto_uses_the_template_with_system_and_generation_prompt(chat_tokenizer):
    renderer = PromptRenderer("auto", system_prompt="Be brief.")
    # the template by hand: one line per message, then the opened assistant turn
    assert renderer.text(chat_tokenizer, PROMPT) == "<system>Be brief.\n<user>2+2=\n<assistant>"
    assert renderer.encode(chat_tokenizer, PROMPT) == ids(chat_tokenizer, "<system>Be brief.\n<user>2+2=\n<assistant>")
    assert PromptRenderer().text(chat_tokenizer, PROMPT) == "<user>2+2=\n<assistant>"


def test_raw_and_no_template_tokenise_the_text_as_written(chat_tokenizer):
    plain = build_char_tokenizer(ALPHABET)
    assert PromptRenderer("auto").encode(plain, PROMPT) == plain("2+2=")["input_ids"]
    assert PromptRenderer("raw").encode(chat_tokenizer, PROMPT) == chat_tokenizer("2+2=")["input_ids"]
    assert not PromptRenderer("raw").uses_chat(chat_tokenizer) and PromptRenderer("chat").uses_chat(chat_tokenizer)


def test_a_conversation_is_rendered_as_given(chat_tokenizer):
    conversation = [{"role": "system", "content": "Add."}, {"role": "user", "content": "1+1="}]
    prompt = Prompt(id="c", text="1+1=", answer="2", meta={"messages": conversation})
    # its own system turn wins over the configured one
    assert PromptRenderer(system_prompt="Other.").text(chat_tokenizer, prompt) == "<system>Add.\n<user>1+1=\n<assistant>"
    with pytest.raises(ValueError, match="prompt 'c' is a conversation"):
        PromptRenderer("raw").encode(chat_tokenizer, prompt)


def test_impossible_settings_fail_early(chat_tokenizer):
    plain = build_char_tokenizer(ALPHABET)
    with pytest.raises(ValueError, match="prompt_format is chat but the tokenizer .* has no chat template"):
        PromptRenderer("chat").check(plain)
    with pytest.raises(ValueError, match="a system prompt needs the chat template, but the prompt format is raw"):
        PromptRenderer("raw", system_prompt="x")
    with pytest.raises(ValueError, match="a system prompt needs the chat template, but the tokenizer has none"):
        PromptRenderer("auto", system_prompt="x").check(plain)
    with pytest.raises(ValueError, match="valid: auto, chat, raw"):
        PromptRenderer("jinja")
    with pytest.raises(ConfigError, match="has no chat template"):
        renderer_for(ModelConfig(prompt_format="chat"), plain)
    assert renderer_for(ModelConfig(system_prompt="Hi."), chat_tokenizer) == PromptRenderer("auto", "Hi.")


def test_encode_prompts_left_pads_the_rendered_ids(chat_tokenizer):
    renderer = PromptRenderer(system_prompt="Be brief.")
    long_prompt = Prompt(id="q", text="12+34=", answer="46")
    prompt_ids, mask = encode_prompts(chat_tokenizer, [PROMPT, long_prompt], torch.device("cpu"), renderer)
    expected = renderer.encode(chat_tokenizer, PROMPT)
    assert prompt_ids[0, mask[0]].tolist() == expected
    assert mask[0].sum() == len(expected) and mask[1].all() and not mask[0, :2].any()


class SpyBackend(HFRolloutBackend):
    """Records the prompt ids of every generate call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[list[int]] = []

    def generate(self, prompt_ids, prompt_mask, params, generator=None):
        self.seen += [row[m].tolist() for row, m in zip(prompt_ids, prompt_mask)]
        return super().generate(prompt_ids, prompt_mask, params, generator=generator)


def test_eval_and_demonstrations_render_like_training(chat_tokenizer):
    renderer = PromptRenderer(system_prompt="Be brief.")
    model = build_tiny_model(tiny_model_config(vocab_size=len(chat_tokenizer), hidden_size=32, num_layers=1, num_heads=2))
    backend = SpyBackend(model, pad_token_id=chat_tokenizer.pad_token_id, eos_token_id=chat_tokenizer.eos_token_id)
    task = SevensTask()
    prompts = task.eval_prompts()[:3]
    evaluate(backend, chat_tokenizer, task, prompts, sampling=SamplingParams(max_new_tokens=2), pass_k=2, renderer=renderer)
    expected = [renderer.encode(chat_tokenizer, p) for p in prompts]
    assert backend.seen[:3] == expected  # greedy pass
    assert backend.seen[3:] == [e for e in expected for _ in range(2)]  # pass@k samples
    ids_, mask, labels = demonstration_batch(task, chat_tokenizer, prompts[:1], random.Random(0), "cpu", renderer)
    prompt_len = len(expected[0])
    assert ids_[0, :prompt_len].tolist() == expected[0] and (labels[0, :prompt_len] == -100).all()


def test_trainer_renders_with_the_configured_template(tiny_config, chat_tokenizer, tmp_path):
    model = build_tiny_model(tiny_model_config(vocab_size=len(chat_tokenizer), hidden_size=32, num_layers=1, num_heads=2))
    trainer = Trainer(tiny_config("model.system_prompt=Be brief."), model=model, tokenizer=chat_tokenizer, task=SevensTask())
    assert trainer.renderer == PromptRenderer("auto", "Be brief.") and trainer.collector.renderer is trainer.renderer
    spy = SpyBackend(model, pad_token_id=chat_tokenizer.pad_token_id, eos_token_id=chat_tokenizer.eos_token_id)
    trainer.collector.backend = spy
    collected = trainer.collector.collect(1)
    assert spy.seen[0] == trainer.renderer.encode(chat_tokenizer, collected.prompts[0])
    assert chat_tokenizer.decode(spy.seen[0]).startswith("<system>Be brief.\n<user>")
    with pytest.raises(ConfigError, match="has no chat template"):
        Trainer(tiny_config("model.prompt_format=chat", f"run.output_dir={tmp_path / 'chat-run'}"))
