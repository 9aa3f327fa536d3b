"""Experiments: every from-scratch lesson is one command, and the answer is a report with plots.

    python -m flows.experiments clipping        # one experiment of experiments.yaml
    python -m flows.experiments --all           # every one (make experiments)
    python -m flows.experiments --list          # names, runs and estimated time (make experiments-list)
    python -m flows.experiments --check --all   # validate the catalogue only

Each experiment is a baseline plus variants, each a few pretrain params over params.yaml (see
experiments.yaml), run with every seed. Before anything trains, every variant is checked: an
unknown experiment name, an unknown or mistyped params key (against the params schema), a variant
identical to its baseline or a different token budget stops with a message naming it.

How it runs, without touching your workspace: runs go through `dvc exp run --queue` and
`dvc queue start` in a clone of this repository at .cache/experiments/workspace (your
working tree's files copied in, DVC cache shared), so params.yaml, dvc.lock and data/ here stay
exactly as they are, while `dvc exp show` here lists the runs (their refs are pushed back) with
their params and metrics. The prepared data (download, tokenizer, pack) comes from the DVC cache,
prepared once in the clone if it is not up to date. Each run is the pretrain stage's own Prefect
flow; in MLflow every experiment has one parent run ("experiment <name>") with a child per
variant and seed. All the runs of one invocation share one queue (each experiment's report is
written as soon as its runs are done). A finished run is kept in data/experiments/<name>/runs/
under a key of its params, code and data: a rerun reuses it, and a run killed half-way resumes
with those kept. A variant that diverges is a result (the step and the loss where it did), not a
crash. Runs whose settings resolve to the same (several experiments' baselines are the base
configuration itself) are queued with the same params, so DVC's run-cache restores the model
trained for the first instead of training it again; their MLflow child says so (llm.restored_from).

Output: data/experiments/<name>/report.md and report.html (plots embedded) and
data/experiments/index.md / index.html with every experiment's one-sentence finding.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

import flows  # noqa: F401  (environment defaults)
from flows.params import Params, _describe
from flows.run_id import PIPELINE_RUN_ENV
from llm.diagnose import diagnose
from llm.experiment_report import write_index, write_measurement_report, write_report
from llm.experiments import (
    CLASSIFY,
    Catalogue,
    CatalogueError,
    Experiment,
    Measurement,
    Variant,
    apply_overrides,
    load_catalogue,
    run_name,
    run_overrides,
)
from llm.files import read_json, read_yaml, write_json

WORKSPACE = Path(".cache/experiments/workspace")
OUT = Path("data/experiments")
# FLOPs a second this small a model gets on 2 CPU cores (6 N per token), the fixed cost of one
# queued run (checkout, Python start, Prefect flow, MLflow, DVC commit) and a classify run's tuning:
# measured on the base configuration (1.46M parameters: 10k tokens/s, runs 47 s apart).
EST_FLOPS = 8e10
EST_OVERHEAD_S = 12.0
EST_CLASSIFY_S = 8.0
DIVERGED = re.compile(r"training diverged at step (\d+): the ([a-z ]+) is ([-\w.]+)")
EXP_TAG = "llm.experiment"
RESTORED_TAG = "llm.restored_from"


class ExperimentError(RuntimeError):
    """A problem the user can fix; printed without a traceback."""


# --- validation: before anything runs -------------------------------------------------------------

@dataclass
class PlannedRun:
    experiment: Experiment
    variant: Variant
    seed: int
    params: Params
    overrides: dict
    key: str = ""

    @property
    def name(self) -> str:
        return f"{run_name(self.experiment.name, self.variant, self.seed)}-{self.key[:6]}"

    @property
    def folder(self) -> Path:
        return OUT / self.experiment.name / "runs" / self.variant.key / f"seed{self.seed}"


def validate_params(raw: dict, overrides: dict, where: str) -> Params:
    merged = apply_overrides(raw, overrides)
    try:
        return Params.model_validate_json(json.dumps(merged))
    except Exception as err:  # pydantic's ValidationError: name the variant and the key
        lines = _describe(err) if hasattr(err, "errors") else [str(err)]
        raise ExperimentError("\n".join(f"{where}: {line}" for line in lines)) from None


def token_budget(params: Params) -> int:
    model, train = params.pretrain.model.build(), params.pretrain.train
    per_step = train.tokens_per_step or train.batch_size * model.context_length
    return per_step * train.max_steps


def resolved(params: Params, *, seeds: bool = True) -> dict:
    """What a run computes, as the stages will resolve it: the model as built (a preset's default
    spelled out or left null is the same model), the rest of the experiment's params as they are."""
    settings = params.model_dump(mode="json", include={"pretrain", "tokenizer", "pack", "classify"})
    settings["pretrain"]["model"] = params.pretrain.model.build().to_dict()
    if not seeds:
        settings["pretrain"]["train"].pop("seed")
        settings["classify"].pop("seed")
    return settings


def needed(raw: dict, overrides: dict, params: Params) -> dict:
    """`overrides` less the keys that change nothing once resolved (a baseline that spells out the
    preset's own value). DVC compares params as written: without this, two experiments' identical
    baselines would look different to it, and its run-cache could not restore one from the other."""
    target, kept = resolved(params), dict(overrides)
    for key in overrides:
        trial = {k: v for k, v in kept.items() if k != key}
        try:
            if resolved(validate_params(raw, trial, "")) == target:
                kept = trial
        except (ExperimentError, ValueError):   # the key is needed to make the params valid at all
            continue
    return kept


def plan(catalogue: Catalogue, raw_params: dict, experiments: list[Experiment]) -> list[PlannedRun]:
    """Every run of the chosen experiments, validated; raises ExperimentError naming the culprit."""
    runs = []
    for experiment in experiments:
        if isinstance(experiment, Measurement):   # a benchmark run: nothing to train or validate
            continue
        settings_of = {}
        for variant in experiment.variants:
            where = f"{catalogue.path}: {experiment.name} / {variant.label}"
            for seed in experiment.seeds:
                overrides = run_overrides(catalogue, experiment, variant, seed)
                params = validate_params(raw_params, overrides, where)
                runs.append(PlannedRun(experiment, variant, seed, params, needed(raw_params, overrides, params)))
            settings_of[variant.key] = resolved(runs[-1].params, seeds=False)
        for variant in experiment.variants:
            if variant.baseline:
                continue
            base = next(v for v in experiment.variants if v.baseline and v.sweep_value == variant.sweep_value)
            if settings_of[variant.key] == settings_of[base.key]:
                raise ExperimentError(f"{catalogue.path}: {experiment.name} / {variant.label}: identical to the "
                                      f"baseline {base.label!r} once applied: it would measure nothing")
        budgets = {r.variant.label: token_budget(r.params) for r in runs if r.experiment is experiment}
        if experiment.stage == "pretrain" and len(set(budgets.values())) > 1:
            listing = ", ".join(f"{k}: {v:,}" for k, v in budgets.items())
            raise ExperimentError(f"{catalogue.path}: {experiment.name}: variants must train on the same number of "
                                  f"tokens (max_steps x tokens per step); got {listing}")
    return runs


def estimate_seconds(runs: list[PlannedRun], experiment: Experiment | Measurement | None = None,
                     trained: set[str] | None = None) -> float:
    """Seconds on 2 CPU cores. A run whose pretrain settings an earlier one had (in `trained`, which
    this adds to) costs only the overhead: DVC's run-cache restores its model instead of training it."""
    from llm.model import num_params

    trained = set() if trained is None else trained
    total = experiment.estimate_s if isinstance(experiment, Measurement) else 0.0
    for r in runs:
        total += EST_OVERHEAD_S + (EST_CLASSIFY_S if r.experiment.stage == "classify" else 0.0)
        pretrain = json.dumps({k: v for k, v in r.overrides.items() if not k.startswith(CLASSIFY)}, sort_keys=True)
        if pretrain in trained:
            continue
        trained.add(pretrain)
        config = r.params.pretrain.model.build()
        if r.params.pretrain.model.vocab_size is None:
            config.vocab_size = r.params.tokenizer.vocab_size
        total += 6 * num_params(config) * token_budget(r.params) / EST_FLOPS
    return total


# --- keys: what decides a run's result ------------------------------------------------------------

def code_fingerprint(root: Path) -> str:
    """A hash of the pretrain and classify stages' code and data dependencies as dvc.yaml lists them."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    digest = hashlib.sha256()
    for dep in sorted({d for stage in ("pretrain", "classify") for d in stages[stage].get("deps", [])}):
        path = root / dep
        if path.is_file():
            digest.update(dep.encode() + path.read_bytes())
    lock = root / "dvc.lock"
    if lock.exists():  # the prepared data, as the pipeline recorded it
        locked = yaml.safe_load(lock.read_text()).get("stages", {})
        for stage in ("tokenizer", "pack"):
            digest.update(json.dumps(locked.get(stage, {}).get("outs", []), sort_keys=True).encode())
    return digest.hexdigest()


def run_key(run: PlannedRun, code: str) -> str:
    text = json.dumps({"pretrain": run.params.pretrain.model_dump(mode="json"),
                       "tokenizer": run.params.tokenizer.model_dump(mode="json"),
                       "pack": run.params.pack.model_dump(mode="json"), "code": code,
                       **({"classify": run.params.classify.model_dump(mode="json")}
                          if run.experiment.stage == "classify" else {})}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def finished(run: PlannedRun) -> dict | None:
    """The kept result of this run, if one with the same key finished (or diverged) earlier."""
    path = run.folder / "result.json"
    if not path.exists():
        return None
    result = read_json(path)
    return result if result.get("key") == run.key and result.get("status") in ("finished", "diverged") else None


# --- the experiment workspace: a clone, so the user's stays untouched --------------------------------

def sh(command: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise ExperimentError(f"`{' '.join(command)}` failed in {cwd} ({result.returncode}):\n"
                              f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def dvc_bin() -> str:
    return str(Path(sys.executable).with_name("dvc"))


def prepare_workspace(root: Path, env: dict) -> Path:
    """Sync .cache/experiments/workspace with the working tree (HEAD + your uncommitted files)."""
    ws = root / WORKSPACE
    if not (ws / ".git").exists():
        ws.parent.mkdir(parents=True, exist_ok=True)
        sh(["git", "clone", "--quiet", "--shared", "--no-checkout", str(root), str(ws)], root)
    head = sh(["git", "rev-parse", "HEAD"], root).stdout.strip()
    sh(["git", "checkout", "--quiet", "--force", "--detach", head], ws)
    sh(["git", "clean", "-fdq"], ws)   # untracked, not ignored; data/ and .dvc/cache stay
    files = sh(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], root).stdout.split("\0")
    for name in filter(None, files):
        src, dst = root / name, ws / name
        if src.is_file() and not src.is_symlink():
            if not dst.exists() or dst.read_bytes() != src.read_bytes():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        elif not src.exists() and dst.exists():
            dst.unlink()   # deleted in the working tree
    # Runs commit the pretrain stage's metrics and curves (`dvc exp show` reads them from there);
    # here data/ is otherwise ignored, as in the repository.
    gitignore = ws / ".gitignore"
    rules = gitignore.read_text() if gitignore.exists() else ""
    rules = re.sub(r"(?m)^/data/$", "/data/*", rules)
    gitignore.write_text(rules + "\n# experiments: commit the pretrain and classify metrics and curves\n!/data/pretrain/\n"
                         "/data/pretrain/checkpoints/\n!/data/classify/\n")
    cache = sh([dvc_bin(), "cache", "dir"], root, env).stdout.strip()
    sh([dvc_bin(), "cache", "dir", "--local", str(Path(root, cache).resolve())], ws, env)
    return ws


def prepare_data(ws: Path, env: dict, log) -> None:
    """The pipeline's download/tokenizer/pack outputs, from the shared DVC cache (prepared once, in
    the workspace clone, if they are not up to date: never once per run)."""
    sh([dvc_bin(), "checkout", "--quiet", "--with-deps", "pack"], ws, env, check=False)
    status = sh([dvc_bin(), "status", "--json", "--with-deps", "pack"], ws, env)
    if json.loads(status.stdout or "{}"):
        log("prepared data (download, tokenizer, pack) not up to date: preparing it once in the workspace clone")
        sh([dvc_bin(), "repro", "pack"], ws, env)


# --- MLflow: one parent run per experiment --------------------------------------------------------

def tracking():
    from mlflow.tracking import MlflowClient

    from flows.environment import mlflow_tracking_uri
    return MlflowClient(mlflow_tracking_uri(Path.cwd()))


def mlflow_parent(params: Params, experiment: Experiment | Measurement) -> tuple[str, str]:
    """(parent run id, pipeline-run id) of the experiment's one parent run in MLflow."""
    from flows._stage import PIPELINE_TAG, STAGE_TAG, _experiment_id

    client = tracking()
    experiment_id = _experiment_id(client, params.project.experiment)
    pipeline_id = f"experiment-{experiment.name}"
    found = client.search_runs([experiment_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{pipeline_id}' "
                               f"and tags.`{STAGE_TAG}` = 'pipeline'", max_results=1)
    if found:
        return found[0].info.run_id, pipeline_id
    parent = client.create_run(experiment_id, run_name=f"experiment {experiment.name}",
                               tags={PIPELINE_TAG: pipeline_id, STAGE_TAG: "pipeline", EXP_TAG: experiment.name,
                                     "mlflow.note.content": experiment.question})
    client.set_terminated(parent.info.run_id, "FINISHED")
    return parent.info.run_id, pipeline_id


def stage_runs(run: PlannedRun) -> list:
    """The MLflow runs of this DVC experiment's stages, newest first (flows/_stage.py tags them
    with its name); none when DVC's run-cache restored every stage instead of running it."""
    client = tracking()
    experiment = client.get_experiment_by_name(run.params.project.experiment)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`dvc.exp_name` = '{run.name}'",
                              order_by=["attributes.start_time DESC"])


def mlflow_child(run: PlannedRun, runs: list | None = None):
    """The MLflow run of the stage this experiment measures, if that stage ran (among `runs`, its
    stage runs when already fetched)."""
    from flows._stage import STAGE_TAG

    runs = stage_runs(run) if runs is None else runs
    return next((r for r in runs if r.data.tags.get(STAGE_TAG) == run.experiment.stage), None)


def file_child(run: PlannedRun, metrics: dict, train, val) -> tuple[str | None, bool]:
    """File the run's stage runs under its experiment's parent (queued together, they ran under a
    holding parent) and label the measured one; a run DVC restored from its run-cache gets a child
    holding the restored metrics and curves, tagged as such, so every variant and seed has one."""
    from mlflow.entities import Metric, Param

    from flows._stage import PIPELINE_TAG, STAGE_TAG, _experiment_id

    client = tracking()
    parent_id, pipeline_id = mlflow_parent(run.params, run.experiment)
    runs = stage_runs(run)
    for stage_run in runs:
        client.set_tag(stage_run.info.run_id, "mlflow.parentRunId", parent_id)
        client.set_tag(stage_run.info.run_id, PIPELINE_TAG, pipeline_id)
    child = mlflow_child(run, runs)
    if child is not None:
        child_id = child.info.run_id
    elif not metrics:   # failed before its stage ran: nothing to show
        return None, False
    else:
        experiment_id = _experiment_id(client, run.params.project.experiment)
        child_id = client.create_run(experiment_id, tags={
            "mlflow.parentRunId": parent_id, PIPELINE_TAG: pipeline_id, STAGE_TAG: run.experiment.stage,
            "dvc.exp_name": run.name, RESTORED_TAG: "DVC's run-cache: these params, code and data were "
            "trained before; the model, metrics and curves are that run's"}).info.run_id
        now = int(time.time() * 1000)
        points = [Metric(k, float(v), now, 0) for k, v in metrics.items() if isinstance(v, (int, float))]
        points += [Metric("loss", v, now, int(s)) for s, v in train] + [Metric("val_loss", v, now, int(s)) for s, v in val]
        for i in range(0, len(points), 1000):   # MLflow takes at most 1000 metrics a call
            client.log_batch(child_id, metrics=points[i:i + 1000],
                             params=[Param(k, str(v)) for k, v in run.overrides.items()] if i == 0 else [])
        client.set_terminated(child_id, "FINISHED")
    client.set_tag(child_id, "mlflow.runName", f"{run.variant.label} (seed {run.seed})")
    for k, v in {EXP_TAG: run.experiment.name, "llm.variant": run.variant.label, "llm.seed": str(run.seed)}.items():
        client.set_tag(child_id, k, v)
    return child_id, child is None


# --- collecting a run's result from its own files -------------------------------------------------------

def read_curve(text: str, column: str) -> list[tuple[float, float]]:
    lines = text.strip().splitlines()
    if not lines:
        return []
    header = lines[0].split(",")
    i, s = header.index(column), header.index("step")
    return [(float(row.split(",")[s]), float(row.split(",")[i])) for row in lines[1:] if row]


def exp_ref(ws: Path, name: str) -> str | None:
    refs = sh(["git", "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps"], ws).stdout.split("\n")
    for line in refs:
        if line and line.split()[0].endswith("/" + name):
            return line.split()[1]
    return None


def collect_finished(run: PlannedRun, ws: Path, rev: str) -> dict:
    run.folder.mkdir(parents=True, exist_ok=True)
    files = {}
    names = ("metrics.json", "curves/train.csv", "curves/val.csv") if run.experiment.stage == "pretrain" else ("metrics.json",)
    for rel in names:
        text = sh(["git", "show", f"{rev}:data/{run.experiment.stage}/{rel}"], ws).stdout
        (run.folder / Path(rel).name).write_text(text)
        files[rel] = text
    metrics = json.loads(files["metrics.json"])
    train, val = [], []
    if "curves/train.csv" in files:
        train, val = read_curve(files["curves/train.csv"], "loss"), read_curve(files["curves/val.csv"], "val_loss")
    return _result(run, "finished", train, val, metrics, None, rev)


def collect_failed(run: PlannedRun, ws: Path, env: dict) -> dict:
    """A run without an experiment commit: diverged (a result), or failed (an error to show)."""
    logs = sh([dvc_bin(), "queue", "logs", run.name], ws, env, check=False)
    text = logs.stdout + logs.stderr
    match = DIVERGED.search(text)
    client, child = tracking(), mlflow_child(run)
    train, val = [], []
    if child is not None:
        train = [(m.step, m.value) for m in client.get_metric_history(child.info.run_id, "loss")]
        val = [(m.step, m.value) for m in client.get_metric_history(child.info.run_id, "val_loss")]
    if match is None:
        tail = "\n".join(line for line in text.splitlines() if "error" in line.lower())[-1500:] or text[-1500:]
        return _result(run, "failed", train, val, {}, None, None, error=tail)
    finite = [v for _, v in sorted(train) if math.isfinite(v)]
    diverged = {"step": int(match.group(1)), "what": match.group(2), "value": match.group(3).rstrip("."),
                "last_loss": finite[-1] if finite else None}
    return _result(run, "diverged", train, val, {}, diverged, None)


def _result(run: PlannedRun, status: str, train, val, metrics: dict, diverged, rev, error: str = "") -> dict:
    finite_train = [(s, v) for s, v in train if math.isfinite(v)]
    diagnosis = diagnose(finite_train, [(s, v) for s, v in val if math.isfinite(v)]) if finite_train else None
    result = {"experiment": run.experiment.name, "variant": run.variant.key, "label": run.variant.label,
              "seed": run.seed, "key": run.key, "status": status, "exp_name": run.name, "exp_rev": rev,
              "overrides": run.overrides, "metrics": metrics, "diverged": diverged, "error": error,
              "train": [list(p) for p in train], "val": [list(p) for p in val],
              "diagnosis": [vars(f) for f in diagnosis.findings] if diagnosis else []}
    result["mlflow_run_id"], result["restored"] = file_child(run, metrics, train, val)
    run.folder.mkdir(parents=True, exist_ok=True)
    write_json(run.folder / "result.json", result)
    return result


# --- running ------------------------------------------------------------------------------------------

QUEUE_POLL_S = 5.0
QUEUE_RESTARTS = 3
HOLDING_PARENT = "experiments-queue"   # the pipeline id runs log under until filed under their experiment


def queue_status(ws: Path, env: dict) -> tuple[dict[str, str], int]:
    """({run name: Queued/Running/Success/Failed}, workers alive) as `dvc queue status` reports them."""
    text = sh([dvc_bin(), "queue", "status"], ws, env, check=False).stdout
    status = {m.group(1): m.group(2) for m in re.finditer(r"(?m)^\w+\s+(\S+)\s+.*?\s(Queued|Running|Success|Failed)\s*$", text)}
    workers = re.search(r"Worker status: (\d+) active, (\d+) idle", text)
    return status, (int(workers.group(1)) + int(workers.group(2))) if workers else 0


def start_queue(runs: list[PlannedRun], ws: Path, env: dict, log) -> None:
    """Queue every run not yet finished, all experiments together, and start one worker: one queue
    rather than one per experiment spares each experiment the queue's start and drain."""
    # a runner killed half-way may have left queue workers and entries behind: start clean (a stop
    # with no worker to receive it would linger in DVC's file broker and end the next one)
    if queue_status(ws, env)[1]:
        sh([dvc_bin(), "queue", "stop", "--kill"], ws, env, check=False)
    sh([dvc_bin(), "queue", "remove", "--queued", "--failed"], ws, env, check=False)
    queued = [run for run in runs if exp_ref(ws, run.name) is None]   # with a ref: finished before a kill
    for i, run in enumerate(queued, 1):
        sets = []
        for key, value in run.overrides.items():
            sets += ["-S", f"++{key}={_yaml(value)}"]   # ++: set, whether params.yaml has the key or not
        sh([dvc_bin(), "exp", "run", "--queue", "--name", run.name, *sets, run.experiment.stage], ws, env)
        if i % 10 == 0 or i == len(queued):
            log(f"queued {i}/{len(queued)} runs")
    if queued:
        start_worker(ws, env)


def start_worker(ws: Path, env: dict) -> None:
    """`dvc queue start`: its worker lives on with the command's output as its own, so that goes to a
    file (from a pipe, waiting for the command would wait for the whole queue)."""
    log = ws / ".dvc" / "tmp" / "queue-start.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as output:
        done = subprocess.run([dvc_bin(), "queue", "start", "--jobs", "1"], cwd=ws, env=env, stdout=output,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise ExperimentError(f"`dvc queue start` failed in {ws} ({done.returncode}); see {log}")


def _yaml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def keep_queue_working(status: dict[str, str], workers: int, ws: Path, env: dict, log, watch: dict) -> None:
    """Start another worker when the one running stopped with runs left (a stale stop message in
    DVC's file broker ends a worker after one run): waiting on the queue would then wait forever."""
    pending = sum(1 for s in status.values() if s in ("Queued", "Running"))
    watch["idle"] = watch.get("idle", 0) + 1 if pending and not workers else 0
    if watch["idle"] < 2:   # a worker just started may not show yet
        return
    watch["restarts"] = watch.get("restarts", 0) + 1
    if watch["restarts"] > QUEUE_RESTARTS:
        raise ExperimentError(f"DVC's queue worker in {ws} stopped {watch['restarts']} times with {pending} runs "
                              "left; see `dvc queue status` and `dvc queue logs NAME` there")
    log(f"the queue's worker stopped with {pending} runs left: starting another")
    start_worker(ws, env)
    watch["idle"] = 0


def collect_experiment(experiment: Experiment, runs: list[PlannedRun], ws: Path, env: dict, log) -> list[dict]:
    """The results of an experiment's runs that the queue has finished with, and their DVC output."""
    log_file = OUT / experiment.name / "dvc-exp-run.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    results = []
    with open(log_file, "a") as output:
        for run in runs:
            output.write(sh([dvc_bin(), "queue", "logs", run.name], ws, env, check=False).stdout)
            rev = exp_ref(ws, run.name)
            result = collect_finished(run, ws, rev) if rev else collect_failed(run, ws, env)
            results.append(result)
            shown = {k: v for k, v in result["metrics"].items() if k in ("val_loss", "test_accuracy")}
            log(f"  {run.variant.label} seed {run.seed}: {result['status']}"
                + (" (restored by DVC's run-cache)" if result["restored"] else "")
                + "".join(f" {k} {v:.3f}" for k, v in shown.items()))
    return results


def report_experiment(experiment: Experiment, results: list[dict], command: str, wall_s: float) -> dict:
    failed = [r for r in results if r["status"] == "failed"]
    entry = write_report(OUT / experiment.name, experiment, [r for r in results if r["status"] != "failed"],
                         command=command, wall_s=wall_s)
    entry["failed"] = [f"{r['label']} seed {r['seed']}: {r['error']}" for r in failed]
    write_json(OUT / experiment.name / "summary.json", entry)
    return entry


def run_experiments(experiments: list[Experiment], runs: list[PlannedRun], root: Path, ws: Path | None,
                    env: dict, log, command: str) -> dict[str, dict]:
    """Every run of these experiments through one DVC queue; each experiment's report is written as
    soon as the queue is done with its runs (so reports appear while the rest still trains)."""
    started = time.time()
    kept = {e.name: [] for e in experiments}
    todo = {e.name: [] for e in experiments}
    for run in runs:
        result = finished(run)
        (kept[run.experiment.name].append(result) if result is not None else todo[run.experiment.name].append(run))
    entries = {}
    for experiment in experiments:   # (each one's MLflow parent is made when its first run is filed)
        mine = todo[experiment.name]
        log(f"{experiment.name}: {len(kept[experiment.name]) + len(mine)} runs, "
            f"{len(kept[experiment.name])} kept from earlier, {len(mine)} to run")
        if not mine:
            entries[experiment.name] = report_experiment(experiment, kept[experiment.name], command, 0.0)
    waiting = [e for e in experiments if todo[e.name]]
    if not waiting:
        return entries
    assert ws is not None
    start_queue([r for e in waiting for r in todo[e.name]], ws, env, log)
    log(f"dvc queue start: {sum(len(todo[e.name]) for e in waiting)} runs; each experiment's DVC output goes "
        f"to {OUT}/<name>/dvc-exp-run.log")
    watch: dict = {}
    while waiting:
        time.sleep(QUEUE_POLL_S)
        status, workers = queue_status(ws, env)
        for experiment in list(waiting):
            if any(status.get(r.name) in ("Queued", "Running") for r in todo[experiment.name]):
                continue
            results = kept[experiment.name] + collect_experiment(experiment, todo[experiment.name], ws, env, log)
            entries[experiment.name] = report_experiment(experiment, results, command, time.time() - started)
            log(f"{experiment.name}: {entries[experiment.name]['finding']}")
            waiting.remove(experiment)
        if waiting:
            keep_queue_working(status, workers, ws, env, log, watch)
    drop_holding_parent(runs[0].params)
    # `dvc exp show` in the repository lists them: push the experiment refs back.
    sh(["git", "push", "--quiet", "--force", str(root), "refs/exps/*:refs/exps/*"], ws, check=False)
    return entries


def drop_holding_parent(params: Params) -> None:
    """Delete the queue's holding parent run (made by the first stage run to start) once
    file_child has filed every stage run under it with its experiment's parent."""
    from flows._stage import PIPELINE_TAG, STAGE_TAG

    client = tracking()
    experiment = client.get_experiment_by_name(params.project.experiment)
    if experiment is None:
        return
    ids = [experiment.experiment_id]
    for holder in client.search_runs(ids, f"tags.`{PIPELINE_TAG}` = '{HOLDING_PARENT}' and tags.`{STAGE_TAG}` = 'pipeline'"):
        if not client.search_runs(ids, f"tags.`mlflow.parentRunId` = '{holder.info.run_id}'", max_results=1):
            client.delete_run(holder.info.run_id)


def run_measurement(measurement: Measurement, raw_params: dict, root: Path, env: dict, log, command: str) -> dict:
    """One run of the measurement's bench script (kept and reused while its arguments and code are
    the same), its report, and an MLflow parent run holding the fitted figures and the report."""
    folder = OUT / measurement.name
    result_path = folder / "result.json"
    code = hashlib.sha256()
    for name in (measurement.script, "llm/model.py", "bench/report.py"):
        code.update((root / name).read_bytes())
    key = hashlib.sha256(json.dumps([measurement.args, code.hexdigest()]).encode()).hexdigest()[:16]
    started = time.time()
    result = read_json(result_path) if result_path.exists() else None
    if result is not None and result.get("key") == key:
        log(f"{measurement.name}: kept from earlier ({result_path})")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / "result.json.tmp"
        bench = [sys.executable, measurement.script, *measurement.args, "--out", str(partial)]
        log(f"{measurement.name}: {' '.join(bench[1:])}")
        done = subprocess.run(bench, cwd=root, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise ExperimentError(f"{measurement.name}: `{' '.join(bench[1:])}` failed ({done.returncode}):\n"
                                  f"{done.stderr[-3000:]}")
        result = {**read_json(partial), "key": key}
        write_json(result_path, result)
        partial.unlink()
    entry = write_measurement_report(folder, measurement, result, command=command, wall_s=time.time() - started)
    params = validate_params(raw_params, {}, "params.yaml")
    parent_id, _ = mlflow_parent(params, measurement)
    client = tracking()
    for path, fit in result["fit"].items():
        for name, value in fit.items():
            if isinstance(value, float):
                client.log_metric(parent_id, f"{path}.{name}", value)
    for path, length in result["out_of_memory_at"].items():
        if length is not None:
            client.log_metric(parent_id, f"{path}.out_of_memory_at", length)
    client.log_artifacts(parent_id, str(folder), "report")
    write_json(folder / "summary.json", entry)
    return entry


def experiments_flow_impl(names: list[str], catalogue_path: str, params_path: str, command: str) -> list[dict]:
    from prefect.logging import get_run_logger

    logger = get_run_logger()
    root = Path.cwd()
    catalogue = load_catalogue(catalogue_path)
    raw = read_yaml(params_path, ExperimentError)
    chosen = catalogue.select(names)
    runs = plan(catalogue, raw, chosen)
    code = code_fingerprint(root)
    for r in runs:
        r.key = run_key(r, code)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    from flows.environment import mlflow_tracking_uri
    env["MLFLOW_TRACKING_URI"] = mlflow_tracking_uri(root)
    env.setdefault("PREFECT_HOME", str(root / ".prefect"))
    ws = None
    if any(finished(r) is None for r in runs):
        ws = prepare_workspace(root, env)
        prepare_data(ws, env, logger.info)
    entries = {}
    for measurement in [e for e in chosen if isinstance(e, Measurement)]:   # first: they time the CPU
        entries[measurement.name] = run_measurement(measurement, raw, root, env, logger.info, command)
        logger.info(f"{measurement.name}: {entries[measurement.name]['finding']}")
    trained = [e for e in chosen if isinstance(e, Experiment)]
    entries.update(run_experiments(trained, runs, root, ws, {**env, PIPELINE_RUN_ENV: HOLDING_PARENT},
                                   logger.info, command))
    # the index covers every experiment with a report, not only this invocation's
    index = []
    for name in catalogue.experiments:
        summary = OUT / name / "summary.json"
        if summary.exists():
            index.append(read_json(summary))
    write_index(OUT, index)
    return [entries[e.name] for e in chosen]


def _flow():
    from prefect import flow

    @flow(name="experiments", log_prints=True, validate_parameters=False)
    def experiments_flow(names: list[str], catalogue_path: str, params_path: str, command: str) -> list[dict]:
        return experiments_flow_impl(names, catalogue_path, params_path, command)

    return experiments_flow


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="experiments to run (see --list)")
    parser.add_argument("--all", action="store_true", help="run every experiment of the catalogue")
    parser.add_argument("--list", action="store_true", help="list the experiments with their runs and estimated time")
    parser.add_argument("--check", action="store_true", help="validate the catalogue and the variants, run nothing")
    parser.add_argument("--catalogue", default="experiments.yaml", help="the catalogue (default: experiments.yaml)")
    parser.add_argument("--params", default="params.yaml", help="the pipeline's params (default: params.yaml)")
    parser.add_argument("--no-server", action="store_true",
                        help="don't start a local Prefect server; each run uses an ephemeral API (slower)")
    args = parser.parse_args(argv)
    try:
        catalogue = load_catalogue(args.catalogue)
        if not (args.names or args.all or args.list):
            parser.error("name an experiment, or use --all or --list; known: " + ", ".join(catalogue.experiments))
        chosen = catalogue.select(args.names)
        raw = read_yaml(args.params, ExperimentError)
        runs = plan(catalogue, raw, chosen)
    except (CatalogueError, ExperimentError, OSError) as err:
        sys.exit(f"error: {err}")
    count = len(runs) + sum(isinstance(e, Measurement) for e in chosen)   # a measurement is one run
    if args.list:
        total, trained = 0.0, set()
        for experiment in chosen:
            seconds = estimate_seconds([r for r in runs if r.experiment is experiment], experiment, trained)
            total += seconds
            print(f"{experiment.name:16s} {max(1, len(experiment.runs())):3d} runs  ~{seconds / 60:5.1f} min  "
                  f"{experiment.question}")
        print(f"{'all' if not args.names else 'these':16s} {count:3d} runs  ~{total / 60:5.1f} min "
              "(estimated for 2 CPU cores; finished runs are reused)")
        return
    if args.check:
        print(f"ok: {len(chosen)} experiments, {count} runs")
        return
    if not args.no_server and "PREFECT_API_URL" not in os.environ:
        from flows import servers
        os.environ["PREFECT_API_URL"] = servers.ensure_prefect()
    command = "python -m flows.experiments " + (" ".join(args.names) if args.names else "--all")
    try:
        entries = _flow()(args.names, args.catalogue, args.params, command)
    except (CatalogueError, ExperimentError) as err:
        sys.exit(f"error: {err}")
    for entry in entries:
        print(f"{entry['name']}: {entry['finding']}")
    print(f"reports: {OUT}/index.html")
    failed = [f for e in entries for f in e.get("failed", [])]
    if failed:
        sys.exit("error: runs failed (not diverged):\n" + "\n".join(failed))


if __name__ == "__main__":
    main()
