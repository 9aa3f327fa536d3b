"""Instruction tuning: the loss mask, packed vs padded, bad records, LoRA, determinism, config."""

from __future__ import annotations

import random

import pytest
import torch

from llm.chat import encode_example
from llm.data import pack_examples
from llm.finetune import (
    FinetuneConfig,
    encode_records,
    evaluate_loss,
    finetune,
    fixed_batches,
    split_records,
)
from llm.model import GPT, IGNORE_INDEX, ModelConfig
from llm.tokenizer import END, train_char

WORDS = "cat dog bird fish tree house river stone cloud light".split()


def make_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(1, 4))
        if rng.random() < 0.5:
            records.append({"instruction": "Reverse the words.", "input": " ".join(words),
                            "output": " ".join(reversed(words))})
        else:
            records.append({"instruction": f"Repeat the word {words[0]} twice.", "input": "",
                            "output": f"{words[0]} {words[0]}"})
    return records


@pytest.fixture(scope="module")
def tokenizer():
    texts = [" ".join(r.values()) for r in make_records(50)] + ["Reverse Repeat twice ."]
    return train_char(texts, progress=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_gpt(tokenizer, context: int = 96) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=context, n_layer=2, n_head=2, d_model=32))


def quick(**overrides) -> FinetuneConfig:
    values = dict(epochs=1, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=2, seed=1, progress=False,
                  device="cpu", lora_dropout=0.0)
    return FinetuneConfig(**{**values, **overrides})


# --- the loss mask ----------------------------------------------------------------------------------

def test_response_only_mask_covers_exactly_the_response_and_its_end_token(tokenizer):
    record = {"instruction": "Reverse the words.", "input": "cat dog", "output": "dog cat"}
    [example], report = encode_records(tokenizer, [record], seq_len=96)
    assert report.used == 1
    rows, _ = pack_examples([example], 96, too_long="drop")
    learned = rows.targets[rows.targets != IGNORE_INDEX].tolist()
    assert tokenizer.decode(learned) == "dog cat" + END
    # and everything before it is prompt: the model reads it but is not trained to produce it
    ids = example[0]
    first_learned = example[1].index(True)
    assert tokenizer.decode(ids[:first_learned]).endswith("<|assistant|>")
    assert "dog cat" not in tokenizer.decode(ids[:first_learned]).split("<|assistant|>")[-1]


def test_loss_on_all_learns_every_next_token(tokenizer):
    record = {"instruction": "Repeat the word cat twice.", "input": "", "output": "cat cat"}
    [(ids, mask)], _ = encode_records(tokenizer, [record], seq_len=96, loss_on="all")
    rows, _ = pack_examples([(ids, mask)], 96, too_long="drop")
    learned = rows.targets[rows.targets != IGNORE_INDEX].tolist()
    assert learned == list(ids[1:])


# --- bad records ------------------------------------------------------------------------------------

def test_bad_records_are_skipped_and_counted_never_raised(tokenizer):
    good = make_records(6)
    bad = [
        {"instruction": "No output here."},                               # missing field
        {"input": "x", "output": "y"},                                    # missing field
        "not a record",                                                   # missing field (not a dict)
        {"instruction": "Numbers.", "input": "", "output": 42},           # not a string
        {"instruction": "List input.", "input": ["a"], "output": "b"},     # not a string
        {"instruction": "   ", "input": "", "output": "x"},               # empty
        {"instruction": "Long.", "input": "", "output": "cat " * 100},    # too long for the rows
    ]
    result = finetune(tiny_gpt(tokenizer), tokenizer, good + bad, good[:2], quick(max_steps=2, too_long="drop"))
    report = result.train_records
    assert (report.records, report.used, report.skipped) == (13, 6, 7)
    assert (report.missing_field, report.not_string, report.empty, report.too_long) == (3, 2, 1, 1)
    assert len(report.examples_of_problems) == 5 and "missing field" in report.examples_of_problems[0]


def test_too_long_records_are_truncated_when_asked_and_prompt_only_leftovers_skipped(tokenizer):
    long_answer = {"instruction": "Long.", "input": "", "output": "cat " * 100}
    long_prompt = {"instruction": "Long " * 100, "input": "", "output": "cat"}
    examples, report = encode_records(tokenizer, [long_answer, long_prompt], seq_len=64, too_long="truncate")
    assert (report.truncated, report.no_response_left, report.used) == (1, 1, 1)
    assert len(examples[0][0]) == 65      # 64 positions: inputs ids[:-1], targets ids[1:]


def test_alpaca_records_without_an_input_field_are_fine(tokenizer):
    examples, report = encode_records(tokenizer, [{"instruction": "Say cat.", "output": "cat"}], seq_len=96)
    assert report.used == 1
    assert examples[0][0] == encode_example(tokenizer, "Say cat.", "", "cat")[0]


def test_no_usable_record_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="no usable training record.*missing_field"):
        finetune(tiny_gpt(tokenizer), tokenizer, [{"instruction": "x"}], None, quick())


# --- packed vs padded -------------------------------------------------------------------------------

def test_packed_and_padded_give_the_same_loss_while_packing_processes_fewer_positions(tokenizer):
    records = make_records(12, seed=3)
    # One batch holds every example either way, so each update sees the same tokens.
    results = {layout: finetune(tiny_gpt(tokenizer), tokenizer, records, records[:6],
                                quick(layout=layout, batch_size=12, max_steps=4, warmup_steps=1))
               for layout in ("packed", "padded")}
    packed, padded = results["packed"], results["padded"]
    packed_losses = [loss for _, loss in packed.history["train_loss"]]
    padded_losses = [loss for _, loss in padded.history["train_loss"]]
    assert packed_losses == pytest.approx(padded_losses, abs=2e-4)
    assert packed.history["val_loss"][0][1] == pytest.approx(padded.history["val_loss"][0][1], abs=1e-5)
    assert packed.val_loss == pytest.approx(padded.val_loss, abs=2e-4)
    assert packed.tokens_trained == padded.tokens_trained and packed.loss_tokens == padded.loss_tokens
    assert packed.positions < padded.positions
    assert packed.layout_packed.padding_waste < packed.layout_padded.padding_waste


def test_validation_loss_does_not_depend_on_the_layout(tokenizer):
    examples, _ = encode_records(tokenizer, make_records(9, seed=4), seq_len=96)
    model = tiny_gpt(tokenizer)
    losses = [evaluate_loss(model, fixed_batches(examples, quick(layout=layout, batch_size=3), 96, 1),
                            torch.device("cpu")) for layout in ("packed", "padded")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


# --- training ---------------------------------------------------------------------------------------

def test_tuning_lowers_the_validation_loss_and_reports_what_it_did(tokenizer):
    records = make_records(40, seed=5)
    steps, evals = [], []
    result = finetune(tiny_gpt(tokenizer), tokenizer, records[:32], records[32:], quick(epochs=3),
                      on_step=lambda s, m: steps.append((s, m)), on_eval=lambda s, m: evals.append((s, m)))
    assert result.val_loss < result.history["val_loss"][0][1]
    assert [s for s, _ in steps] == list(range(1, result.steps + 1))
    assert evals[0][0] == 0 and evals[-1][0] == result.steps and len(evals) == 4   # before, and after each epoch
    assert result.epochs == pytest.approx(3.0)
    assert result.trainable_params == result.total_params
    assert result.tokens_per_s > 0 and result.loss_tokens < result.tokens_trained <= result.positions
    metrics = result.metrics()
    assert {"padding_waste_packed", "padding_waste_padded", "tokens_per_s", "val_loss_before"} <= set(metrics)


def test_same_seed_same_run(tokenizer):
    records = make_records(12, seed=6)
    runs = [finetune(tiny_gpt(tokenizer), tokenizer, records, None, quick(max_steps=3)) for _ in range(2)]
    assert runs[0].history["train_loss"] == runs[1].history["train_loss"]


def test_lora_tunes_few_parameters_and_merges_into_a_plain_gpt(tokenizer):
    records = make_records(16, seed=7)
    model = tiny_gpt(tokenizer)
    embedding = model.tok_emb.weight.detach().clone()
    result = finetune(model, tokenizer, records[:12], records[12:], quick(method="lora", lr=1e-2, max_steps=4))
    assert type(result.model) is GPT
    assert result.trainable_params < result.total_params / 5
    assert result.lora_merge_max_diff is not None and result.lora_merge_max_diff < 1e-5
    assert torch.equal(result.model.tok_emb.weight, embedding)     # the tied embedding never moved
    assert result.val_loss < result.history["val_loss"][0][1]


# --- config and helpers -----------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("layout", "zipped"), ("loss_on", "prompt"), ("method", "qlora"),
                                          ("epochs", 0), ("min_lr", 1.0), ("too_long", "wrap")])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"FinetuneConfig.{field}"):
        FinetuneConfig(**{field: value})


def test_config_from_dict_names_unknown_keys_and_lora_problems():
    with pytest.raises(ValueError, match="unknown FinetuneConfig field.*'lr_max'"):
        FinetuneConfig.from_dict({"lr_max": 1.0})
    with pytest.raises(ValueError, match="FinetuneConfig.lora_.*rank"):
        FinetuneConfig(lora_rank=0)
    assert FinetuneConfig.from_dict(FinetuneConfig().to_dict()) == FinetuneConfig()


def test_seq_len_longer_than_the_context_is_refused(tokenizer):
    with pytest.raises(ValueError, match="FinetuneConfig.seq_len=128.*context_length=96"):
        finetune(tiny_gpt(tokenizer), tokenizer, make_records(4), None, quick(seq_len=128))


def test_split_is_seeded_and_complete():
    records = [{"n": i} for i in range(100)]
    train, val, test = split_records(records, 0.1, 0.2, seed=1)
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    assert sorted(r["n"] for r in train + val + test) == list(range(100))
    assert split_records(records, 0.1, 0.2, seed=1) == (train, val, test)
    assert split_records(records, 0.1, 0.2, seed=2) != (train, val, test)
