"""The environment every stage, server and test of this project runs in, set in this one place.

Each value is a default: a variable already set by the user wins. Unset HF_HUB_OFFLINE and
HF_DATASETS_OFFLINE (or set them to 0) to let `hf:` sources reach the Hugging Face hub.
"""

from __future__ import annotations

import os
from pathlib import Path

QUIET_AND_OFFLINE = {
    # no phone-home: these otherwise hang or warn on a machine without internet
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GIT_PYTHON_REFRESH": "quiet",
    # a cold ephemeral Prefect API (database migrations) can take longer than the default 20 s to start
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}


def apply_defaults(root: Path | None = None) -> None:
    """Set the quiet/offline defaults and keep Prefect's database inside the repository."""
    root = Path(root or os.getcwd()).resolve()
    for key, value in QUIET_AND_OFFLINE.items():
        os.environ.setdefault(key, value)
    # Runs of `dvc repro` (ephemeral API) and of `make ui` (server) then share one database,
    # so the UI shows every stage run after the fact.
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))


def mlflow_tracking_uri(root: Path | None = None) -> str:
    """MLFLOW_TRACKING_URI, else a SQLite file in the repository (absolute: stages run anywhere)."""
    root = Path(root or os.getcwd()).resolve()
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def mlflow_ui_url() -> str:
    return os.environ.get("MLFLOW_UI_URL", "http://127.0.0.1:5000").rstrip("/")


def prefect_ui_url() -> str:
    return os.environ.get("PREFECT_UI_URL", "http://127.0.0.1:4200").rstrip("/")
