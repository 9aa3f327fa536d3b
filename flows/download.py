"""Download stage: fetch every source in params.yaml, verify its sha256, write normalised records.

Output: data/download/sources/<name>/documents.jsonl (or files/ for assets) and manifest.json,
plus data/download/metrics.json. The whole sources folder appears at once or not at all.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.logging import get_run_logger

from flows._stage import SOURCES, StageError, as_params, main, stage_run
from flows.params import Params
from llm import sources
from llm.files import atomic_dir, write_json


def _transient(task, task_run, state) -> bool:
    """Retry network hiccups, never a wrong checksum or a missing file."""
    try:
        state.result()
    except sources.SourceError:
        return False
    except Exception:
        return True
    return False


@task(retry_condition_fn=_transient, retry_delay_seconds=2)
def fetch(source: sources.Source, cache_dir: str, timeout_s: float) -> Path | None:
    if sources.scheme_of(source) == "hf":
        return None  # datasets fetches and caches by itself
    return sources.fetch(source, cache_dir, timeout_s)


@task
def materialise(source: sources.Source, path: Path | None, out_dir: Path) -> dict:
    manifest = sources.materialise(source, path, out_dir)
    write_json(out_dir / "manifest.json", manifest)
    return manifest


@flow(name="download", log_prints=True, validate_parameters=False)
def download_flow(params: Params) -> dict:
    params = as_params(params)
    p = params.download
    log = get_run_logger()
    with stage_run("download", params) as stage:
        manifests = []
        try:
            with atomic_dir(SOURCES) as tmp:
                for source in (entry.build() for entry in p.sources):
                    path = fetch.with_options(retries=p.retries)(source, p.cache_dir, p.timeout_s)
                    manifest = materialise(source, path, tmp / source.name)
                    log.info(f"{source.name}: {manifest['documents']} records, {manifest['characters']:,} characters"
                             f" ({manifest['skipped']} skipped)")
                    manifests.append(manifest)
        except sources.SourceError as err:
            raise StageError(str(err)) from err
        for manifest in manifests:
            stage.log_artifact(SOURCES / manifest["name"] / "manifest.json", f"manifests/{manifest['name']}")
        metrics = {
            "sources": len(manifests),
            "documents": sum(m["documents"] for m in manifests),
            "characters": sum(m["characters"] for m in manifests),
            "per_source": {m["name"]: {k: m[k] for k in ("documents", "skipped", "characters", "bytes")}
                           for m in manifests},
        }
        rows = "\n".join(f"| {m['name']} | {m['role']} | {m['documents']:,} | {m['characters']:,} | "
                         f"`{(m['sha256'] or '')[:12]}` |" for m in manifests)
        summary = ("| source | role | records | characters | sha256 |\n|---|---|---|---|---|\n" + rows)
        return stage.finish(metrics, summary)


if __name__ == "__main__":
    main(download_flow, "download")
