"""llm.tuning: the checks and dict round trip both tuning configs share."""

from __future__ import annotations

import pytest

from llm.classify import ClassifyConfig
from llm.finetune import FinetuneConfig


@pytest.mark.parametrize("config", [ClassifyConfig, FinetuneConfig])
@pytest.mark.parametrize("field, value, rule", [
    ("lr", 0.0, "must be > 0"), ("min_lr", 1.0, "must be in"), ("warmup_steps", -1, "must be >= 0"),
    ("weight_decay", -0.1, "must be >= 0"), ("grad_clip", -1.0, "must be >= 0"), ("eval_every", -1, "must be >= 0"),
    ("seed", -1, "must be >= 0"), ("device", "tpu", "must be one of"), ("threads", -2, "must be >= 0"),
])
def test_both_configs_check_the_shared_knobs_naming_themselves(config, field, value, rule):
    with pytest.raises(ValueError, match=f"{config.__name__}.{field} {rule}"):
        config(**{field: value})


@pytest.mark.parametrize("config", [ClassifyConfig, FinetuneConfig])
def test_lora_problems_and_unknown_keys_name_the_config_and_dicts_round_trip(config):
    with pytest.raises(ValueError, match=f"{config.__name__}.lora_.*rank"):
        config(lora_rank=0)
    with pytest.raises(ValueError, match=f"unknown {config.__name__} field.*'lr_max'"):
        config.from_dict({"lr_max": 1.0})
    assert config(lora_targets="qkv").lora_targets == ("qkv",)
    plain = config().to_dict()
    assert all(not isinstance(v, tuple) for v in plain.values())   # YAML- and JSON-ready
    assert config.from_dict(plain) == config()
