"""A character-level Hugging Face fast tokenizer for the tiny offline models.

Every character of the alphabet is one token; four special tokens come first so their ids are fixed:

    id 0 ``<pad>``   id 1 ``<eos>``   id 2 ``<bos>``   id 3 ``<unk>``   id 4.. the alphabet, in order

Nothing is inserted automatically on encode (no BOS, no EOS): the trainer appends the EOS id to SFT
demonstrations itself, and prompts are encoded exactly as written. Padding is on the left by default because
the tokenizer is mostly used to batch prompts for generation.

The result is an ordinary ``PreTrainedTokenizerFast`` that survives ``save_pretrained`` /
``AutoTokenizer.from_pretrained``, so a tiny model and its tokenizer can be saved and loaded like any hub
checkpoint.

Note: the literal strings ``<pad>``, ``<eos>``, ``<bos>`` and ``<unk>`` inside a text are read as the special
tokens (that is how Hugging Face added tokens work), even if ``<`` and ``>`` are in the alphabet.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
BOS_TOKEN = "<bos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, BOS_TOKEN, UNK_TOKEN)  # ids 0, 1, 2, 3

ARITHMETIC_ALPHABET = "0123456789+-*/=() \n"
"""Covers every prompt and answer of ``steadyrl.tasks.ArithmeticTask`` (digits, signs, ``=``, space, newline)."""


def build_char_tokenizer(alphabet: str, *, model_max_length: int = 256) -> PreTrainedTokenizerFast:
    """A fast tokenizer with one token per character of ``alphabet`` and the four special tokens.

    Args:
      alphabet: the characters the tokenizer knows; repeated characters are kept once (first occurrence
        fixes the id). Any other character encodes to ``<unk>``.
      model_max_length: recorded in the tokenizer config (truncation limit when asked for).

    Returns:
      ``PreTrainedTokenizerFast`` with pad id 0, eos id 1, bos id 2, unk id 3, ``padding_side="left"``,
      no automatic special tokens, and a decoder that joins characters without spaces (decode is the exact
      inverse of encode for any string over the alphabet).
    """
    if not isinstance(alphabet, str) or not alphabet:
        raise ValueError("alphabet must be a non-empty string of the characters the tokenizer should know")
    characters = list(dict.fromkeys(alphabet))
    vocab = {token: token_id for token_id, token in enumerate([*SPECIAL_TOKENS, *characters])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # [\s\S] (not ".") so that newlines are split off as characters too.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
