"""Classification: pooling at the last real token, the stratified split, training modes, early
stopping, metrics, bad inputs, save/load. On synthetic data where texts with 'free' or 'win' are spam."""

from __future__ import annotations

import json
import random

import pytest
import torch

from llm.classify import (
    Classifier,
    ClassifyConfig,
    LabeledTexts,
    _epoch_index,
    add_class_head,
    classification_metrics,
    encode_texts,
    labeled_texts,
    labelled_share,
    majority_baseline,
    pad_batch,
    pooled_logits,
    stratified_split,
    train_classifier,
)
from llm.model import GPT, ModelConfig
from llm.tokenizer import train_sentencepiece

HAM = "ok lunch later mom meeting home see you call me tonight dinner sure thanks".split()
SPAM = "prize cash claim now urgent txt reply offer".split()
LABELS = ("ham", "spam")


def synthetic_sms(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """About 30% spam: every spam text contains 'free' or 'win'; no ham text does."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        words = rng.choices(HAM, k=rng.randint(3, 8))
        spam = rng.random() < 0.3
        if spam:
            words += rng.choices(SPAM, k=rng.randint(0, 2))
            words.insert(rng.randrange(len(words) + 1), rng.choice(["free", "win"]))
        texts.append(" ".join(words))
        labels.append(LABELS[spam])
    return texts, labels


@pytest.fixture(scope="module")
def tokenizer():
    # A word-level vocabulary (each word one piece), so the tiny random model sees words as units.
    return train_sentencepiece(synthetic_sms(400)[0], vocab_size=340, progress=False)


@pytest.fixture(scope="module")
def splits():
    data, _ = labeled_texts(*synthetic_sms(400), LABELS)
    return stratified_split(data, 0.15, 0.25, seed=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_gpt(tokenizer, d_model: int = 64, context: int = 32) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=context, n_layer=2, n_head=2,
                           d_model=d_model))


def quick(**overrides) -> ClassifyConfig:
    values = dict(epochs=20, lr=3e-2, min_lr=3e-3, warmup_steps=5, max_length=32, patience=0, batch_size=16,
                  seed=0, progress=False, device="cpu")
    return ClassifyConfig(**{**values, **overrides})


# --- training ---------------------------------------------------------------------------------------

def test_training_only_the_head_reaches_high_accuracy(tokenizer, splits):
    train, val, test = splits
    result = train_classifier(tiny_gpt(tokenizer), tokenizer, train, val, quick(train="head", pooling="mean"))
    assert result.trainable_params == 64 * 2 + 2
    assert result.classifier.evaluate(test, "spam")["accuracy"] >= 0.95


def test_training_everything_with_last_token_pooling_learns_the_rule(tokenizer, splits):
    train, val, test = splits
    evals = []
    result = train_classifier(tiny_gpt(tokenizer), tokenizer, train, val, quick(epochs=8, lr=1e-2),
                              on_eval=lambda step, metrics: evals.append(metrics))
    metrics = result.classifier.evaluate(test, "spam")
    assert metrics["accuracy"] >= 0.97 and metrics["f1"] >= 0.95
    assert len(evals) == 8 and {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_f1"} <= set(evals[0])
    assert result.tokens_per_s > 0 and result.truncated == {"train": 0, "val": 0}
    # Texts of the training distribution's own words: a text with words the model never saw ("see
    # you at lunch") is extrapolation, which the SIMD kernels' rounding decided (spam on AVX2 only).
    labels, probabilities = result.classifier.predict(["free prize cash claim now", "see you tonight mom"])
    assert labels == ["spam", "ham"]
    assert all(abs(sum(p) - 1) < 1e-5 for p in probabilities)
    assert probabilities[0][1] > 0.9 and probabilities[1][1] < 0.1   # measured: 0.995+ and 0.01- (AVX2 and plain)
    # predict's labels are the ones evaluate scored.
    predicted, _ = result.classifier.predict(test.texts)
    hits = sum(LABELS.index(label) == y for label, y in zip(predicted, test.labels))
    assert hits / len(test.labels) == pytest.approx(metrics["accuracy"])


@pytest.mark.parametrize("mode, trained", [("last_blocks", "blocks.1."), ("lora", "lora_")])
def test_partial_modes_train_only_their_part_and_return_a_plain_gpt(tokenizer, splits, mode, trained):
    train, val, _ = splits
    model = tiny_gpt(tokenizer)
    frozen = model.blocks[0].mlp.fc.weight.detach().clone()
    result = train_classifier(model, tokenizer, train, val, quick(train=mode, last_blocks=1, epochs=2, lr=1e-2))
    assert 0 < result.trainable_params < result.total_params
    assert type(result.classifier.model) is GPT
    if mode == "last_blocks":
        assert torch.equal(result.classifier.model.blocks[0].mlp.fc.weight, frozen)


def test_early_stopping_keeps_the_best_weights(tokenizer, splits):
    train, val, _ = splits
    # Validation labels flipped: the better the model learns the training rule, the worse the
    # validation loss, so patience runs out after the first evaluations.
    flipped = LabeledTexts(val.texts, [1 - y for y in val.labels])
    result = train_classifier(tiny_gpt(tokenizer), tokenizer, train, flipped,
                              quick(train="all", epochs=20, lr=1e-2, patience=2, eval_every=5))
    assert result.stopped_early and result.steps < 20 * result.steps / result.epochs
    evals = result.history["eval"]
    val_losses = [row["val_loss"] for row in evals]
    best = val_losses.index(min(val_losses))
    assert len(val_losses) == best + 1 + 2            # stopped after `patience` worse evaluations
    assert result.best_step == evals[best]["step"]
    assert result.val["loss"] == pytest.approx(min(val_losses), abs=1e-6)
    assert result.classifier.evaluate(flipped)["loss"] == pytest.approx(min(val_losses), abs=1e-5)


@pytest.mark.parametrize("balance", ["weighted", "oversample"])
def test_class_balancing_runs(tokenizer, splits, balance):
    train, val, _ = splits
    result = train_classifier(tiny_gpt(tokenizer), tokenizer, train, val, quick(balance=balance, epochs=1))
    assert result.steps >= 1


def test_oversampling_draws_smaller_classes_up_to_the_largest():
    import numpy as np
    labels = [0] * 30 + [1] * 6
    index = _epoch_index(labels, "oversample", np.random.default_rng(0))
    counts = [sum(labels[i] == c for i in index) for c in (0, 1)]
    assert counts == [30, 30]


# --- pooling ----------------------------------------------------------------------------------------

def test_pooling_reads_the_last_real_token_not_the_padding(tokenizer):
    model = add_class_head(tiny_gpt(tokenizer), 2).eval()
    texts = ["ok", "call me tonight for dinner sure thanks", "free prize"]
    sequences, _ = encode_texts(tokenizer, texts, 32)
    ids, lengths = pad_batch(sequences, pad_id=1)
    assert lengths.tolist() == [len(s) for s in sequences] and ids.size(1) == max(lengths)
    with torch.no_grad():
        for pooling in ("last", "mean"):
            batched = pooled_logits(model, ids, lengths, pooling)
            for row, sequence in enumerate(sequences):
                alone = pooled_logits(model, torch.tensor([sequence]), torch.tensor([len(sequence)]), pooling)
                torch.testing.assert_close(batched[row], alone[0], atol=1e-5, rtol=0)
        at_padding = model(ids).logits[0, -1]
        assert (at_padding - pooled_logits(model, ids, lengths, "last")[0]).abs().max() > 1e-4


# --- data ---------------------------------------------------------------------------------------------

def test_split_is_stratified_seeded_and_complete():
    data, _ = labeled_texts(*synthetic_sms(300, seed=1), LABELS)
    parts = stratified_split(data, 0.1, 0.2, seed=7)
    share = sum(data.labels) / len(data)
    for part in parts:
        assert abs(sum(part.labels) / len(part) - share) < 0.02
    assert sorted(t for part in parts for t in part.texts) == sorted(data.texts)
    assert [len(p) for p in parts] == [210, 30, 60]
    again = stratified_split(data, 0.1, 0.2, seed=7)
    assert [p.texts for p in again] == [p.texts for p in parts]
    assert stratified_split(data, 0.1, 0.2, seed=8)[2].texts != parts[2].texts


def test_a_labelled_share_is_stratified_seeded_and_keeps_every_class():
    data, _ = labeled_texts(*synthetic_sms(300, seed=1), LABELS)
    train = stratified_split(data, 0.1, 0.2, seed=7)[0]
    spam = sum(train.labels)
    quarter = labelled_share(train, 0.25, seed=7)
    assert sum(quarter.labels) == round(spam * 0.25) and len(quarter) - sum(quarter.labels) == round((210 - spam) * 0.25)
    assert set(quarter.texts) <= set(train.texts) and labelled_share(train, 0.25, seed=7).texts == quarter.texts
    tiny = labelled_share(train, 0.001, seed=7)
    assert sorted(tiny.labels) == [0, 1]   # one of each class, however small the share
    assert labelled_share(train, 1.0, seed=7) is train
    with pytest.raises(ValueError, match="train_fraction"):
        ClassifyConfig(train_fraction=0)


def test_empty_texts_are_skipped_and_counted_and_unknown_labels_named():
    texts = ["free prize", "", "   ", None, "see you", "win now"]
    labels = ["spam", "ham", "ham", "ham", "ham", "Spam"]
    with pytest.raises(ValueError, match=r"outside the declared classes \['ham', 'spam'\]: 'Spam' \(1x\)"):
        labeled_texts(texts, labels, LABELS)
    data, report = labeled_texts(texts, labels, LABELS, unknown_labels="skip")
    assert data.texts == ["free prize", "see you"] and data.labels == [1, 0]
    assert report == {"records": 6, "used": 2, "empty_text": 2, "not_string": 1, "unknown_label": 1}


def test_long_texts_are_cut_explicitly_and_counted(tokenizer):
    sequences, truncated = encode_texts(tokenizer, ["ok " * 100, "ok"], max_length=16)
    assert truncated == 1 and len(sequences[0]) == 16 and len(sequences[1]) < 16


def test_predict_refuses_empty_texts_naming_them(tokenizer):
    classifier = Classifier(add_class_head(tiny_gpt(tokenizer), 2), tokenizer, LABELS)
    with pytest.raises(ValueError, match=r"position\(s\) \[1\]"):
        classifier.predict(["ok", " "])
    assert classifier.predict([]) == ([], [])


def test_max_length_beyond_the_context_is_refused(tokenizer, splits):
    train, val, _ = splits
    with pytest.raises(ValueError, match="ClassifyConfig.max_length=64.*context_length=32"):
        train_classifier(tiny_gpt(tokenizer), tokenizer, train, val, quick(max_length=64))


# --- metrics and baseline -----------------------------------------------------------------------------

def test_metrics_from_a_known_confusion_matrix():
    truth = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    predicted = [0, 0, 0, 1, 1, 1, 1, 1, 0, 0]
    m = classification_metrics(truth, predicted, LABELS, positive_label="spam")
    assert m["confusion_matrix"] == [[3, 1], [2, 4]]
    assert (m["accuracy"], m["precision"], m["recall"]) == (0.7, 0.8, pytest.approx(4 / 6))
    assert m["f1"] == pytest.approx(2 * 0.8 * (4 / 6) / (0.8 + 4 / 6))
    macro = classification_metrics(truth, predicted, LABELS)
    assert macro["recall"] == pytest.approx((0.75 + 4 / 6) / 2)


def test_majority_baseline():
    baseline = majority_baseline([0, 0, 0, 1], label_names=LABELS, positive_label="spam")
    assert baseline["label"] == "ham" and baseline["accuracy"] == 0.75 and baseline["f1"] == 0.0
    assert majority_baseline([0, 0, 1], [1, 1, 0, 0])["accuracy"] == 0.5


# --- config and saving ----------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("train", "everything"), ("pooling", "first"), ("balance", "smote"),
                                          ("positive_label", "eggs"), ("labels", ("ham",)), ("test_fraction", 0.95)])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"ClassifyConfig.{field}"):
        ClassifyConfig(**{field: value})


def test_save_and_load_give_the_same_predictions(tokenizer, tmp_path):
    classifier = Classifier(add_class_head(tiny_gpt(tokenizer), 2), tokenizer, LABELS, pooling="mean", max_length=24)
    texts = ["free prize now", "see you later mom"]
    directory = classifier.save(tmp_path / "clf")
    meta = json.loads((directory / "classifier.json").read_text())
    assert meta["labels"] == list(LABELS) and meta["pooling"] == "mean" and meta["base_config"]["d_model"] == 64
    loaded = Classifier.load(directory)
    assert loaded.predict(texts) == classifier.predict(texts)
    assert (loaded.pooling, loaded.max_length) == ("mean", 24)
