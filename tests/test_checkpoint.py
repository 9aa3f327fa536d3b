"""The model folder (weights, config, tokenizer): one pair of functions writes and reads it, for the
stages, the classifier and the server. (Training checkpoints are tested with training, in test_train.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from llm.checkpoint import (
    CheckpointMismatch,
    load_model_dir,
    missing_model_files,
    read_config,
    save_checkpoint,
    save_model_dir,
)
from llm.model import GPT, ModelConfig
from llm.tokenizer import train_char

TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world"] * 5


def tiny(vocab_size: int) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig.from_preset("tiny", n_layer=1, d_model=64, n_head=4, vocab_size=vocab_size))


def test_a_model_folder_round_trips(tmp_path):
    tokenizer = train_char(TEXTS, progress=False)
    model = tiny(tokenizer.vocab_size)
    folder = save_model_dir(model, tokenizer, tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer"]
    assert missing_model_files(folder) == [] and read_config(folder) == model.config
    loaded, loaded_tokenizer = load_model_dir(folder)
    assert loaded_tokenizer.fingerprint() == tokenizer.fingerprint()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_a_folder_written_piecewise_as_before_still_loads(tmp_path):
    tokenizer = train_char(TEXTS, progress=False)
    model = tiny(tokenizer.vocab_size)
    save_checkpoint(model, tmp_path)          # how the stages wrote it: weights and config,
    tokenizer.save(tmp_path / "tokenizer")    # then the tokenizer beside them
    loaded, _ = load_model_dir(tmp_path)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_own_file_names_and_a_model_built_by_the_caller(tmp_path):
    tokenizer = train_char(TEXTS, progress=False)
    model = tiny(tokenizer.vocab_size)
    save_model_dir(model, tokenizer, tmp_path, weights_file="other.safetensors", config_file="other.json",
                   config={"kind": "test"})
    assert json.loads((tmp_path / "other.json").read_text()) == {"kind": "test"}
    assert missing_model_files(tmp_path)  # not a plain model folder
    loaded, _ = load_model_dir(tmp_path, model=GPT(model.config), weights_file="other.safetensors")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_a_tokenizer_that_does_not_fit_the_weights_is_refused(tmp_path):
    tokenizer = train_char(TEXTS, progress=False)
    save_model_dir(tiny(tokenizer.vocab_size - 1), tokenizer, tmp_path)
    with pytest.raises(CheckpointMismatch, match="do not belong together"):
        load_model_dir(tmp_path)
