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
variant and seed. A finished run is kept in data/experiments/<name>/runs/ under a key of its
params, code and data: a rerun reuses it, and a run killed half-way resumes with those kept. A
variant that diverges is a result (the step and the loss where it did), not a crash.

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
from llm.diagnose import diagnose
from llm.experiment_report import write_index, write_measurement_report, write_report
from llm.experiments import (
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
# FLOPs a second this small a model gets on 2 CPU cores (6 N per token; bench/pretrain.py order of
# magnitude), and the fixed cost of one queued run (clone, checkout, Prefect flow, MLflow logging).
EST_FLOPS = 1e11
EST_OVERHEAD_S = 25.0
DIVERGED = re.compile(r"training diverged at step (\d+): the ([a-z ]+) is ([-\w.]+)")
EXP_TAG = "llm.experiment"


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


def plan(catalogue: Catalogue, raw_params: dict, experiments: list[Experiment]) -> list[PlannedRun]:
    """Every run of the chosen experiments, validated; raises ExperimentError naming the culprit."""
    runs = []
    for experiment in experiments:
        if isinstance(experiment, Measurement):   # a benchmark run: nothing to train or validate
            continue
        pretrain_of = {}
        for variant in experiment.variants:
            where = f"{catalogue.path}: {experiment.name} / {variant.label}"
            for seed in experiment.seeds:
                overrides = run_overrides(catalogue, experiment, variant, seed)
                params = validate_params(raw_params, overrides, where)
                runs.append(PlannedRun(experiment, variant, seed, params, overrides))
            settings = runs[-1].params.model_dump(mode="json", include={"pretrain", "tokenizer", "classify"})
            settings["pretrain"]["train"].pop("seed")
            settings["classify"].pop("seed")
            pretrain_of[variant.key] = settings
        for variant in experiment.variants:
            if variant.baseline:
                continue
            base = next(v for v in experiment.variants if v.baseline and v.sweep_value == variant.sweep_value)
            if pretrain_of[variant.key] == pretrain_of[base.key]:
                raise ExperimentError(f"{catalogue.path}: {experiment.name} / {variant.label}: identical to the "
                                      f"baseline {base.label!r} once applied: it would measure nothing")
        budgets = {r.variant.label: token_budget(r.params) for r in runs if r.experiment is experiment}
        if experiment.stage == "pretrain" and len(set(budgets.values())) > 1:
            listing = ", ".join(f"{k}: {v:,}" for k, v in budgets.items())
            raise ExperimentError(f"{catalogue.path}: {experiment.name}: variants must train on the same number of "
                                  f"tokens (max_steps x tokens per step); got {listing}")
    return runs


def estimate_seconds(runs: list[PlannedRun], experiment: Experiment | Measurement | None = None) -> float:
    from llm.model import num_params

    total = experiment.estimate_s if isinstance(experiment, Measurement) else 0.0
    for r in runs:
        config = r.params.pretrain.model.build()
        if r.params.pretrain.model.vocab_size is None:
            config.vocab_size = r.params.tokenizer.vocab_size
        total += EST_OVERHEAD_S + 6 * num_params(config) * token_budget(r.params) / EST_FLOPS
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

def mlflow_parent(params: Params, experiment: Experiment | Measurement, root: Path) -> tuple[str, str]:
    """(parent run id, pipeline-run id): stages run with that id nest under the parent."""
    from mlflow.tracking import MlflowClient

    from flows._stage import PIPELINE_TAG, STAGE_TAG, _experiment_id
    from flows.environment import mlflow_tracking_uri

    client = MlflowClient(mlflow_tracking_uri(root))
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


def mlflow_child(run: PlannedRun, root: Path):
    """The pretrain stage's MLflow run of this DVC experiment (tagged with its name by flows/_stage.py)."""
    from mlflow.tracking import MlflowClient

    from flows.environment import mlflow_tracking_uri

    client = MlflowClient(mlflow_tracking_uri(root))
    experiment = client.get_experiment_by_name(run.params.project.experiment)
    if experiment is None:
        return client, None
    found = client.search_runs([experiment.experiment_id], filter_string=f"tags.`dvc.exp_name` = '{run.name}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    return client, (found[0] if found else None)


def label_child(run: PlannedRun, root: Path) -> str | None:
    client, child = mlflow_child(run, root)
    if child is None:
        return None
    client.set_tag(child.info.run_id, "mlflow.runName", f"{run.variant.label} (seed {run.seed})")
    for k, v in {EXP_TAG: run.experiment.name, "llm.variant": run.variant.label, "llm.seed": str(run.seed)}.items():
        client.set_tag(child.info.run_id, k, v)
    return child.info.run_id


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


def collect_finished(run: PlannedRun, ws: Path, rev: str, root: Path) -> dict:
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
    return _result(run, "finished", train, val, metrics, None, rev, root)


def collect_failed(run: PlannedRun, ws: Path, env: dict, root: Path) -> dict:
    """A run without an experiment commit: diverged (a result), or failed (an error to show)."""
    logs = sh([dvc_bin(), "queue", "logs", run.name], ws, env, check=False)
    text = logs.stdout + logs.stderr
    match = DIVERGED.search(text)
    client, child = mlflow_child(run, root)
    train, val = [], []
    if child is not None:
        train = [(m.step, m.value) for m in client.get_metric_history(child.info.run_id, "loss")]
        val = [(m.step, m.value) for m in client.get_metric_history(child.info.run_id, "val_loss")]
    if match is None:
        tail = "\n".join(line for line in text.splitlines() if "error" in line.lower())[-1500:] or text[-1500:]
        return _result(run, "failed", train, val, {}, None, None, root, error=tail)
    finite = [v for _, v in sorted(train) if math.isfinite(v)]
    diverged = {"step": int(match.group(1)), "what": match.group(2), "value": match.group(3).rstrip("."),
                "last_loss": finite[-1] if finite else None}
    return _result(run, "diverged", train, val, {}, diverged, None, root)


def _result(run: PlannedRun, status: str, train, val, metrics: dict, diverged, rev, root: Path, error: str = "") -> dict:
    finite_train = [(s, v) for s, v in train if math.isfinite(v)]
    diagnosis = diagnose(finite_train, [(s, v) for s, v in val if math.isfinite(v)]) if finite_train else None
    result = {"experiment": run.experiment.name, "variant": run.variant.key, "label": run.variant.label,
              "seed": run.seed, "key": run.key, "status": status, "exp_name": run.name, "exp_rev": rev,
              "overrides": run.overrides, "metrics": metrics, "diverged": diverged, "error": error,
              "train": [list(p) for p in train], "val": [list(p) for p in val],
              "diagnosis": [vars(f) for f in diagnosis.findings] if diagnosis else [],
              "mlflow_run_id": label_child(run, root)}
    run.folder.mkdir(parents=True, exist_ok=True)
    write_json(run.folder / "result.json", result)
    return result


# --- running ------------------------------------------------------------------------------------------

def queue_runs(runs: list[PlannedRun], ws: Path, env: dict) -> None:
    for run in runs:
        sets = []
        for key, value in run.overrides.items():
            sets += ["-S", f"++{key}={_yaml(value)}"]   # ++: set, whether params.yaml has the key or not
        sh([dvc_bin(), "exp", "run", "--queue", "--name", run.name, *sets, run.experiment.stage], ws, env)


def _yaml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


QUEUE_POLL_S = 5.0
QUEUE_RESTARTS = 3


def queue_state(ws: Path, env: dict) -> tuple[int, int]:
    """(runs queued or running, workers alive) as `dvc queue status` reports them."""
    text = sh([dvc_bin(), "queue", "status"], ws, env, check=False).stdout
    pending = sum(1 for line in text.splitlines() if re.search(r"\s(Queued|Running)\s*$", line))
    workers = re.search(r"Worker status: (\d+) active, (\d+) idle", text)
    return pending, (int(workers.group(1)) + int(workers.group(2))) if workers else 0


def work_through_queue(ws: Path, env: dict, log) -> None:
    """One worker runs the queued experiments in turn. If it stops while runs are left (a stale
    stop message in DVC's file broker ends a worker after one run), another is started: waiting
    on `dvc exp run --run-all` would then wait forever."""
    sh([dvc_bin(), "queue", "start", "--jobs", "1"], ws, env)
    restarts, idle_polls = 0, 0
    while True:
        time.sleep(QUEUE_POLL_S)
        pending, workers = queue_state(ws, env)
        if not pending:
            return
        idle_polls = idle_polls + 1 if not workers else 0
        if idle_polls < 2:   # a worker just started may not show yet
            continue
        restarts += 1
        if restarts > QUEUE_RESTARTS:
            raise ExperimentError(f"DVC's queue worker in {ws} stopped {restarts} times with {pending} runs "
                                  "left; see `dvc queue status` and `dvc queue logs NAME` there")
        log(f"the queue's worker stopped with {pending} runs left: starting another")
        sh([dvc_bin(), "queue", "start", "--jobs", "1"], ws, env)
        idle_polls = 0


def run_experiment(experiment: Experiment, runs: list[PlannedRun], root: Path, ws: Path | None,
                   env: dict, log, command: str) -> dict:
    started = time.time()
    results, todo = [], []
    for run in runs:
        kept = finished(run)
        if kept is not None:
            results.append(kept)
        else:
            todo.append(run)
    log(f"{experiment.name}: {len(runs)} runs, {len(runs) - len(todo)} kept from earlier, {len(todo)} to run")
    if todo:
        assert ws is not None
        parent_id, pipeline_id = mlflow_parent(runs[0].params, experiment, root)
        env = {**env, "LLM_PIPELINE_RUN_ID": pipeline_id}
        # a runner killed half-way may have left queue workers and entries behind: start clean (a
        # stop with no worker to receive it would linger in DVC's file broker and end the next one)
        if queue_state(ws, env)[1]:
            sh([dvc_bin(), "queue", "stop", "--kill"], ws, env, check=False)
        sh([dvc_bin(), "queue", "remove", "--queued", "--failed"], ws, env, check=False)
        queued = []
        for run in todo:
            rev = exp_ref(ws, run.name)   # finished before a kill, not yet collected
            if rev is None:
                queue_runs([run], ws, env)
                queued.append(run)
        if queued:
            log_file = OUT / experiment.name / "dvc-exp-run.log"
            log_file.parent.mkdir(parents=True, exist_ok=True)
            log(f"{experiment.name}: dvc queue start ({len(queued)} queued; output in {log_file})")
            work_through_queue(ws, env, log)
            with open(log_file, "a") as output:
                for run in queued:
                    output.write(sh([dvc_bin(), "queue", "logs", run.name], ws, env, check=False).stdout)
        for run in todo:
            rev = exp_ref(ws, run.name)
            result = collect_finished(run, ws, rev, root) if rev else collect_failed(run, ws, env, root)
            results.append(result)
            shown = {k: v for k, v in result["metrics"].items() if k in ("val_loss", "test_accuracy")}
            log(f"  {run.variant.label} seed {run.seed}: {result['status']}"
                + "".join(f" {k} {v:.3f}" for k, v in shown.items()))
        # `dvc exp show` in the repository lists them: push the experiment refs back.
        sh(["git", "push", "--quiet", "--force", str(root), "refs/exps/*:refs/exps/*"], ws, check=False)
    failed = [r for r in results if r["status"] == "failed"]
    entry = write_report(OUT / experiment.name, experiment, [r for r in results if r["status"] != "failed"],
                         command=command, wall_s=time.time() - started)
    entry["failed"] = [f"{r['label']} seed {r['seed']}: {r['error']}" for r in failed]
    write_json(OUT / experiment.name / "summary.json", entry)
    return entry


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
    parent_id, _ = mlflow_parent(params, measurement, root)
    from mlflow.tracking import MlflowClient

    from flows.environment import mlflow_tracking_uri
    client = MlflowClient(mlflow_tracking_uri(root))
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
    entries = []
    for experiment in chosen:
        if isinstance(experiment, Measurement):
            entries.append(run_measurement(experiment, raw, root, env, logger.info, command))
        else:
            mine = [r for r in runs if r.experiment is experiment]
            entries.append(run_experiment(experiment, mine, root, ws, env, logger.info, command))
        logger.info(f"{experiment.name}: {entries[-1]['finding']}")
    # the index covers every experiment with a report, not only this invocation's
    index = []
    for name in catalogue.experiments:
        summary = OUT / name / "summary.json"
        if summary.exists():
            index.append(read_json(summary))
    write_index(OUT, index)
    return entries


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
        total = 0.0
        for experiment in chosen:
            seconds = estimate_seconds([r for r in runs if r.experiment is experiment], experiment)
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
