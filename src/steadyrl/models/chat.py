"""How a prompt becomes token ids: the tokenizer's chat template, or the raw text.

    renderer = PromptRenderer("auto", system_prompt="Think step by step.")
    ids = renderer.encode(tokenizer, prompt)

``format`` (config ``model.prompt_format``):
  * ``auto`` (default): the chat template when the tokenizer has one, else the raw text;
  * ``chat``: the chat template, an error if the tokenizer has none;
  * ``raw``: ``tokenizer(prompt.text)`` exactly as written (the tokenizer's own BOS etc. added).

With the template, the messages are the prompt's own conversation when its task keeps one (``prompt.meta
["messages"]``, TRL's conversational format) or a single user turn holding ``prompt.text``; ``system_prompt``
comes first unless the conversation already starts with a system turn. The text is rendered with
``add_generation_prompt=True`` (the assistant turn is opened, so the completion is the assistant's answer) and
tokenised without adding special tokens again (the template writes them), as TRL does. Training rollouts,
evaluation and demonstration batches all go through the same renderer, so they see the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from steadyrl.tasks.base import Prompt
from steadyrl.tasks.python_task import MESSAGES_KEY

PROMPT_FORMATS = ("auto", "chat", "raw")


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


@dataclass(frozen=True)
class PromptRenderer:
    format: str = "auto"
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.format not in PROMPT_FORMATS:
            raise ValueError(f"prompt format {self.format!r}; valid: {', '.join(PROMPT_FORMATS)}.")
        if self.system_prompt is not None and self.format == "raw":
            raise ValueError(
                "a system prompt needs the chat template, but the prompt format is raw; set model.prompt_format "
                "to auto or chat, or put the instruction into the prompt text"
            )

    def uses_chat(self, tokenizer: Any) -> bool:
        """Whether prompts for ``tokenizer`` go through its chat template; raises if that is asked and impossible."""
        if self.format == "raw":
            return False
        if has_chat_template(tokenizer):
            return True
        if self.format == "chat":
            raise ValueError(
                f"model.prompt_format is chat but the tokenizer ({type(tokenizer).__name__}) has no chat template; "
                "set model.prompt_format=raw, or use a tokenizer (an instruct model) that has one"
            )
        if self.system_prompt is not None:
            raise ValueError(
                "a system prompt needs the chat template, but the tokenizer has none; drop model.system_prompt or "
                "use a tokenizer (an instruct model) that has a chat template"
            )
        return False

    def check(self, tokenizer: Any) -> None:
        """Fail before training when this renderer cannot work with ``tokenizer``."""
        self.uses_chat(tokenizer)

    def messages(self, prompt: Prompt) -> list[dict[str, str]]:
        conversation = prompt.meta.get(MESSAGES_KEY) if prompt.meta else None
        messages = list(conversation) if conversation else [{"role": "user", "content": prompt.text}]
        if self.system_prompt is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def text(self, tokenizer: Any, prompt: Prompt) -> str:
        """The prompt as the model reads it: the rendered chat text, or the raw text."""
        if not self.uses_chat(tokenizer):
            if prompt.meta and prompt.meta.get(MESSAGES_KEY):
                raise ValueError(
                    f"prompt {prompt.id!r} is a conversation (a list of messages), which needs a chat template; set "
                    "model.prompt_format to auto or chat with a tokenizer that has one, or give the prompts as text"
                )
            return prompt.text
        return tokenizer.apply_chat_template(self.messages(prompt), tokenize=False, add_generation_prompt=True)

    def encode(self, tokenizer: Any, prompt: Prompt) -> list[int]:
        """Token ids of the prompt, ready for generation."""
        if self.uses_chat(tokenizer):
            return list(tokenizer(self.text(tokenizer, prompt), add_special_tokens=False)["input_ids"])
        return list(tokenizer(self.text(tokenizer, prompt))["input_ids"])


def renderer_for(model_config: Any, tokenizer: Any) -> PromptRenderer:
    """The run's renderer from ``model.prompt_format`` / ``model.system_prompt``, checked against the tokenizer."""
    from steadyrl.config import ConfigError

    try:
        renderer = PromptRenderer(model_config.prompt_format, model_config.system_prompt)
        renderer.check(tokenizer)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    return renderer
