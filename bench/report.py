"""What every benchmark's JSON says about where and when it ran, and how it is saved.

A number read without its device, date, commit and command is not comparable with anything, so
the GPU benchmarks put these next to their figures and save the JSON under bench/results/.
"""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} torch threads)"
        except OSError:
            pass
        return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} torch threads)"
    return device.type


def git_commit() -> str | None:
    """The short commit, with '-dirty' when tracked files differ from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None


def context(bench: str, device: torch.device, script: str, argv: list[str] | None) -> dict:
    """The report's opening fields: bench, date, device, versions, commit and the command."""
    args = sys.argv[1:] if argv is None else argv
    return {
        "bench": bench,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "git_commit": git_commit(),
        "command": " ".join([Path(sys.executable).name, script, *args]),
    }


def emit(report: dict, out: str | None) -> None:
    """Print the report as one JSON line; with out, also save it (indented) there."""
    print(json.dumps(report))
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
