"""Export stage: take a trained model anywhere. A Hugging Face folder (weights, config, tokenizer,
chat template, model card) that transformers' AutoModelForCausalLM, AutoTokenizer and pipeline()
load offline, and GGUF files (tokenizer and chat template inside) for llama.cpp, Ollama, LM Studio.

    dvc repro export                      # the instruct model, both formats, into data/export/
    python -m flows.export --model data/pretrain/model --format gguf --out /tmp/tinyllm-base
    python -m flows.export --model models:/tinyllm-instruct@latest --format hf --out /tmp/tinyllm

Output folder: hf/, gguf/<name>-<type>.gguf, metrics.json. The model, its tokenizer and every
format asked for are checked before anything is written (a model a format cannot express stops
with the field to change and the formats that would work), and the folder is written under a
temporary name and renamed into place: it appears whole or not at all.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from prefect import flow
from prefect.logging import get_run_logger

from flows._stage import StageError, as_params, flatten, run_stage, stage_run
from flows.environment import mlflow_tracking_uri
from flows.params import ConfigError, Params, load_params, with_changes
from llm import checkpoint
from llm.chat import encode_prompt
from llm.files import atomic_dir, read_json
from llm.generate import generate
from llm.gguf import GGUF_TYPES, export_gguf, greedy_tokens
from llm.hf import check_exportable, export_hf, logit_difference, model_card, push_to_hub
from llm.model import GPT
from llm.tokenizer import Tokenizer

FORMATS = {"hf": "Hugging Face", "gguf": "GGUF"}  # --format: the target each names
REGISTRY_PREFIX = "models:/"
# What a previous export left in an output folder; anything else there is not ours to replace.
OUR_FILES = {"hf", "gguf", "metrics.json"}


# --- what to export ------------------------------------------------------------------------------

def resolve(source: str) -> Path:
    """The local model folder that `source` names: a folder, or a registered MLflow model."""
    if not source.startswith(REGISTRY_PREFIX):
        return Path(source)
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(mlflow_tracking_uri())
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=source))
    except MlflowException as err:
        raise StageError(f"export.model {source!r}: not found in the MLflow registry at {mlflow_tracking_uri()} "
                         f"({err.message}); use models:/NAME@ALIAS or models:/NAME/VERSION") from None


def load(source: str) -> tuple[GPT, Tokenizer]:
    folder = resolve(source)
    missing = checkpoint.missing_model_files(folder)
    if missing:
        what = "tokenizer" if missing == [folder / checkpoint.TOKENIZER_DIR / "tokenizer.json"] else "model folder"
        raise StageError(f"export.model {source!r} is not a complete {what}: missing "
                         f"{', '.join(str(p) for p in missing)}. Formats that would work: none (hf and gguf both "
                         "carry the tokenizer); point --model at a folder a stage wrote (data/pretrain/model, "
                         "data/instruct/model) or a registered model (models:/NAME@ALIAS).")
    try:
        model, tokenizer = checkpoint.load_model_dir(folder)
    except checkpoint.CheckpointMismatch as err:
        raise StageError(f"export.model: {err}") from None
    return model.eval(), tokenizer


def check_formats(model: GPT, tokenizer: Tokenizer, formats: list[str]) -> None:
    """Stop before writing anything if a format asked for cannot express this model or tokenizer,
    saying why (the field) and which formats would work."""
    problems = {}
    for name, target in FORMATS.items():
        try:
            check_exportable(model.config, tokenizer, target)
        except ValueError as err:
            problems[name] = str(err)
    refused = [name for name in formats if name in problems]
    if refused:
        working = [name for name in FORMATS if name not in problems]
        alternative = (f"Formats that would work: {', '.join(working)} (--format {working[0]})." if working else
                       "No export format can express it (hf and gguf hold the GPT-2 and LLaMA families); "
                       "serve the model folder itself with `python -m serving --model FOLDER`.")
        raise StageError("; ".join(f"cannot export to {name}: {problems[name]}" for name in refused) + ". "
                         + alternative)


def default_name(source: str, params: Params) -> str:
    """tinyllm-instruct for data/instruct/model, NAME for models:/NAME@ALIAS, else the folder's name."""
    if source.startswith(REGISTRY_PREFIX):
        return source[len(REGISTRY_PREFIX):].split("@")[0].split("/")[0]
    folder = Path(source)
    stage = folder.parent.name if folder.name == "model" else folder.name
    return f"{params.project.name}-{'base' if stage == 'pretrain' else stage}"


def check_out(out: Path) -> None:
    """The output folder is replaced whole: refuse one holding anything an export did not write."""
    if out.is_file() or (out.is_dir() and not {p.name for p in out.iterdir()} <= OUR_FILES):
        raise StageError(f"export.out {str(out)!r} exists and holds other files; an export replaces its folder "
                         "whole, so give a new or empty folder (--out)")


# --- where the model came from (the model card) --------------------------------------------------

def provenance(source: str, params: Params) -> dict:
    """data / params / metrics for the model card: a stage's folder has its metrics.json beside it
    and its params in params.yaml; a registered model has its MLflow run's."""
    if source.startswith(REGISTRY_PREFIX):
        return _registered_run(source)
    folder = Path(source)
    metrics_file = folder.parent / "metrics.json"
    metrics = _numbers(flatten(read_json(metrics_file))) if metrics_file.is_file() else {}
    stage = folder.parent.name
    if stage not in ("pretrain", "instruct"):  # a folder from elsewhere: params.yaml did not make it
        return {"metrics": metrics}
    sections = ["pretrain", "instruct"] if stage == "instruct" else ["pretrain"]
    data = [f"{s.name}: `{s.uri}` ({s.licence or 'licence not recorded'}), role {s.role}"
            for s in params.download.sources if s.role in sections]
    settings = {k: v for section in sections for k, v in flatten(getattr(params, section).model_dump(mode="json"),
                                                                     section).items() if v is not None}
    return {"data": data, "params": settings, "metrics": metrics}


def _registered_run(source: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_tracking_uri())
    name, _, alias = source[len(REGISTRY_PREFIX):].partition("@")
    try:
        version = (client.get_model_version_by_alias(name, alias) if alias else
                   client.get_model_version(*name.split("/", 1)))
        run = client.get_run(version.run_id)
    except Exception:  # a model logged outside a run: the card says less, the export still works
        return {}
    return {"params": dict(run.data.params), "metrics": _numbers(run.data.metrics),
            "data": [f"MLflow run {version.run_id} of {name}"]}


def _numbers(values: dict) -> dict:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


# --- the flow -------------------------------------------------------------------------------------

def write_exports(model: GPT, tokenizer: Tokenizer, folder: Path, formats: list[str], gguf_types: list[str],
                  name: str, card: str) -> list[Path]:
    written = []
    if "hf" in formats:
        export_hf(model, folder / "hf", tokenizer, card=card)
        written += sorted((folder / "hf").iterdir())
    if "gguf" in formats:
        (folder / "gguf").mkdir()
        for dtype in gguf_types:
            start = time.perf_counter()
            path = export_gguf(model, tokenizer, folder / "gguf" / f"{name}-{dtype}.gguf", dtype, name=name,
                               description=f"{name}: trained from scratch by the llm-from-scratch pipeline")
            print(f"gguf {dtype}: {path.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s")
            written.append(path)
    return written


CHECK_MESSAGES = [{"role": "user", "content": "Name a colour."}]


def check_exports(model: GPT, tokenizer: Tokenizer, folder: Path, written: list[Path], max_new_tokens: int = 16) -> dict:
    """Run what was written in the tools that load it, on a chat prompt: transformers' largest logit
    difference from ours, and how many of our greedy tokens llama.cpp repeats before it first differs
    (all of them at f32; fewer at lower precision where two tokens are nearly tied)."""
    prompt = encode_prompt(tokenizer, CHECK_MESSAGES)
    max_new_tokens = min(max_new_tokens, model.config.context_length - len(prompt))
    ours = generate(model, [prompt], max_new_tokens=max_new_tokens)[0].tokens
    checks: dict = {"greedy_tokens": len(ours)}
    if (folder / "hf").is_dir():
        checks["hf_max_logit_difference"] = logit_difference(folder / "hf", model, prompt + ours)
    for path in written:
        if path.suffix == ".gguf":
            theirs = greedy_tokens(path, prompt, len(ours))
            same = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), len(ours))
            checks[f"greedy_tokens_agreeing.{path.stem.rsplit('-', 1)[-1]}"] = same
    return checks


@flow(name="export", log_prints=True, validate_parameters=False)
def export_flow(params: Params) -> dict:
    params = as_params(params)
    p = params.export
    log = get_run_logger()
    model, tokenizer = load(p.model)
    check_formats(model, tokenizer, p.formats)
    out = Path(p.out)
    check_out(out)
    name = default_name(p.model, params)
    card_facts = provenance(p.model, params)

    with stage_run("export", params, out_dir=out) as stage:
        start = time.perf_counter()
        with atomic_dir(out) as tmp:
            written = write_exports(model, tokenizer, tmp, p.formats, p.gguf_types, name,
                                    model_card(model, tokenizer, name=name, **card_facts))
        seconds = time.perf_counter() - start
        checks = check_exports(model, tokenizer, out, [out / path.relative_to(tmp) for path in written])
        stage.log_artifact(out, "export")
        files = {str(path.relative_to(tmp)): (out / path.relative_to(tmp)).stat().st_size for path in written}
        pushed = ""
        if p.push:
            try:
                pushed = push_to_hub(out / "hf" if "hf" in p.formats else out, p.push,
                                     sorted((out / "gguf").glob("*.gguf")) if "gguf" in p.formats else [])
            except ValueError as err:
                raise StageError(str(err)) from err
        metrics = {"model": p.model, "name": name, "formats": p.formats, "seconds": round(seconds, 2),
                   "bytes": files, "checks": checks, "pushed_to": pushed}
        log.info(f"exported {name} ({', '.join(p.formats)}) to {out} in {seconds:.1f} s")
        summary = (f"Exported `{p.model}` as **{name}** to `{out}` in {seconds:.1f} s:\n\n"
                   + "\n".join(f"- `{path}`: {size / 1e6:.2f} MB" for path, size in files.items())
                   + "\n\nChecked in the tools that load them: "
                   + ", ".join(f"{key} {value:.2g}" if isinstance(value, float) else f"{key} {value}"
                               for key, value in checks.items())
                   + (f"\n\nPushed to {pushed}." if pushed else ""))
        return stage.finish(metrics, summary)


# --- the command line ---------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Without options it exports what the `export` section of params.yaml says (what `dvc repro "
               "export` runs). Chat with the result: see the README's 'Take your model anywhere'.")
    parser.add_argument("--model", help="a model folder (data/pretrain/model, data/instruct/model) or a registered "
                                        "model models:/NAME@ALIAS (default: export.model)")
    parser.add_argument("--format", choices=[*FORMATS, "all"],
                        help="hf: transformers folder with tokenizer; gguf: llama.cpp files; all: both "
                             "(default: export.formats)")
    parser.add_argument("--gguf-types", help=f"comma-separated, of {', '.join(GGUF_TYPES)} (default: export.gguf_types)")
    parser.add_argument("--out", help="output folder, replaced whole (default: export.out)")
    parser.add_argument("--push", metavar="REPO", help="also upload to this hub repository (OWNER/NAME); needs the "
                                                       "network (HF_HUB_OFFLINE=0) and a login. Off by default")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    changes = {key: value for key, value in {
        "model": args.model, "out": args.out, "push": args.push,
        "formats": None if args.format is None else list(FORMATS) if args.format == "all" else [args.format],
        "gguf_types": args.gguf_types.split(",") if args.gguf_types else None}.items() if value is not None}
    try:
        params = with_changes(load_params(args.params), "export", **changes)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    run_stage(export_flow, "export", params)


if __name__ == "__main__":
    main()
