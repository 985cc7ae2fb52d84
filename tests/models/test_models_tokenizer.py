"""Character tokenizer: exact round trips, fixed special ids, no automatic specials, save / load.

Run: .venv/bin/python -m pytest -q tests/models/test_models_tokenizer.py
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from steadyrl.models import ARITHMETIC_ALPHABET, SPECIAL_TOKENS, build_char_tokenizer

TOKENIZER = build_char_tokenizer(ARITHMETIC_ALPHABET)


def test_special_token_ids_are_fixed():
    tok = build_char_tokenizer("ab")
    assert isinstance(tok, PreTrainedTokenizerFast)
    # pad 0, eos 1, bos 2, unk 3, then "a" 4, "b" 5
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert SPECIAL_TOKENS == ("<pad>", "<eos>", "<bos>", "<unk>")
    assert tok.convert_tokens_to_ids(["a", "b"]) == [4, 5]
    assert len(tok) == 6
    assert tok.padding_side == "left"
    assert tok.model_max_length == 256


def test_one_token_per_character_and_no_automatic_specials():
    tok = build_char_tokenizer("ab ")
    # "ab a" -> a b ␠ a -> 4 5 6 4, no bos / eos added even with add_special_tokens=True
    assert tok.encode("ab a") == [4, 5, 6, 4]
    assert tok("ab a", add_special_tokens=True)["input_ids"] == [4, 5, 6, 4]
    assert tok.encode("  ") == [6, 6]  # spaces are not merged or dropped


def test_repeated_alphabet_characters_keep_first_id():
    tok = build_char_tokenizer("abca")
    assert len(tok) == 4 + 3
    assert tok.encode("cab") == [6, 4, 5]


def test_unknown_character_is_unk():
    tok = build_char_tokenizer("ab")
    assert tok.encode("azb") == [4, 3, 5]


def test_decode_exact_and_skip_special_tokens():
    text = "12+(3*4)=\n -5"
    ids = TOKENIZER.encode(text)
    assert len(ids) == len(text)
    assert TOKENIZER.decode(ids) == text
    with_specials = [TOKENIZER.bos_token_id, *ids, TOKENIZER.eos_token_id, TOKENIZER.pad_token_id]
    assert TOKENIZER.decode(with_specials) == "<bos>" + text + "<eos><pad>"
    assert TOKENIZER.decode(with_specials, skip_special_tokens=True) == text


def test_left_padding_batch():
    out = TOKENIZER(["1", "123"], padding=True)
    one, two, three = TOKENIZER.convert_tokens_to_ids(["1", "2", "3"])
    assert out["input_ids"] == [[0, 0, one], [one, two, three]]
    assert out["attention_mask"] == [[0, 0, 1], [1, 1, 1]]


@settings(deadline=None, max_examples=60)
@given(st.text(alphabet=ARITHMETIC_ALPHABET, max_size=40))
def test_round_trip_any_alphabet_string(text):
    ids = TOKENIZER.encode(text)
    assert len(ids) == len(text)
    assert TOKENIZER.unk_token_id not in ids
    assert TOKENIZER.decode(ids) == text


def test_save_and_autotokenizer_load(tmp_path):
    TOKENIZER.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "987-65=922\n"
    assert loaded.encode(text) == TOKENIZER.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
    assert loaded.get_vocab() == TOKENIZER.get_vocab()
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id) == (0, 1, 2)
    assert loaded.padding_side == "left"
    assert loaded.decode([2, *loaded.encode("7"), 1], skip_special_tokens=True) == "7"


def test_empty_alphabet_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        build_char_tokenizer("")
