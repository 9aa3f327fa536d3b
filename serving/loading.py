"""Where a served model comes from: a model folder, or an MLflow registry URI that names one.

A model folder is what the training stages write and log to MLflow:

    DIR/model.safetensors     the weights   (llm.model.save_checkpoint)
    DIR/config.json           the architecture
    DIR/tokenizer/            the tokenizer  (llm.tokenizer.Tokenizer.save)

`--model models:/NAME@ALIAS` (or `models:/NAME/VERSION`) is resolved with
`mlflow.artifacts.download_artifacts`: the registered version's source is the logged folder,
so a local store gives its path directly and a remote one is downloaded to a temporary folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from llm.model import CONFIG_FILE, GPT, WEIGHTS_FILE, ModelConfig, load_checkpoint, save_checkpoint
from llm.tokenizer import META_FILE, Tokenizer, load_tokenizer

DEFAULT_MODEL = "data/instruct/model"   # the instruct stage's output
TOKENIZER_DIR = "tokenizer"
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
    import mlflow  # imported here: ~4 s, and only registry URIs need it
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
    needed = [folder / WEIGHTS_FILE, folder / CONFIG_FILE, folder / TOKENIZER_DIR / META_FILE]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        hint = (" Train the pipeline first (`make run`), or point --model at another model folder."
                if source == DEFAULT_MODEL else "")
        raise ModelNotFound(f"{source} is not a model folder: missing {', '.join(missing)}. A model folder "
                            f"holds {WEIGHTS_FILE}, {CONFIG_FILE} and {TOKENIZER_DIR}/ (a saved tokenizer).{hint}")


def read_config(folder: Path) -> ModelConfig:
    """The architecture alone, without loading weights (the HTTP process needs only this)."""
    return ModelConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))


def load_tokenizer_of(folder: Path) -> Tokenizer:
    return load_tokenizer(folder / TOKENIZER_DIR)


def load_model_dir(folder: Path, device: str = "cpu") -> tuple[GPT, Tokenizer]:
    """Weights (in eval mode) and tokenizer of a model folder, checked against each other."""
    model = load_checkpoint(folder, map_location=device).eval()
    tokenizer = load_tokenizer_of(folder)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ModelNotFound(f"{folder}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                            f"{model.config.vocab_size} embeddings; they do not belong together")
    return model, tokenizer


def save_model_dir(model: GPT, tokenizer: Tokenizer, folder: str | Path) -> Path:
    """Write a model folder in the layout above (what the stages log, and what tests serve)."""
    folder = Path(folder)
    save_checkpoint(model, folder)
    tokenizer.save(folder / TOKENIZER_DIR)
    return folder


def default_name(source: str, folder: Path) -> str:
    """The id clients pass as `model`: NAME@ALIAS for a registry URI, else the folder's name
    (its parent's for the stages' generic `.../model`)."""
    if is_registry_uri(source):
        return source[len(REGISTRY_PREFIX):].strip("/")
    folder = folder.resolve()
    return folder.parent.name if folder.name == "model" and folder.parent.name else folder.name
