"""Named experiments: a baseline and its variants as params overrides, and what their runs showed.

A catalogue (experiments.yaml) holds a shared small configuration (`base`: dotted params keys over
the pipeline's params.yaml, pretrain stage only) and named experiments, each a baseline plus
variants, every one of them a few dotted keys changed, never a code fork:

    base: {pretrain.model.n_layer: 2, pretrain.train.max_steps: 150, ...}
    seeds: [1, 2]
    experiments:
      clipping:
        question: What does gradient clipping do?
        baseline: {label: clip at 1.0, set: {pretrain.train.grad_clip: 1.0}}
        variants:
          - {label: no clipping, set: {pretrain.train.grad_clip: 0.0}}

`sweep: {pretrain.train.lr: [0.001, 0.01]}` runs every variant (and the baseline) at each value.
A few lessons are not about training at all: `bench: attention_cost` makes an experiment a
measurement, one run of that script in bench/ (with `args`), whose report is its plot and fit.
This module is plain logic (no Prefect, MLflow or DVC): reading the catalogue, expanding it into
runs, summarising measured runs and writing the one-sentence finding from the numbers. Checking
the keys against the params schema is the pipeline's job (flows/experiments.py).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

from llm.files import read_yaml

PREFIX = "pretrain."     # every override is a pretrain-stage param ...
TOKENIZER = "tokenizer."  # ... or a tokenizer-stage one (the pipeline then re-trains it and re-packs)
CLASSIFY = "classify."    # ... or, for an experiment on the classify stage, a classify one
SECTIONS = (PREFIX, TOKENIZER, CLASSIFY)
# The stage an experiment runs (dvc exp run <stage>) and the key its seeds set.
SEED_KEYS = {"pretrain": "pretrain.train.seed", "classify": "classify.seed"}
MEASURES = ("val_loss", "gap", "early_loss", "speed", "bits_per_byte", "accuracy")
BENCHES = {"attention_cost": "bench/attention_cost.py"}   # experiments that measure, not train


class CatalogueError(ValueError):
    """experiments.yaml is malformed, names an unknown experiment, or a variant is not a change."""


@dataclass
class Variant:
    label: str                      # what the report calls it: "no clipping", "post-norm lr=0.01"
    key: str                        # folder- and DVC-safe slug of the label
    overrides: dict[str, Any]       # dotted key -> value, over the catalogue's base
    baseline: bool = False
    group: str = ""                 # the variant's label without the sweep value
    sweep_value: Any = None


@dataclass
class Experiment:
    name: str
    question: str
    variants: list[Variant]         # the baseline first (each sweep value's baseline, in a sweep)
    seeds: list[int]
    sweep_key: str | None = None
    measure: str = "val_loss"       # what the finding leads with (MEASURES)
    note: str = ""                  # what the configuration leaves out, or why it was chosen
    stage: str = "pretrain"         # the stage each run reproduces (SEED_KEYS)

    def runs(self) -> list[tuple[Variant, int]]:
        return [(v, s) for v in self.variants for s in self.seeds]


@dataclass
class Measurement:
    """An experiment that is one benchmark run (`bench` names it in BENCHES), not training runs."""

    name: str
    question: str
    bench: str
    args: list[str]
    note: str = ""
    estimate_s: float = 60.0

    @property
    def script(self) -> str:
        return BENCHES[self.bench]

    def runs(self) -> list:
        return []


@dataclass
class Catalogue:
    base: dict[str, Any]
    seeds: list[int]
    experiments: dict[str, Experiment | Measurement]
    path: str = "experiments.yaml"

    def select(self, names: list[str] | None) -> list[Experiment | Measurement]:
        """The named experiments (all when none are named); an unknown name stops with the known ones."""
        if not names:
            return list(self.experiments.values())
        unknown = [n for n in names if n not in self.experiments]
        if unknown:
            raise CatalogueError(f"unknown experiment {', '.join(map(repr, unknown))} in {self.path}; "
                                 f"known: {', '.join(self.experiments)}")
        return [self.experiments[n] for n in names]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "x"


def load_catalogue(path: str | Path = "experiments.yaml") -> Catalogue:
    return parse_catalogue(read_yaml(path, CatalogueError), str(path))


def parse_catalogue(raw: Any, where: str = "experiments.yaml") -> Catalogue:
    if not isinstance(raw, dict):
        raise CatalogueError(f"{where}: expected a mapping with base, seeds and experiments")
    _only(raw, {"base", "seeds", "experiments"}, where)
    base = _overrides(raw.get("base") or {}, f"{where}: base")
    seeds = _seeds(raw.get("seeds", [1, 2]), f"{where}: seeds")
    entries = raw.get("experiments")
    if not isinstance(entries, dict) or not entries:
        raise CatalogueError(f"{where}: experiments: expected a mapping of named experiments")
    experiments = {}
    for name, entry in entries.items():
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", str(name)):
            raise CatalogueError(f"{where}: experiment name {name!r}: use lower-case letters, digits and '-'")
        experiments[name] = _experiment(str(name), entry, seeds, f"{where}: experiments.{name}")
    return Catalogue(base, seeds, experiments, where)


def _only(entry: dict, allowed: set[str], where: str) -> None:
    extra = sorted(set(entry) - allowed)
    if extra:
        raise CatalogueError(f"{where}: unknown key {extra[0]!r}; allowed: {', '.join(sorted(allowed))}")


def _seeds(value: Any, where: str) -> list[int]:
    if (not isinstance(value, list) or len(value) < 2 or len(set(value)) != len(value)
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in value)):
        raise CatalogueError(f"{where}: expected at least 2 distinct integer seeds (the report shows "
                             f"their spread), got {value!r}")
    return value


def _overrides(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CatalogueError(f"{where}: expected a mapping of dotted params keys to values")
    for key in value:
        if not isinstance(key, str) or not key.startswith(SECTIONS) or key in SECTIONS:
            raise CatalogueError(f"{where}: key {key!r}: experiments change the pretrain stage (or the "
                                 f"tokenizer it trains on, or the classify stage); write keys as {PREFIX}section.key "
                                 f"(e.g. pretrain.train.lr), {TOKENIZER}key or {CLASSIFY}key")
        if key in SEED_KEYS.values():
            raise CatalogueError(f"{where}: {key} is set by the catalogue's seeds")
    return dict(value)


def _measurement(name: str, entry: dict, where: str) -> Measurement:
    _only(entry, {"question", "bench", "args", "note", "estimate_s"}, where)
    if entry["bench"] not in BENCHES:
        raise CatalogueError(f"{where}.bench: {entry['bench']!r} is not one of {', '.join(BENCHES)}")
    args = entry.get("args", [])
    if not isinstance(args, list):
        raise CatalogueError(f"{where}.args: expected a list of command-line arguments, e.g. [--max-length, 8192]")
    return Measurement(name, str(entry.get("question", "")), entry["bench"], [str(a) for a in args],
                       str(entry.get("note", "")), float(entry.get("estimate_s", 60.0)))


def _experiment(name: str, entry: Any, seeds: list[int], where: str) -> Experiment | Measurement:
    if not isinstance(entry, dict):
        raise CatalogueError(f"{where}: expected a mapping with baseline and variants")
    if "bench" in entry:
        return _measurement(name, entry, where)
    _only(entry, {"question", "set", "baseline", "variants", "seeds", "sweep", "measure", "note", "stage"}, where)
    stage = entry.get("stage", "pretrain")
    if stage not in SEED_KEYS:
        raise CatalogueError(f"{where}.stage: {stage!r} is not one of {', '.join(SEED_KEYS)}")
    common = _overrides(entry.get("set") or {}, f"{where}.set")   # every variant of this experiment
    seeds = _seeds(entry["seeds"], f"{where}.seeds") if "seeds" in entry else seeds
    measure = entry.get("measure", "val_loss")
    if measure not in MEASURES:
        raise CatalogueError(f"{where}.measure: {measure!r} is not one of {', '.join(MEASURES)}")
    raw_variants = entry.get("variants")
    if not isinstance(raw_variants, list) or not raw_variants:
        raise CatalogueError(f"{where}.variants: expected a list of at least one variant")
    plain = [_variant(entry.get("baseline", {}), f"{where}.baseline", True, "baseline")]
    plain += [_variant(v, f"{where}.variants.{i}", False, f"variant {i + 1}") for i, v in enumerate(raw_variants)]
    for v in plain:
        v.overrides = {**common, **v.overrides}
    labels = [v.label for v in plain]
    if len({slug(label) for label in labels}) != len(labels):
        raise CatalogueError(f"{where}: variant labels must differ: {labels}")
    sweep_key, variants = None, plain
    if "sweep" in entry:
        sweep = entry["sweep"]
        if not (isinstance(sweep, dict) and len(sweep) == 1 and isinstance(next(iter(sweep.values())), list)
                and len(next(iter(sweep.values()))) >= 2):
            raise CatalogueError(f"{where}.sweep: expected one dotted key with a list of at least 2 values")
        sweep_key, values = next(iter(sweep.items()))
        _overrides({sweep_key: None}, f"{where}.sweep")
        short = sweep_key.rsplit(".", 1)[-1]
        variants = [Variant(f"{v.label} {short}={value:g}" if isinstance(value, float) else f"{v.label} {short}={value}",
                            slug(f"{v.label}-{short}-{value}"), {**v.overrides, sweep_key: value},
                            v.baseline, v.label, value)
                    for value in values for v in plain]
    return Experiment(name, str(entry.get("question", "")), variants, seeds, sweep_key, measure,
                      str(entry.get("note", "")), stage)


def _variant(entry: Any, where: str, baseline: bool, default_label: str) -> Variant:
    if not isinstance(entry, dict):
        raise CatalogueError(f"{where}: expected a mapping with label and set")
    _only(entry, {"label", "set"}, where)
    label = str(entry.get("label", default_label))
    overrides = _overrides(entry.get("set") or {}, where + ".set")
    if not baseline and not overrides:
        raise CatalogueError(f"{where} ({label!r}): sets nothing, so it is the baseline again")
    return Variant(label, slug(label), overrides, baseline, label)


# --- params as nested dicts -----------------------------------------------------------------------

def set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def apply_overrides(params: dict, *layers: dict[str, Any]) -> dict:
    """A deep copy of `params` with each layer's dotted keys set, later layers winning."""
    result = copy.deepcopy(params)
    for layer in layers:
        for key, value in layer.items():
            set_dotted(result, key, value)
    return result


def run_overrides(catalogue: Catalogue, experiment: Experiment, variant: Variant, seed: int) -> dict[str, Any]:
    """Every dotted key one run sets: the base, the variant, its seed."""
    return {**catalogue.base, **variant.overrides, SEED_KEYS[experiment.stage]: seed}


def run_name(experiment: str, variant: Variant, seed: int) -> str:
    return f"{experiment}-{variant.key}-s{seed}"


# --- results ------------------------------------------------------------------------------------

def diverged_at(result: dict) -> tuple[float, float] | None:
    """(step, loss) where a run diverged: NaN/inf stopped it, or its loss ran away (diagnosis)."""
    if result.get("diverged"):
        d = result["diverged"]
        return d["step"], d.get("last_loss", d.get("value"))
    for finding in result.get("diagnosis", []):
        if finding["kind"] == "divergence":
            return finding["at"], finding["value"]
    return None


def early_loss(result: dict, fraction: float = 0.2) -> float | None:
    """The highest training loss after the first step, over the first `fraction` of the run: how
    hard early training lurches (the first step's loss is the untrained model's, the same for all)."""
    curve = [(s, v) for s, v in result.get("train", []) if math.isfinite(v)]
    if len(curve) < 3:
        return None
    last = curve[-1][0]
    window = [v for s, v in curve[1:] if s <= max(last * fraction, curve[2][0])]
    return max(window) if window else None


def spread(values: list[float]) -> float:
    """Half the range over seeds: the noise a difference must exceed (0 for one value or none)."""
    return (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


@dataclass
class Summary:
    """One variant over its seeds."""

    label: str
    group: str
    sweep_value: Any
    baseline: bool
    runs: int
    diverged: int
    diverged_at: list[tuple[float, float]] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)     # finished, non-diverged runs only
    train_loss: list[float] = field(default_factory=list)
    early: list[float] = field(default_factory=list)
    spikes: int = 0
    parameters: int | None = None
    tokens_per_s: float | None = None
    bits_per_byte: list[float] = field(default_factory=list)   # validation, finished runs
    accuracy: list[float] = field(default_factory=list)        # classify: test accuracy, pretrained weights
    scratch_accuracy: list[float] = field(default_factory=list)  # ... and the same from random weights
    tokens_per_word: float | None = None
    embedding_share: float | None = None

    @property
    def val_mean(self) -> float | None:
        return mean(self.val_loss) if self.val_loss else None

    @property
    def val_spread(self) -> float:
        """Half the range over seeds: the noise a difference must exceed."""
        return spread(self.val_loss)

    @property
    def gap(self) -> float | None:
        if not self.val_loss or not self.train_loss:
            return None
        return mean(self.val_loss) - mean(self.train_loss)

    @property
    def early_mean(self) -> float | None:
        return mean(self.early) if self.early else None

    def as_dict(self) -> dict:
        return {"label": self.label, "baseline": self.baseline, "runs": self.runs, "diverged": self.diverged,
                "diverged_at": self.diverged_at, "val_loss_mean": self.val_mean, "val_loss_spread": self.val_spread,
                "val_losses": self.val_loss, "train_losses": self.train_loss, "gap": self.gap,
                "early_loss": self.early_mean, "spikes": self.spikes, "parameters": self.parameters,
                "tokens_per_s": self.tokens_per_s, "sweep_value": self.sweep_value,
                "bits_per_byte": self.bits_per_byte, "tokens_per_word": self.tokens_per_word,
                "embedding_share": self.embedding_share, "accuracy": self.accuracy,
                "scratch_accuracy": self.scratch_accuracy}


def summarize(experiment: Experiment, results: list[dict]) -> list[Summary]:
    """One Summary per variant, in the catalogue's order."""
    summaries = []
    for variant in experiment.variants:
        mine = [r for r in results if r["variant"] == variant.key]
        s = Summary(variant.label, variant.group, variant.sweep_value, variant.baseline, len(mine), 0)
        speeds = []
        for r in mine:
            where = diverged_at(r)
            if where is not None:
                s.diverged += 1
                s.diverged_at.append(where)
            elif experiment.stage == "classify":
                tested = r["metrics"]["test"]
                s.accuracy.append(tested["pretrained"]["accuracy"])
                if "from_scratch" in tested:
                    s.scratch_accuracy.append(tested["from_scratch"]["accuracy"])
                continue
            else:
                s.val_loss.append(r["metrics"]["val_loss"])
                s.train_loss.append(r["metrics"]["train_loss"])
                if r["metrics"].get("val_bits_per_byte") is not None:
                    s.bits_per_byte.append(r["metrics"]["val_bits_per_byte"])
            e = early_loss(r)
            if e is not None and where is None:
                s.early.append(e)
            s.spikes += sum(1 for f in r.get("diagnosis", []) if f["kind"] == "spike")
            s.parameters = r.get("metrics", {}).get("parameters", s.parameters)
            s.tokens_per_word = r.get("metrics", {}).get("val_tokens_per_word", s.tokens_per_word)
            s.embedding_share = r.get("metrics", {}).get("embedding_share", s.embedding_share)
            if r.get("metrics", {}).get("tokens_per_s"):
                speeds.append(r["metrics"]["tokens_per_s"])
        s.tokens_per_s = mean(speeds) if speeds else None
        summaries.append(s)
    return summaries


# --- the finding: one sentence written from the numbers -----------------------------------------

def _num(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 100 else f"{x:,.0f}"


def _value(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _compare(variant: Summary, base: Summary, what: str = "val loss") -> str:
    """'no clipping: val loss 5.12 vs 5.08 (+0.04, within the seed spread of 0.05)'."""
    if variant.val_mean is None or base.val_mean is None:
        return ""
    diff = variant.val_mean - base.val_mean
    noise = max(variant.val_spread, base.val_spread)
    if abs(diff) <= noise or abs(diff) < 0.005:
        verdict = (f"made no difference beyond the seeds' spread ({what} {_num(variant.val_mean)} vs "
                   f"{_num(base.val_mean)}, spread ±{_num(noise)})")
    else:
        verdict = (f"{'raised' if diff > 0 else 'lowered'} {what} by {_num(abs(diff))} "
                   f"({_num(variant.val_mean)} vs {_num(base.val_mean)}, seed spread ±{_num(noise)})")
    return f"{variant.label} {verdict}"


def _divergence(s: Summary) -> str:
    step, loss = min(s.diverged_at, key=lambda p: p[0])
    loss_text = "non-finite" if loss is None or not math.isfinite(loss) else f"at loss {_num(loss)}"
    return f"{s.label} diverged in {s.diverged} of {s.runs} runs (first at step {step:g}, {loss_text})"


def finding(experiment: Experiment, summaries: list[Summary]) -> str:
    """One sentence saying what these runs showed, built from their numbers."""
    if not summaries or all(s.runs == 0 for s in summaries):
        return f"{experiment.name}: no runs finished yet."
    if experiment.sweep_key:
        return _sweep_finding(experiment, summaries)
    if experiment.measure == "bits_per_byte":
        return _bits_per_byte_finding(summaries)
    if experiment.measure == "accuracy":
        return _pretraining_value_finding(summaries)
    base = next(s for s in summaries if s.baseline)
    clauses = []
    if base.diverged:
        clauses.append(_divergence(base))
    for s in summaries:
        if s.baseline:
            continue
        if s.diverged:
            clauses.append(_divergence(s))
            continue
        parts = [_compare(s, base)]
        if experiment.measure == "gap" and s.gap is not None and base.gap is not None:
            parts.append(f"its val-train gap was {_num(s.gap)} vs {_num(base.gap)}")
        if experiment.measure == "early_loss" and s.early_mean is not None and base.early_mean is not None:
            worse = "higher" if s.early_mean > base.early_mean else "lower"
            parts.append(f"its early training loss peaked {worse}, at {_num(s.early_mean)} vs "
                         f"{_num(base.early_mean)}")
        if s.spikes != base.spikes:
            parts.append(f"{s.spikes} loss spike{'s' if s.spikes != 1 else ''} vs {base.spikes}")
        if s.parameters and base.parameters and abs(s.parameters - base.parameters) > 0.02 * base.parameters:
            parts.append(f"with {s.parameters:,} parameters vs {base.parameters:,}")
        if (experiment.measure == "speed" and s.tokens_per_s and base.tokens_per_s):
            parts.append(f"at {s.tokens_per_s:,.0f} tokens/s vs {base.tokens_per_s:,.0f}")
        clauses.append(", ".join(p for p in parts if p))
    if not any(clauses):
        return f"{experiment.name}: every run diverged or none finished."
    return f"Against {base.label}: " + "; ".join(c for c in clauses if c) + "."


def _bits_per_byte_finding(summaries: list[Summary]) -> str:
    """Across tokenizers, per variant: bits per byte (the comparable loss), its seed spread, tokens
    per word and the embedding share of the parameters; then which did best."""
    clauses, scored = [], []
    for s in summaries:
        if s.diverged:
            clauses.append(_divergence(s))
            continue
        if not s.bits_per_byte:
            continue
        bpb, noise = mean(s.bits_per_byte), spread(s.bits_per_byte)
        scored.append((bpb, noise, s))
        extra = []
        if s.tokens_per_word is not None:
            extra.append(f"{s.tokens_per_word:.2f} tokens/word")
        if s.embedding_share is not None:
            extra.append(f"{s.embedding_share:.0%} of {s.parameters:,} parameters in embeddings" if s.parameters
                         else f"{s.embedding_share:.0%} of parameters in embeddings")
        clauses.append(f"{s.label}: {bpb:.3f} bits/byte (±{noise:.3f})" + (f", {', '.join(extra)}" if extra else ""))
    if not clauses:
        return "no runs finished yet."
    text = "; ".join(clauses) + "."
    if len(scored) > 1:
        best, worst = min(scored, key=lambda t: t[0]), max(scored, key=lambda t: t[0])
        noise = max(best[1], worst[1])
        text += (f" Lowest bits per byte: {best[2].label}, {worst[0] - best[0]:.3f} below {worst[2].label}"
                 + (" (within the seeds' spread)." if worst[0] - best[0] <= noise else "."))
    return text


def _pretraining_value_finding(summaries: list[Summary]) -> str:
    """Per variant, test accuracy from pretrained vs random weights; then where pretraining paid most."""
    clauses, gains = [], []
    for s in summaries:
        if not s.accuracy:
            continue
        text = f"{s.label}: {mean(s.accuracy):.1%} pretrained"
        if s.scratch_accuracy:
            gain = mean(s.accuracy) - mean(s.scratch_accuracy)
            gains.append((gain, s))
            text += f" vs {mean(s.scratch_accuracy):.1%} from random weights ({gain * 100:+.1f} points)"
        clauses.append(text)
    if not clauses:
        return "no runs finished yet."
    text = "; ".join(clauses) + "."
    if gains:
        best, least = max(gains, key=lambda g: g[0]), min(gains, key=lambda g: g[0])
        text += (f" Pretraining paid most with {best[1].label} ({best[0] * 100:+.1f} points) and least with "
                 f"{least[1].label} ({least[0] * 100:+.1f}).")
    return text


def _sweep_finding(experiment: Experiment, summaries: list[Summary]) -> str:
    """Per group: the lowest swept value at which it diverged, the highest it trained at, its best."""
    short = experiment.sweep_key.rsplit(".", 1)[-1]
    groups: dict[str, list[Summary]] = {}
    for s in summaries:
        groups.setdefault(s.group, []).append(s)
    clauses = []
    for group, members in groups.items():
        members = [m for m in members if m.runs]
        bad = sorted(m.sweep_value for m in members if m.diverged)
        good = sorted(m.sweep_value for m in members if not m.diverged)
        finished = [m for m in members if m.val_mean is not None]
        best = min(finished, key=lambda m: m.val_mean) if finished else None
        if bad and good:
            text = f"{group} diverged at {short} >= {_value(bad[0])} and trained up to {_value(good[-1])}"
            if bad[0] < good[-1]:
                text = (f"{group} diverged at {short} {', '.join(map(_value, bad))} and trained at "
                        f"{', '.join(map(_value, good))}")
        elif bad:
            text = f"{group} diverged at every {short} tried (from {_value(bad[0])})"
        else:
            text = f"{group} trained at every {short} up to {_value(good[-1])}" if good else f"{group} has no runs"
        if best is not None:
            text += f" (best val loss {_num(best.val_mean)} at {_value(best.sweep_value)})"
        clauses.append(text)
    return "; ".join(clauses) + "."


def _exponent(x: float | None) -> str:
    return f"T^{x:.2f}" if x is not None else "(too few lengths to fit)"


def attention_cost_finding(result: dict) -> str:
    """bench/attention_cost.py's report in one sentence: the fitted exponents, where a path ran out
    of the memory cap, and the two paths side by side at the longest length both finished."""
    fit, oom, rows = result["fit"], result["out_of_memory_at"], result["rows"]
    names = {"explicit": "explicit softmax attention", "sdpa": "the fused kernel (SDPA)"}
    clauses = [f"{names[p]}'s time grew as {_exponent(fit[p]['time_exponent'])} and its peak memory as "
               f"{_exponent(fit[p]['memory_exponent'])}" for p in ("explicit", "sdpa")]
    longest = {p: max((r["length"] for r in rows if r["path"] == p and not r["out_of_memory"]), default=None)
               for p in ("explicit", "sdpa")}
    cap = f"{result['memory_cap_mb']:g} MB"
    for p in ("explicit", "sdpa"):
        if oom[p] is not None:
            clauses.append(f"under a {cap} cap {names[p]} ran out of memory at {oom[p]:,} tokens"
                           + (f" (it last fit {longest[p]:,})" if longest[p] else ""))
        elif longest[p]:
            clauses.append(f"{names[p]} fit the {cap} cap up to the longest length tried, {longest[p]:,}")
    both = [T for T in {r["length"] for r in rows}
            if all(any(r["path"] == p and r["length"] == T and not r["out_of_memory"] for r in rows)
                   for p in ("explicit", "sdpa"))]
    if both:
        T = max(both)
        e, s = ([r for r in rows if r["path"] == p and r["length"] == T][0] for p in ("explicit", "sdpa"))
        clauses.append(f"at {T:,} tokens the explicit path took {e['ms']:.1f} ms and {e['peak_mb']:.0f} MB "
                       f"against {s['ms']:.1f} ms and {s['peak_mb']:.0f} MB")
    text = "; ".join(clauses) + "."
    return text[0].upper() + text[1:]
