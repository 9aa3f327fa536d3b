"""Reading a loss curve the way people who train models read it, and saying what to try.

Input: curves as lists of (x, value) pairs, x being the step or the tokens seen. Output: a
Diagnosis holding Findings, each with a kind, where it happened and a short text saying what
it means and which intervention usually helps.

    divergence   the loss became NaN/inf, or ran away upwards: the run is broken
    spike        the loss jumped far above its recent (moving median) level at one point
    overfitting  validation loss rose while training loss kept falling
    plateau      the training loss stopped improving over the last stretch of the run

The thresholds are parameters with defaults chosen for noisy small-batch curves; medians rather
than means keep one bad batch from moving the baseline.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from statistics import median
from typing import Sequence

Curve = Sequence[tuple[float, float]]   # (step or tokens, value)

KINDS = ("divergence", "spike", "overfitting", "plateau")


@dataclass
class Finding:
    kind: str            # one of KINDS
    severity: str        # 'error' (the run is broken), 'warning' (worth acting on), 'info'
    at: float | None     # the step (or tokens) where it shows
    value: float | None  # the loss there
    message: str         # what it means and what to try

    def __str__(self) -> str:
        return f"[{self.severity}] {self.kind}: {self.message}"


@dataclass
class Diagnosis:
    findings: list[Finding] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not any(f.severity in ("error", "warning") for f in self.findings)

    def of_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def report(self) -> str:
        """Human text, one finding per line; printed at the end of training."""
        if not self.findings:
            return "loss curve diagnosis: nothing unusual (no divergence, spikes, overfitting or plateau)"
        return "loss curve diagnosis:\n" + "\n".join(f"  {f}" for f in self.findings)

    def metrics(self) -> dict[str, float]:
        """Counts as numbers, for a metrics file or an experiment tracker."""
        return {f"diagnosis_{kind}": float(len(self.of_kind(kind))) for kind in KINDS}

    def as_dict(self) -> dict:
        return {"healthy": self.healthy, "findings": [asdict(f) for f in self.findings],
                "report": self.report()}


def diagnose(train: Curve, val: Curve | None = None, *, x_name: str = "step",
             spike_window: int = 20, spike_rise: float = 0.25, spike_mads: float = 6.0,
             overfit_rise: float = 0.02, min_val_points: int = 3,
             plateau_fraction: float = 0.25, plateau_min_points: int = 20,
             plateau_gain: float = 0.01, runaway_factor: float = 1.5) -> Diagnosis:
    """Diagnose a training curve and, optionally, a validation curve.

    spike: a value more than max(spike_rise x median, spike_mads x MAD) above the median of the
      spike_window values before it (MAD: median absolute deviation, a robust noise level).
    overfitting: the last validation loss is more than overfit_rise (relative) above the best
      one, and the training loss fell over the same stretch.
    plateau: over the last plateau_fraction of the curve (at least plateau_min_points points),
      the median of its second half is less than plateau_gain (relative) below its first half.
    runaway divergence: the finite loss ends more than runaway_factor times its best level.
    """
    findings = (_non_finite(train, "training", x_name) + _non_finite(val or [], "validation", x_name))
    finite_train = [(x, v) for x, v in train if math.isfinite(v)]
    finite_val = [(x, v) for x, v in (val or []) if math.isfinite(v)]
    if not findings:
        findings += _runaway(finite_train, runaway_factor, x_name)
    findings += _spikes(finite_train, spike_window, spike_rise, spike_mads, x_name)
    findings += _overfitting(finite_train, finite_val, overfit_rise, min_val_points, x_name)
    findings += _plateau(finite_train, plateau_fraction, plateau_min_points, plateau_gain, x_name)
    return Diagnosis(findings)


# --- divergence ---------------------------------------------------------------------------------

def _non_finite(curve: Curve, name: str, x_name: str) -> list[Finding]:
    for x, value in curve:
        if not math.isfinite(value):
            return [Finding("divergence", "error", x, value,
                            f"the {name} loss became {value} at {x_name} {_fmt(x)}: the run diverged "
                            "and everything after is meaningless. Try a lower learning rate, a longer "
                            "warmup, gradient clipping (grad_clip=1.0), and check the data for empty "
                            "or out-of-vocabulary batches; resume from the last good checkpoint.")]
    return []


def _runaway(curve: Curve, factor: float, x_name: str) -> list[Finding]:
    if len(curve) < 10:
        return []
    values = [v for _, v in curve]
    tail = values[-max(len(values) // 10, 3):]
    best = min(values)
    if best > 0 and median(tail) > factor * best:
        x_best = curve[values.index(best)][0]
        return [Finding("divergence", "error", curve[-1][0], curve[-1][1],
                        f"the training loss ran away: it ends at {median(tail):.3f}, more than "
                        f"{factor}x its best {best:.3f} at {x_name} {_fmt(x_best)}. The optimisation "
                        "became unstable: lower the learning rate, lengthen the warmup, enable "
                        "gradient clipping (grad_clip=1.0).")]
    return []


# --- spikes -------------------------------------------------------------------------------------

def _spikes(curve: Curve, window: int, rise: float, mads: float, x_name: str) -> list[Finding]:
    """One finding per run of consecutive spiking points, reported at its peak."""
    values = [v for _, v in curve]
    events: list[dict] = []   # {"first", "last", "peak": indices, "baseline": median before it}
    for i in range(window, len(values)):
        before = values[i - window:i]
        base = median(before)
        noise = median(abs(v - base) for v in before)
        if values[i] - base <= max(rise * abs(base), mads * noise):
            continue
        if events and events[-1]["last"] == i - 1:     # the same spike, still high
            event = events[-1]
            event["last"] = i
            if values[i] > values[event["peak"]]:
                event["peak"] = i
        else:
            events.append({"first": i, "last": i, "peak": i, "baseline": base})
    return [_spike_finding(curve, values, e["first"], e["peak"], e["baseline"], window, x_name) for e in events]


def _spike_finding(curve: Curve, values: list[float], first: int, peak: int, baseline: float,
                   window: int, x_name: str) -> Finding:
    after = values[peak + 1:peak + 1 + window]
    recovered = bool(after) and min(after) <= baseline * (1 + 0.05)
    outcome = ("it recovered within a few steps: usually one unlucky batch, harmless if rare"
               if recovered else "it did not return to its earlier level: the run may have been damaged")
    return Finding("spike", "warning", curve[peak][0], values[peak],
                   f"loss spiked to {values[peak]:.3f} at {x_name} {_fmt(curve[peak][0])} "
                   f"({f'rising from {x_name} {_fmt(curve[first][0])}, ' if first != peak else ''}"
                   f"moving median {baseline:.3f}); {outcome}. If spikes recur: enable or tighten "
                   "gradient clipping (grad_clip=1.0), lengthen the warmup, lower the learning "
                   "rate, or lower beta2 (e.g. 0.95).")


# --- overfitting --------------------------------------------------------------------------------

def _overfitting(train: Curve, val: Curve, rise: float, min_points: int, x_name: str) -> list[Finding]:
    if len(val) < min_points or not train:
        return []
    values = [v for _, v in val]
    best_index = values.index(min(values))
    best_x, best = val[best_index]
    last_x, last = val[-1]
    if best_index == len(val) - 1 or last <= best * (1 + rise):
        return []
    train_at_best, train_at_last = _level_near(train, best_x), _level_near(train, last_x)
    if not train_at_last < train_at_best:
        return []
    return [Finding("overfitting", "warning", best_x, best,
                    f"validation loss rose from {best:.3f} at {x_name} {_fmt(best_x)} to {last:.3f} at "
                    f"{x_name} {_fmt(last_x)} while training loss fell from {train_at_best:.3f} to "
                    f"{train_at_last:.3f}: the model is memorising the training set. Try more (or "
                    f"less repeated) data, stopping near {x_name} {_fmt(best_x)} (keep that "
                    "checkpoint), dropout, more weight decay, or a smaller model.")]


def _level_near(curve: Curve, x: float, points: int = 5) -> float:
    """The median of the last few training values at or before x (one value is too noisy)."""
    upto = [v for cx, v in curve if cx <= x] or [curve[0][1]]
    return median(upto[-points:])


# --- plateau ------------------------------------------------------------------------------------

def _plateau(curve: Curve, fraction: float, min_points: int, gain: float, x_name: str) -> list[Finding]:
    tail_length = max(int(len(curve) * fraction), min_points)
    if len(curve) < tail_length or tail_length < 4:
        return []
    tail = curve[-tail_length:]
    half = len(tail) // 2
    earlier, later = median(v for _, v in tail[:half]), median(v for _, v in tail[half:])
    if abs(later - earlier) > gain * abs(earlier):   # still falling, or rising (see divergence)
        return []
    first, last = median(v for _, v in curve[:min(5, len(curve))]), later
    never_learned = abs(last - first) <= gain * abs(first)
    if never_learned:
        text = (f"the training loss never decreased ({first:.3f} at the start, {last:.3f} at the end): "
                "the model is not learning. Check the learning rate (too low does nothing, too high "
                "thrashes), that targets are the inputs shifted by one, and that gradients reach "
                "the weights.")
    else:
        text = (f"the training loss has flattened over the last {len(tail)} points (from "
                f"{tail[0][0]:g} to {tail[-1][0]:g}, median {earlier:.3f} -> {later:.3f}). If the "
                "learning rate has already decayed, this model has converged on this data: more "
                "steps will not help, a bigger model or more data will. If it flattened early, try "
                "a higher learning rate or a slower decay.")
    return [Finding("plateau", "info", tail[0][0], later, text)]


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)
