"""params.yaml validation: bad values stop a stage with a message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.params import ConfigError, load_params

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, data) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def base() -> dict:
    return {"download": {"sources": [{"name": "a", "uri": "file:x.txt", "role": "pretrain"}]}}


def test_the_repository_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert {s.role for s in params.download.sources} >= {"pretrain", "tokenizer-eval", "classify", "instruct"}
    assert all(s.sha256 for s in params.download.sources)


def test_unknown_key_lists_allowed_keys(tmp_path):
    data = base()
    data["download"]["cache"] = "x"
    with pytest.raises(ConfigError, match=r"unknown key 'download.cache'; allowed keys: sources, cache_dir"):
        load_params(write(tmp_path, data))


def test_unknown_key_inside_a_list_item(tmp_path):
    data = base()
    data["download"]["sources"][0]["sha"] = "x"
    with pytest.raises(ConfigError, match=r"unknown key 'download.sources.0.sha'; allowed keys: name, uri, role"):
        load_params(write(tmp_path, data))


@pytest.mark.parametrize("change, message", [
    ({"timeout_s": -1}, r"download.timeout_s: Input should be greater than 0 \(got -1\)"),
    ({"retries": "two"}, r"download.retries: Input should be a valid integer"),
    ({"retries": True}, r"download.retries: Input should be a valid integer"),
])
def test_wrong_types_and_impossible_values(tmp_path, change, message):
    data = base()
    data["download"].update(change)
    with pytest.raises(ConfigError, match=message):
        load_params(write(tmp_path, data))


def test_wrong_literal_lists_allowed_values(tmp_path):
    data = base()
    data["download"]["sources"][0]["role"] = "pretrian"
    with pytest.raises(ConfigError, match=r"role: Input should be 'pretrain', 'tokenizer-eval'.*got 'pretrian'"):
        load_params(write(tmp_path, data))


def test_unknown_scheme_and_unpinned_download(tmp_path):
    data = base()
    data["download"]["sources"][0]["uri"] = "ftp://example.invalid/x"
    with pytest.raises(ConfigError, match=r"sources.0.uri: unknown URI scheme 'ftp'.*allowed: pypi, file, https"):
        load_params(write(tmp_path, data))
    data["download"]["sources"][0]["uri"] = "pypi:pkg==1.0"
    with pytest.raises(ConfigError, match=r"source 'a': a sha256 is required"):
        load_params(write(tmp_path, data))


def test_duplicate_source_names(tmp_path):
    data = base()
    data["download"]["sources"] *= 2
    with pytest.raises(ConfigError, match="repeated: a"):
        load_params(write(tmp_path, data))


def test_missing_section_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="download: required key is missing"):
        load_params(write(tmp_path, {"project": {"name": "x"}}))
    (tmp_path / "params.yaml").write_text("download: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_the_depth_dial_builds_the_model_and_a_bad_depth_is_named(tmp_path):
    data = base()
    data["pretrain"] = {"model": {"preset": "llama-tiny", "depth": 6, "vocab_size": 512}}
    config = load_params(write(tmp_path, data)).pretrain.model.build()
    assert (config.n_layer, config.d_model, config.n_kv_head, config.vocab_size) == (6, 384, 3, 512)
    data["pretrain"]["model"]["depth"] = 0
    with pytest.raises(ConfigError, match=r"pretrain.model.*depth must be an integer >= 1"):
        load_params(write(tmp_path, data))


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    # `dvc exp run -S pretrain.train.lr=1e-3` writes `lr: 1e-3` back; YAML 1.1 would read a string
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(base()) + "pretrain:\n  train:\n    lr: 7e-3\n    min_lr: 1E-4\n")
    train = load_params(path).pretrain.train
    assert (train.lr, train.min_lr) == (0.007, 0.0001)


def test_snapshot_settings_are_checked_with_the_pretrain_section(tmp_path):
    data = base()
    data["pretrain"] = {"snapshots": {"keep": 2, "tokens": 16}}
    assert load_params(write(tmp_path, data)).pretrain.snapshots.build().keep == 2
    data["pretrain"]["snapshots"]["keep"] = -1
    with pytest.raises(ConfigError, match=r"pretrain.snapshots.*keep must be >= 0"):
        load_params(write(tmp_path, data))
    data["instruct"] = {"snapshots": {"top_k": 0}}   # the instruct stage's, same schema
    data["pretrain"]["snapshots"]["keep"] = 2
    with pytest.raises(ConfigError, match=r"instruct.snapshots.*top_k must be >= 1"):
        load_params(write(tmp_path, data))
