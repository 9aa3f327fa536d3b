"""Loss-curve diagnosis on synthetic curves whose problems are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llm.diagnose import KINDS, diagnose


def healthy_curve(steps: int = 400, seed: int = 0, start: float = 6.0, floor: float = 2.0,
                  noise: float = 0.03, x_scale: int = 1) -> list[tuple[int, float]]:
    """A loss that falls like a power law towards a floor, with batch noise."""
    rng = np.random.default_rng(seed)
    return [(s * x_scale, floor + (start - floor) / (1 + s / 20) ** 0.7 + rng.normal(0, noise))
            for s in range(steps)]


def kinds(diagnosis) -> list[str]:
    return [f.kind for f in diagnosis.findings]


def test_a_healthy_run_has_no_warnings():
    train = healthy_curve()
    val = [(x, v + 0.05) for x, v in train[::50]]
    diagnosis = diagnose(train, val)
    assert diagnosis.healthy and diagnosis.findings == [], diagnosis.report()
    assert diagnosis.metrics() == {f"diagnosis_{k}": 0.0 for k in KINDS}


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_inf_is_divergence_at_its_step(bad):
    train = healthy_curve(100)
    train[60] = (60, bad)
    diagnosis = diagnose(train)
    [finding] = diagnosis.of_kind("divergence")
    assert finding.severity == "error" and finding.at == 60 and not diagnosis.healthy
    assert f"became {bad}" in finding.message and "step 60" in finding.message
    assert "learning rate" in finding.message and "clipping" in finding.message


def test_a_runaway_loss_is_divergence_even_without_nan():
    train = healthy_curve(200)
    train += [(s, 2.5 * math.exp((s - 200) / 20)) for s in range(200, 260)]   # blows up
    diagnosis = diagnose(train)
    [finding] = diagnosis.of_kind("divergence")
    assert "ran away" in finding.message and not diagnosis.of_kind("plateau")


def test_a_spike_is_reported_once_at_its_peak_with_its_step():
    train = healthy_curve(300)
    for step, bump in ((150, 1.5), (151, 3.0), (152, 1.0)):   # one spike over three steps
        train[step] = (step, train[step][1] + bump)
    diagnosis = diagnose(train)
    [spike] = diagnosis.of_kind("spike")
    assert spike.at == 151 and spike.value == pytest.approx(train[151][1])
    assert "step 151" in spike.message and "recovered" in spike.message
    assert "clipping" in spike.message and "warmup" in spike.message
    assert not diagnosis.healthy and diagnosis.metrics()["diagnosis_spike"] == 1.0


def test_a_spike_that_does_not_recover_says_so():
    train = healthy_curve(300)
    train = train[:200] + [(s, v + 1.5) for s, v in train[200:]]   # a jump to a worse level
    [spike] = diagnose(train).of_kind("spike")
    assert spike.at >= 200 and "rising from step 200" in spike.message and "did not return" in spike.message


def test_noise_alone_is_not_a_spike():
    assert not diagnose(healthy_curve(1000, noise=0.1)).of_kind("spike")


def test_validation_rising_while_training_falls_is_overfitting():
    train = healthy_curve(400, floor=0.5)
    val = [(s, 3.0 - s / 200 if s <= 200 else 2.0 + (s - 200) / 150) for s in range(0, 400, 25)]
    [finding] = diagnose(train, val).of_kind("overfitting")
    assert finding.at == 200 and finding.value == pytest.approx(2.0)
    assert "step 200" in finding.message and "more" in finding.message and "data" in finding.message


def test_validation_rising_with_training_is_not_overfitting():
    train = [(s, 3.0 + s / 400) for s in range(400)]            # training rises too: another problem
    val = [(s, 3.1 + s / 300) for s in range(0, 400, 25)]
    assert not diagnose(train, val).of_kind("overfitting")


def test_a_flat_tail_is_a_plateau_and_a_flat_curve_is_not_learning():
    train = healthy_curve(200) + [(s, 2.6 + 0.01 * math.sin(s)) for s in range(200, 600)]
    [plateau] = diagnose(train).of_kind("plateau")
    assert plateau.severity == "info" and "flattened" in plateau.message and "converged" in plateau.message

    flat = [(s, 4.16 + 0.01 * math.sin(s)) for s in range(200)]
    [stuck] = diagnose(flat).of_kind("plateau")
    assert "never decreased" in stuck.message and "learning rate" in stuck.message


def test_curves_against_tokens_name_tokens():
    train = healthy_curve(100, x_scale=4096)
    train[50] = (train[50][0], math.nan)
    [finding] = diagnose(train, x_name="tokens").of_kind("divergence")
    assert finding.at == 50 * 4096 and "tokens 204800" in finding.message


def test_short_curves_give_no_verdicts():
    assert diagnose([(0, 5.0), (1, 4.9)], [(1, 5.0)]).findings == []
    assert diagnose([]).report().startswith("loss curve diagnosis: nothing unusual")


def test_diagnosis_serialises_for_metrics_files():
    train = healthy_curve(100)
    train[70] = (70, math.inf)
    result = diagnose(train).as_dict()
    assert result["healthy"] is False and result["findings"][0]["kind"] == "divergence"
    assert "divergence" in result["report"]
