"""Loading tiny models / tokenizers back from disk, dtypes, and the error messages that name the fix.

Run: .venv/bin/python -m pytest -q tests/models/test_models_loading.py
"""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from steadyrl.models import (
    ARITHMETIC_ALPHABET,
    ModelLoadError,
    build_char_tokenizer,
    build_tiny_model,
    load_model,
    load_tokenizer,
    resolve_dtype,
    tiny_model_config,
)


@pytest.fixture(scope="module")
def saved_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tokenizer = build_char_tokenizer(ARITHMETIC_ALPHABET)
    config = tiny_model_config("qwen2", vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=4)
    model = build_tiny_model(config, seed=5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


def is_checkpointing(model) -> bool:
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_resolve_dtype():
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("BFloat16") is torch.bfloat16
    assert resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype("fp16") is torch.float16
    assert resolve_dtype(torch.float64) is torch.float64
    with pytest.raises(ModelLoadError, match="unknown dtype 'float8'"):
        resolve_dtype("float8")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype(32)


def test_load_model_weights_identical(saved_model_dir):
    path, original = saved_model_dir
    loaded = load_model(str(path))
    expected = original.state_dict()
    got = loaded.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert loaded.dtype == torch.float32
    assert not is_checkpointing(loaded)
    input_ids = torch.tensor([[4, 5, 6]])
    torch.testing.assert_close(loaded(input_ids).logits, original(input_ids).logits)


def test_load_model_bf16_and_gradient_checkpointing(saved_model_dir):
    path, original = saved_model_dir
    loaded = load_model(str(path), dtype="bfloat16", gradient_checkpointing=True, attn_implementation="eager")
    assert loaded.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert is_checkpointing(loaded)
    assert loaded.config.use_cache is False
    assert loaded.config._attn_implementation == "eager"
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(loaded.state_dict()[key], original.state_dict()[key].to(torch.bfloat16))
    loaded.train()
    input_ids = torch.tensor([[4, 5, 6, 7]])
    loss = loaded(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    assert loaded.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_load_tokenizer_round_trip(saved_model_dir):
    path, _ = saved_model_dir
    tokenizer = load_tokenizer(str(path))
    assert tokenizer.pad_token == "<pad>" and tokenizer.padding_side == "left"
    assert tokenizer.decode(tokenizer.encode("12+3=15")) == "12+3=15"
    right = load_tokenizer(str(path), padding_side="right", pad_token="<eos>")
    assert right.padding_side == "right" and right.pad_token_id == 1


def test_missing_local_path_names_the_fix(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match="does not exist; pass a Hugging Face hub id or a directory"):
        load_model(str(missing))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("./certainly/not/here")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_tokenizer("~/certainly-not-here-steadyrl")


def test_partially_existing_path_is_local(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    # "runs/step_5" looks like a hub id "org/name", but "runs" exists here, so it is a local path.
    with pytest.raises(ModelLoadError, match="model path runs/step_5 does not exist"):
        load_model("runs/step_5")


def test_directory_without_config_json(tmp_path):
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(str(tmp_path / "weights.bin"))


def test_tokenizer_without_pad_token(tmp_path):
    backend = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "</s>": 1, "a": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>").save_pretrained(
        tmp_path
    )
    with pytest.raises(ModelLoadError, match=r"no pad token; set `model.pad_token`.*'</s>'"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ModelLoadError, match="not in the vocabulary"):
        load_tokenizer(str(tmp_path), pad_token="<pad>")
    tokenizer = load_tokenizer(str(tmp_path), pad_token="</s>")
    assert tokenizer.pad_token_id == 1


def test_bad_padding_side(saved_model_dir):
    with pytest.raises(ModelLoadError, match="padding_side"):
        load_tokenizer(str(saved_model_dir[0]), padding_side="middle")


def test_hub_fetch_failure_offline(offline):
    with pytest.raises(
        ModelLoadError, match="could not be fetched from the Hugging Face hub.*local directory"
    ):
        load_model("steadyrl-test/no-such-model")
    with pytest.raises(ModelLoadError, match="could not be fetched"):
        load_tokenizer("steadyrl-test/no-such-model")
