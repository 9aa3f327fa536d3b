"""Training snapshots: the model as it was at several points of training, to watch it learn.

At step 0 (before any update) and at evaluations of a run, a snapshot keeps

    the weights at that step, in float16 (half the bytes; they load into a float32 model), and
    a record of what the model did then with two fixed texts, a probe text and one training
    row: each token's probability and surprisal, the top-k candidates for the next token, and
    the attention of every layer and head (llm.introspect's plain data, from one forward pass).

`keep` bounds the disk: that many snapshots, evenly spaced over step 0 and the evaluation steps
(the first and the last always among them). Each token recorded costs layers x heads x tokens
numbers of attention, so the texts are cut to `tokens` tokens.

On disk, one folder per snapshot and the run's loss curves:

    <folder>/step_0000200/model.safetensors   the weights at step 200 (float16)
    <folder>/step_0000200/record.json         {"step", "val_loss", "probes": [{"name", "text", "ids",
                                               "tokens": token_table rows, "attention": layers}]}
    <folder>/curves.json                      {"train": [[step, loss], ...], "val": [[step, loss], ...]}
    <folder>/settings.json                    what the records were made with (probe text and ids, tokens, top_k)

The pretrain stage keeps them inside its model folder (`snapshots/`), so a logged or registered
model carries its own history, and the server finds them next to the weights.
Like the rest of llm/, this module knows nothing of pipelines or servers.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import save_file

from llm import introspect
from llm.checkpoint import WEIGHTS_FILE, checkpoint_name, load_weights
from llm.files import atomic_dir, atomic_file, read_json, write_json
from llm.model import GPT
from llm.plain import PlainDict, field_checker

SNAPSHOTS_DIR = "snapshots"       # inside a model folder
RECORD_FILE = "record.json"
CURVES_FILE = "curves.json"
SETTINGS_FILE = "settings.json"
_NAME = re.compile(r"^step_(\d+)$")
DIGITS = 4                        # probabilities and attention weights, rounded: 4 digits are plenty to look at


@dataclass
class SnapshotConfig(PlainDict):
    """How many snapshots a run keeps, and what each one records."""

    keep: int = 4                 # snapshots, evenly spaced over step 0 and the evaluations; 0 = none
    probe_text: str = "The people of the United States will not forget what they have seen."
    tokens: int = 32              # tokens of the probe text and of the training row that are recorded
    top_k: int = 5                # candidates recorded for each next token

    def __post_init__(self):
        _require(self.keep >= 0, "keep", self.keep, "must be >= 0 (0 = no snapshots)")
        _require(bool(self.probe_text), "probe_text", self.probe_text, "must not be empty")
        _require(self.tokens >= 2, "tokens", self.tokens, "must be >= 2 (a token and one that follows it)")
        _require(self.top_k >= 1, "top_k", self.top_k, "must be >= 1")


_require = field_checker("SnapshotConfig")


@dataclass
class Probe:
    """A fixed text the snapshots look at: its name on the page and its token ids."""

    name: str
    ids: list[int]


def chosen_steps(evaluation_steps: Sequence[int], keep: int) -> list[int]:
    """`keep` steps evenly spaced over step 0 and the evaluation steps, first and last included."""
    candidates = sorted({0, *evaluation_steps})
    if keep >= len(candidates):
        return candidates
    if keep <= 1:
        return candidates[-1:] if keep == 1 else []
    return sorted({candidates[round(i * (len(candidates) - 1) / (keep - 1))] for i in range(keep)})


# --- taking snapshots ----------------------------------------------------------------------------

def record(model: GPT, probes: Sequence[Probe], decode_token: Callable[[int], str], top_k: int) -> list[dict]:
    """What the model does with each probe: token table and every layer's and head's attention."""
    out = []
    for probe in probes:
        ids = probe.ids[:model.config.context_length]   # a long probe text: what one forward pass sees
        seen = introspect.inspect(model, ids, decode_token, top_k=top_k, with_logit_lens=False, digits=DIGITS)
        out.append({"name": probe.name, "text": "".join(row["text"] for row in seen["tokens"]), "ids": ids,
                    "tokens": seen["tokens"], "attention": seen["attention"]["layers"]})
    return out


def save_half(model: torch.nn.Module, path: Path) -> None:
    """The weights in float16, each shared tensor (a tied embedding) once, as safetensors'
    save_model writes it: load_weights (safetensors' load_model) re-ties and casts on load."""
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        tensor = tensor.detach().to("cpu")
        state[name] = (tensor.to(torch.float16) if tensor.is_floating_point() else tensor).contiguous()
    save_file(state, str(path))


class Snapshots:
    """Takes the snapshots of one run into `folder` (call `take` at step 0 and at each evaluation,
    `finish` at the end).

    The folder may hold snapshots of this same run from before a restart: they are kept and not
    taken again. If their records were made with other probes (the probe text, `tokens` or
    `top_k` changed), `finish` records them again from their own weights, so changing what is
    recorded never needs the run to be trained again."""

    def __init__(self, folder: str | Path, config: SnapshotConfig, steps: Sequence[int], probes: Sequence[Probe],
                 decode_token: Callable[[int], str]):
        self.folder, self.config, self.steps = Path(folder), config, set(steps)
        self.probes = [Probe(p.name, [int(t) for t in p.ids][:config.tokens]) for p in probes]
        self.decode_token = decode_token
        # What the records depend on (not `keep`: which steps are kept does not change a record).
        self.settings = {"probe_text": config.probe_text, "tokens": config.tokens, "top_k": config.top_k,
                         "probes": [vars(p) for p in self.probes]}
        settings_file = self.folder / SETTINGS_FILE
        self.stale = bool(list_steps(self.folder)) and (
            not settings_file.exists() or read_json(settings_file) != self.settings)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.stale:   # else written once the old records are made again (finish)
            write_json(settings_file, self.settings)

    def wanted(self, step: int) -> bool:
        return step in self.steps and not (self.folder / checkpoint_name(step) / RECORD_FILE).exists()

    def take(self, model: GPT, step: int, val_loss: float | None = None) -> dict | None:
        """Snapshot `model` at `step` if it is one of the chosen steps not taken yet; its record."""
        if not self.wanted(step):
            return None
        result = {"step": step, "val_loss": val_loss,
                  "probes": record(model, self.probes, self.decode_token, self.config.top_k)}
        with atomic_dir(self.folder / checkpoint_name(step)) as tmp:   # complete or absent
            save_half(model, tmp / WEIGHTS_FILE)
            _write_record(tmp / RECORD_FILE, result)
        return result

    def finish(self, model: GPT, history: dict[str, list], into: str | Path) -> Path:
        """Record stale snapshots again (with a copy of `model`, the run's model), write the run's
        loss curves, and copy the snapshots into `into` (a model folder's `snapshots/`); steps no
        longer chosen (`keep` changed) are left out."""
        if self.stale:
            self._record_again(model)
        write_json(self.folder / CURVES_FILE, {"train": [list(p) for p in history.get("train_loss", [])],
                                               "val": [list(p) for p in history.get("val_loss", [])]})
        into = Path(into)
        into.mkdir(parents=True, exist_ok=True)
        for name in (CURVES_FILE, SETTINGS_FILE):
            shutil.copy2(self.folder / name, into / name)
        for step in list_steps(self.folder):
            if step in self.steps:
                shutil.copytree(self.folder / checkpoint_name(step), into / checkpoint_name(step))
        return into

    def _record_again(self, model: GPT) -> None:
        at = copy.deepcopy(model)
        for step in list_steps(self.folder):
            path = self.folder / checkpoint_name(step) / RECORD_FILE
            old = read_json(path)
            load_snapshot(at, self.folder, step, next(model.parameters()).device)
            new = {**old, "probes": record(at, self.probes, self.decode_token, self.config.top_k)}
            _write_record(path, new)
        write_json(self.folder / SETTINGS_FILE, self.settings)
        self.stale = False


def _write_record(path: Path, data: dict) -> None:
    with atomic_file(path) as tmp:   # compact: mostly numbers
        tmp.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")))


def probe_bits(result: dict) -> dict[str, float]:
    """Mean surprisal (bits per token) of each probe of a record: one number per probe to log."""
    out = {}
    for probe in result["probes"]:
        bits = [row["surprisal_bits"] for row in probe["tokens"] if row["surprisal_bits"] is not None]
        out[probe["name"]] = sum(bits) / len(bits) if bits else 0.0
    return out


# --- reading them back ---------------------------------------------------------------------------

def list_steps(folder: str | Path) -> list[int]:
    """The steps of the complete snapshots in `folder` (none if it does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir()
                  if (m := _NAME.match(p.name)) and (p / RECORD_FILE).is_file() and (p / WEIGHTS_FILE).is_file())


def read_record(folder: str | Path, step: int) -> dict:
    return read_json(Path(folder) / checkpoint_name(step) / RECORD_FILE)


def read_curves(folder: str | Path) -> dict:
    path = Path(folder) / CURVES_FILE
    return read_json(path) if path.is_file() else {"train": [], "val": []}


def load_snapshot(model: GPT, folder: str | Path, step: int, device: str | torch.device = "cpu") -> GPT:
    """Load the weights of snapshot `step` into `model` (of the same config), in place."""
    load_weights(model, Path(folder) / checkpoint_name(step) / WEIGHTS_FILE, device)
    return model
