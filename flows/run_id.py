"""The id shared by every stage of one pipeline run (imports nothing heavy: used before Prefect loads)."""

from __future__ import annotations

import os
import time
import uuid

import psutil

PIPELINE_RUN_ENV = "LLM_PIPELINE_RUN_ID"


def pipeline_run_id() -> str:
    """One id shared by every stage of one `dvc repro`.

    `make run` sets LLM_PIPELINE_RUN_ID. A plain `dvc repro` sets nothing, so the id is taken
    from the `dvc` process that started this stage (its pid and start time), which every stage
    of the same repro shares. A stage run by hand gets an id of its own.
    """
    if os.environ.get(PIPELINE_RUN_ENV):
        return os.environ[PIPELINE_RUN_ENV]
    for process in psutil.Process().parents():
        try:
            command = " ".join(process.cmdline()[:3])
            if "dvc" in command and ("repro" in command or "exp" in command):
                started = time.strftime("%Y%m%d-%H%M%S", time.localtime(process.create_time()))
                return f"{started}-dvc{process.pid}"
        except psutil.Error:
            continue
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
