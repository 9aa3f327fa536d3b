"""Where a served model comes from: a model folder, or an MLflow registry URI that names one.

A model folder is what the training stages write and log to MLflow, read and written by
llm.checkpoint (load_model_dir, save_model_dir):

    DIR/model.safetensors     the weights
    DIR/config.json           the architecture
    DIR/tokenizer/            the tokenizer

`--model models:/NAME@ALIAS` (or `models:/NAME/VERSION`) is resolved with
`mlflow.artifacts.download_artifacts`: the registered version's source is the logged folder,
so a local store gives its path directly and a remote one is downloaded to a temporary folder.

A model folder written by the pretrain or instruct stage also holds `snapshots/` (llm.snapshots): the
weights and probe records at several training steps. The server serves each of them: their
steps are listed by /v1/models and /v1/snapshots, and /v1/introspect takes a `step`.
"""

from __future__ import annotations

import os
from pathlib import Path

from llm import checkpoint
from llm.checkpoint import (  # noqa: F401 (read_config: served from here too)
    CONFIG_FILE,
    TOKENIZER_DIR,
    WEIGHTS_FILE,
    read_config,
)
from llm.model import GPT
from llm.snapshots import SNAPSHOTS_DIR, list_steps
from llm.tokenizer import Tokenizer, load_tokenizer

DEFAULT_MODEL = "data/instruct/model"   # the instruct stage's output (flows/_stage.py INSTRUCT_MODEL)
REGISTRY_PREFIX = "models:/"


class ModelNotFound(ValueError):
    """--model names nothing servable; the message says what is missing and what is expected."""


def is_registry_uri(source: str) -> bool:
    return source.startswith(REGISTRY_PREFIX)


def tracking_uri(explicit: str | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the project's mlflow.db in this folder
    (the same default as the pipeline's stages, as an absolute path)."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def resolve_model(source: str, tracking: str | None = None) -> Path:
    """The local model folder that `source` (a folder or a models:/ URI) names, checked."""
    folder = _download(source, tracking_uri(tracking)) if is_registry_uri(source) else Path(source)
    check_model_dir(folder, source)
    return folder


def _download(uri: str, tracking: str) -> Path:
    database = tracking.removeprefix("sqlite:///") if tracking.startswith("sqlite:///") else None
    if database is not None and not Path(database).is_file():  # MLflow would create an empty one
        raise ModelNotFound(f"{uri}: there is no MLflow database at {database}. Run the pipeline first, "
                            "or pass --tracking-uri / set MLFLOW_TRACKING_URI.")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow  # imported here: it is slow to import, and only registry URIs need it
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(tracking)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except MlflowException as error:
        raise ModelNotFound(f"{uri}: not found in the MLflow registry at {tracking} ({error.message}). "
                            "Check the name and alias (`models:/NAME@ALIAS` or `models:/NAME/VERSION`), "
                            "or pass --tracking-uri / set MLFLOW_TRACKING_URI.") from None


def check_model_dir(folder: Path, source: str | None = None) -> None:
    source = source or str(folder)
    missing = [str(p) for p in checkpoint.missing_model_files(folder)]
    if missing:
        hint = (" Train the pipeline first (`make run`), or point --model at another model folder."
                if source == DEFAULT_MODEL else "")
        raise ModelNotFound(f"{source} is not a model folder: missing {', '.join(missing)}. A model folder "
                            f"holds {WEIGHTS_FILE}, {CONFIG_FILE} and {TOKENIZER_DIR}/ (a saved tokenizer).{hint}")


def load_tokenizer_of(folder: Path) -> Tokenizer:
    return load_tokenizer(folder / TOKENIZER_DIR)


def load_model_dir(folder: Path, device: str = "cpu") -> tuple[GPT, Tokenizer]:
    """Weights (in eval mode) and tokenizer of a model folder (llm.checkpoint.load_model_dir); a
    tokenizer that does not belong to the weights is a ModelNotFound."""
    try:
        model, tokenizer = checkpoint.load_model_dir(folder, device)
    except checkpoint.CheckpointMismatch as err:
        raise ModelNotFound(str(err)) from None
    return model.eval(), tokenizer


def default_name(source: str, folder: Path) -> str:
    """The id clients pass as `model`: NAME@ALIAS for a registry URI, else the folder's name
    (its parent's for the stages' generic `.../model`)."""
    if is_registry_uri(source):
        return source[len(REGISTRY_PREFIX):].strip("/")
    folder = folder.resolve()
    return folder.parent.name if folder.name == "model" and folder.parent.name else folder.name


def snapshots_dir(folder: Path) -> Path:
    return Path(folder) / SNAPSHOTS_DIR


def snapshot_steps(folder: Path) -> list[int]:
    """The training steps the model folder kept snapshots of (none for most models)."""
    return list_steps(snapshots_dir(folder))


def step_problem(step: int | None, steps: list[int], model_name: str) -> str | None:
    """Why snapshot `step` (None: any snapshot) cannot be served, as a message for a 404; None if it can."""
    if not steps:
        return (f"'{model_name}' has no training snapshots: serve a model folder the pretrain or instruct stage "
                "wrote with <stage>.snapshots.keep > 0 (data/pretrain/model, data/instruct/model)")
    if step is None or step in steps:
        return None
    return (f"step {step} is not a snapshot of '{model_name}'; its snapshots are at steps "
            f"{', '.join(map(str, steps))}")
