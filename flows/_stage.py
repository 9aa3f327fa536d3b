"""What every stage shares: params, the MLflow run, the Prefect artifact, outputs, the CLI.

A stage module defines a Prefect `@flow` taking the validated `Params`, and ends with

    if __name__ == "__main__":
        main(download_flow, "download")

Inside the flow, `with stage_run("download", params) as stage:` opens an MLflow run nested
under one parent run per pipeline run, tagged with the stage, the git commit and the pipeline-run
id; `stage.finish(metrics, summary)` writes data/<stage>/metrics.json (DVC metrics), logs the
metrics and publishes a Prefect markdown artifact that links back to the MLflow run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import mlflow
from mlflow.tracking import MlflowClient
from prefect import tags
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context

from flows.environment import mlflow_tracking_uri, mlflow_ui_url
from flows.params import ConfigError, Params, load_params
from flows.remote import RemoteRunFailed, run_on_pool
from flows.run_id import PIPELINE_RUN_ENV, pipeline_run_id
from llm.files import write_json

PIPELINE_TAG = "llm.pipeline_run_id"
STAGE_TAG = "llm.stage"


# --- where stages write (the outs of dvc.yaml), named once --------------------------------------

DATA = Path("data")


def stage_dir(name: str) -> Path:
    """data/<stage>: a stage's outputs, its metrics.json among them."""
    return DATA / name


SOURCES = stage_dir("download") / "sources"          # one folder per source: documents.jsonl or files/
TOKENIZER = stage_dir("tokenizer") / "model"         # the project's tokenizer (llm.tokenizer)
TOKENS = stage_dir("pack") / "tokens"                # train/val token arrays and meta (llm.data)
BASE_MODEL = stage_dir("pretrain") / "model"         # model folders (llm.checkpoint.save_model_dir)
CLASSIFIER_MODEL = stage_dir("classify") / "model"   # (llm.classify.Classifier.save)
INSTRUCT_MODEL = stage_dir("instruct") / "model"
RESPONSES = stage_dir("instruct") / "responses.jsonl"  # test instructions answered by base and tuned model


# --- provenance ---------------------------------------------------------------------------------

def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


# --- MLflow ---------------------------------------------------------------------------------------

def _experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # Artifacts next to the database, whatever directory a stage happens to run in.
    artifacts = (Path.cwd() / "mlruns").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifacts)


def _parent_run_id(client: MlflowClient, experiment_id: str, run_id: str) -> str:
    """The run that groups one pipeline run's stages in the MLflow UI (created by the first stage)."""
    found = client.search_runs([experiment_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{run_id}' "
                               f"and tags.`{STAGE_TAG}` = 'pipeline'", max_results=1)
    if found:
        return found[0].info.run_id
    parent = client.create_run(experiment_id, run_name=f"pipeline {run_id}",
                               tags={PIPELINE_TAG: run_id, STAGE_TAG: "pipeline"})
    client.set_terminated(parent.info.run_id, "FINISHED")
    return parent.info.run_id


class Stage:
    """Handle passed to a stage's code: where to write, and how to log."""

    def __init__(self, name: str, params: Params, run: mlflow.ActiveRun, pipeline_id: str,
                 out_dir: Path | None = None):
        self.name = name
        self.params = params
        self.run = run
        self.pipeline_id = pipeline_id
        self.out_dir = stage_dir(name) if out_dir is None else Path(out_dir)
        if out_dir is None:  # a folder the user named appears only when the stage writes it whole
            self.out_dir.mkdir(parents=True, exist_ok=True)

    @property
    def mlflow_url(self) -> str:
        return f"{mlflow_ui_url()}/#/experiments/{self.run.info.experiment_id}/runs/{self.run.info.run_id}"

    def log_metrics(self, metrics: dict, step: int | None = None, prefix: str = "") -> None:
        """Log the numbers among `metrics` (callbacks hand over whatever they have), names
        prefixed with `prefix.` when given."""
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        mlflow.log_metrics({metric_name(f"{prefix}.{k}" if prefix else k): float(v) for k, v in numbers.items()},
                           step=step)

    def log_params(self, values: dict, prefix: str) -> None:
        """Log facts about the run that are not knobs (the machine it ran on) as `prefix.key` params."""
        mlflow.log_params(flatten(values, prefix))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file, or a folder's files (under artifact_path)."""
        (mlflow.log_artifacts if Path(path).is_dir() else mlflow.log_artifact)(str(path), artifact_path)

    def log_model(self, folder: str | Path, registered_name: str | None) -> str | None:
        """Log a model folder (weights, config, tokenizer/) as artifacts and register it.

        Registered as a new version of `registered_name`; `models:/NAME@latest` resolves to
        the newest version (MLflow reserves that alias). Weights are safetensors, loaded by our
        own code: nothing is pickled into the registry. Returns the version, if registered.
        """
        mlflow.log_artifacts(str(folder), "model")
        if registered_name is None:
            return None
        client = MlflowClient()
        if not client.search_registered_models(f"name = '{registered_name}'"):
            client.create_registered_model(registered_name, description="Trained by the llm-from-scratch pipeline")
        version = client.create_model_version(registered_name, source=mlflow.get_artifact_uri("model"),
                                              run_id=self.run.info.run_id,
                                              tags={PIPELINE_TAG: self.pipeline_id, STAGE_TAG: self.name})
        return version.version

    def finish(self, metrics: dict[str, Any], summary: str) -> dict[str, Any]:
        """Write metrics.json, log its numbers to MLflow, publish the Prefect artifact."""
        write_json(self.out_dir / "metrics.json", metrics)
        numbers = {k: v for k, v in flatten(metrics, lists=False).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.log_metrics(numbers)
        markdown = (f"# {self.name}\n\n{summary}\n\nMLflow run: [{self.run.info.run_id}]({self.mlflow_url})  \n"
                    f"Pipeline run: `{self.pipeline_id}`\n")
        create_markdown_artifact(markdown, key=f"{self.name}-summary", description=f"{self.name} stage summary")
        return metrics


def metric_name(key: str) -> str:
    """MLflow allows only letters, digits and _-. :/ in metric names."""
    return re.sub(r"[^\w\-. :/]", "_", key)


def flatten(data: dict, prefix: str = "", *, lists: bool = True) -> dict[str, Any]:
    """Dotted key -> leaf value, for logging nested params or metrics to MLflow:
    {"a": {"b": 1, "c": [2, 3]}} -> {"a.b": 1, "a.c.0": 2, "a.c.1": 3}; with lists=False a list
    stays one value ({"a.b": 1, "a.c": [2, 3]})."""
    flat: dict[str, Any] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif lists and isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{key}.{i}")
        else:
            flat[key] = value

    walk(data, prefix)
    return flat


@contextlib.contextmanager
def stage_run(name: str, params: Params, system_metrics: bool = False, out_dir: Path | None = None) -> Iterator[Stage]:
    """An MLflow run for one stage, nested under its pipeline run; marks it failed on error.
    out_dir: where metrics.json goes, when not data/<stage> (an export to a folder of the user's)."""
    mlflow.set_tracking_uri(mlflow_tracking_uri())
    client = MlflowClient()
    experiment_id = _experiment_id(client, params.project.experiment)
    pipeline_id = pipeline_run_id()
    run_tags = {STAGE_TAG: name, PIPELINE_TAG: pipeline_id, "mlflow.source.git.commit": git_commit()}
    if os.environ.get("DVC_EXP_NAME"):  # run by `dvc exp run` (flows/experiments.py finds its runs by it)
        run_tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    with contextlib.suppress(Exception):  # outside a flow run (a unit test), there is no id to record
        run_tags["prefect.flow_run_id"] = str(get_run_context().flow_run.id)
    parent = _parent_run_id(client, experiment_id, pipeline_id)
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, parent_run_id=parent, nested=True,
                          tags=run_tags, log_system_metrics=system_metrics) as run:
        mlflow.log_params({**flatten(params.project.model_dump(mode="json"), "project"), **_section_params(params, name)})
        yield Stage(name, params, run, pipeline_id, out_dir)


def _section_params(params: Params, name: str) -> dict[str, Any]:
    section = getattr(params, name, None)
    if section is None:
        return {}
    flat = flatten(section.model_dump(mode="json"), name)
    # MLflow caps a param value at 6000 characters; long lists are better read in params.yaml.
    return {k: (str(v)[:500] if v is not None else "") for k, v in flat.items()}


# --- the command line of every stage --------------------------------------------------------

def main(flow: Callable[[Params], Any], name: str, argv: list[str] | None = None, *,
         options: dict[str, dict] | None = None) -> None:
    """`python -m flows.<stage>`: validate params first, then run the flow with pipeline tags.
    options: the stage's own command-line options ({flag: add_argument keywords, with dest}),
    passed to the flow as keyword arguments of those names."""
    parser = argparse.ArgumentParser(
        prog=f"python -m flows.{name}",
        description=f"Run the {name!r} stage as a Prefect flow that logs to MLflow. Normally run by "
                    f"`dvc repro {name}`; reads its knobs from the `{name}` section of params.yaml.")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    for flag, spec in (options or {}).items():
        parser.add_argument(flag, **spec)
    args = parser.parse_args(argv)
    flow_options = {spec["dest"]: getattr(args, spec["dest"]) for spec in (options or {}).values()}
    try:
        params = load_params(args.params)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    run_stage(flow, name, params, **flow_options)


def run_stage(flow: Callable[[Params], Any], name: str, params: Params, **flow_options: Any) -> None:
    """Run a stage's flow with validated params: here, or on the work pool (execution.mode).
    flow_options: the stage's own options, as keyword arguments of the flow."""
    os.environ[PIPELINE_RUN_ENV] = pipeline_id = pipeline_run_id()  # one id for the flow and the MLflow run
    execution = params.execution
    try:
        if execution.mode == "pool" and name in execution.stages:
            # Pretraining on several hosts runs once on each (flows/remote.py).
            nodes = params.pretrain.nodes if name == "pretrain" else 1
            run_on_pool(name, params.model_dump(mode="json"), execution.pickup_timeout_s, execution.timeout_s,
                        nodes=nodes)
        else:
            with tags(f"stage:{name}", f"pipeline:{pipeline_id}"):
                flow(params, **flow_options)
    except (StageError, RemoteRunFailed) as err:
        sys.exit(f"error: {name} stage failed: {err}")


def as_params(params: Params | dict) -> Params:
    """A flow's params: the object itself locally, or the JSON of it in a deployment run."""
    return params if isinstance(params, Params) else Params.model_validate_json(json.dumps(params))


class StageError(RuntimeError):
    """A failure the user can fix (bad data, wrong checksum); printed without a traceback."""
