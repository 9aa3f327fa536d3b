"""llm.step: the schedule, the one training step, and the one divergence error of all three trainers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from train_driver import CONTEXT, make_token_files, tiny_model_config

from llm.classify import ClassifyConfig, LabeledTexts, train_classifier
from llm.finetune import FinetuneConfig, finetune
from llm.model import GPT, ModelConfig
from llm.optim import clip_gradients, plain_adamw, set_lr
from llm.step import StepResult, TrainingDiverged, lr_schedule, train_step
from llm.tokenizer import train_char
from llm.train import TrainConfig, load_datasets, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- schedule -----------------------------------------------------------------------------------

def schedule(steps: int, **knobs) -> list[float]:
    return [lr_schedule(step, **knobs) for step in range(steps)]


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_schedule_warms_up_linearly_then_decays_to_the_floor(decay):
    lrs = schedule(111, lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=110, decay=decay)
    warmup, rest = lrs[:10], lrs[10:]
    assert warmup == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    assert rest[0] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rest, rest[1:]))                  # never rises after warmup
    assert rest[50] == pytest.approx((1e-3 + 1e-4) / 2)                 # halfway down at mid-decay
    assert rest[-1] == pytest.approx(1e-4) and min(lrs) >= 1e-4 - 1e-12  # ends on the floor
    if decay == "cosine":   # cosine lingers near the top and the bottom; linear falls evenly
        assert rest[10] > 1e-3 - 0.1 * 9e-4
    else:
        assert rest[10] == pytest.approx(1e-3 - 0.1 * 9e-4)


def test_constant_schedule_holds_the_rate_after_warmup():
    lrs = schedule(20, lr=1e-3, min_lr=1e-4, warmup_steps=4, total_steps=20, decay="constant")
    assert lrs[4:] == [1e-3] * 16


def test_default_schedule_is_cosine_and_stays_on_the_floor_past_the_end():
    lrs = schedule(13, lr=1.0, min_lr=0.1, warmup_steps=2, total_steps=10)
    assert lrs[:2] == [0.5, 1.0] and lrs[10:] == pytest.approx([0.1] * 3)
    assert lrs[6] == pytest.approx(0.1 + 0.5 * 0.9)                     # halfway through the decay


# --- the step -----------------------------------------------------------------------------------

def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def toy_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=generator), torch.randn(8, 1, generator=generator)


def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y)


def test_step_is_set_lr_backward_clip_and_step_bit_for_bit():
    x, y = toy_data()
    model, reference = toy_model(), toy_model()
    optimizer, reference_optimizer = plain_adamw(model, 1.0, 0.1), plain_adamw(reference, 1.0, 0.1)
    for step in range(3):
        result = train_step(model, optimizer, lambda micro: mse(model, x, y), step=step, lr=0.01 * (step + 1),
                            grad_clip=0.5, config_name="ToyConfig", device=torch.device("cpu"))
        set_lr(reference_optimizer, 0.01 * (step + 1))
        reference_optimizer.zero_grad(set_to_none=True)
        loss = mse(reference, x, y)
        loss.backward()
        norm = clip_gradients(reference, 0.5)
        reference_optimizer.step()
        assert result == StepResult(loss=loss.item(), grad_norm=norm.item(), lr=0.01 * (step + 1))
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_accumulated_micro_batches_give_the_mean_loss_and_gradient_of_the_whole_batch():
    x, y = toy_data()
    whole, halves = toy_model(), toy_model()
    cpu = torch.device("cpu")
    one = train_step(whole, plain_adamw(whole, 0.01, 0.0), lambda micro: mse(whole, x, y), step=0, lr=0.01,
                     grad_clip=0.0, config_name="ToyConfig", device=cpu)
    two = train_step(halves, plain_adamw(halves, 0.01, 0.0), lambda micro: mse(halves, x[micro::2], y[micro::2]),
                     step=0, lr=0.01, grad_clip=0.0, config_name="ToyConfig", device=cpu, accumulation=2)
    assert two.loss == pytest.approx(one.loss, rel=1e-6) and two.grad_norm == pytest.approx(one.grad_norm, rel=1e-5)
    for p, q in zip(whole.parameters(), halves.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("poison, what", [("loss", "training loss"), ("gradient", "gradient norm")])
def test_a_non_finite_loss_or_gradient_stops_the_step_before_the_weights_change(poison, what):
    x, y = toy_data()
    model = toy_model()
    before = copy.deepcopy(model.state_dict())
    if poison == "gradient":   # a finite loss whose gradient overflows
        model[0].weight.register_hook(lambda grad: grad * float("inf"))

    def loss_of(micro: int) -> torch.Tensor:
        loss = mse(model, x, y)
        return loss * float("nan") if poison == "loss" else loss

    with pytest.raises(TrainingDiverged, match=f"diverged at step 5: the {what} is (nan|inf).*lower ToyConfig.lr"
                       ) as error:
        train_step(model, plain_adamw(model, 0.1, 0.0), loss_of, step=5, lr=0.1, grad_clip=1.0,
                   config_name="ToyConfig", device=torch.device("cpu"))
    assert isinstance(error.value, FloatingPointError) and error.value.step == 5 and error.value.what == what
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])


# --- every trainer raises it --------------------------------------------------------------------

def poison_features(model: GPT) -> None:
    """NaN features from the final norm on: every loss after it is NaN, whatever the head."""
    model.final_norm.register_forward_hook(lambda module, inputs, output: output * float("nan"))


def test_pretraining_raises_training_diverged(tmp_path):
    make_token_files(tmp_path)
    config = TrainConfig(max_steps=3, warmup_steps=1, batch_size=2, eval_every=0, sample_tokens=0, progress=False,
                         device="cpu")
    torch.manual_seed(0)
    model = GPT(tiny_model_config())
    poison_features(model)
    train_data, val_data = load_datasets(tmp_path / "train.bin", tmp_path / "val.bin", CONTEXT, config)
    with pytest.raises(TrainingDiverged, match=r"step 0: the training loss is nan.*lower TrainConfig.lr"):
        train(model, train_data, val_data, config, tmp_path / "run")


@pytest.fixture(scope="module")
def tokenizer():
    return train_char(["win a free prize now", "see you at lunch", "Reverse the words."], progress=False)


def tiny_gpt(tokenizer) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=32, n_layer=1, n_head=2, d_model=16))
    poison_features(model)
    return model


def test_classify_tuning_raises_training_diverged(tokenizer):
    data = LabeledTexts(["win a free prize now", "see you at lunch"] * 4, [1, 0] * 4)
    config = ClassifyConfig(epochs=1, batch_size=4, max_length=32, progress=False, device="cpu")
    with pytest.raises(TrainingDiverged, match=r"step 0: the training loss is nan.*lower ClassifyConfig.lr"):
        train_classifier(tiny_gpt(tokenizer), tokenizer, data, data, config)


def test_instruct_tuning_raises_training_diverged(tokenizer):
    records = [{"instruction": "Reverse the words.", "input": "see you", "output": "you see"}] * 4
    config = FinetuneConfig(epochs=1, batch_size=2, progress=False, device="cpu")
    with pytest.raises(TrainingDiverged, match=r"step 0: the training loss is nan.*lower FinetuneConfig.lr"):
        finetune(tiny_gpt(tokenizer), tokenizer, records, None, config)
