"""Tokenizer stage: train the project's tokenizer, then compare tokenizers across languages.

The comparison is the lesson: a BPE trained on English spends several times more tokens on
Arabic than on the same content in English, and training it on English + Arabic closes much of
that gap. Measured on held-out English and on the parallel English/Arabic text of the download
stage, for every tokenizer kind plus cl100k (when the download stage fetched it).

Output: data/tokenizer/model/ (the project's tokenizer), metrics.json, comparison.csv/.png, and
data/tokenizer/comparison/<name>/ (every compared tokenizer, for the server's side-by-side view).
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from prefect import flow, task
from prefect.logging import get_run_logger

from flows._stage import SOURCES, TOKENIZER, StageError, as_params, main, stage_dir, stage_run
from flows.params import Params
from llm import tokenizer as tok
from llm.files import atomic_dir
from llm.sources import downloaded, iter_documents

OUT = stage_dir("tokenizer")
COMPARISON = OUT / "comparison"   # each compared tokenizer in a subfolder (serving/inspect_routes.py reads it)
REFERENCE_LANGUAGE = "en"


def split_documents(texts: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held out), chosen by a seeded shuffle of whole documents."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_held = round(len(texts) * fraction) if len(texts) > 1 else 0
    held = set(order[:n_held])
    return [t for i, t in enumerate(texts) if i not in held], [texts[i] for i in sorted(held)]


def capped(texts: list[str], max_chars: int) -> list[str]:
    """The first texts up to max_chars characters (the last one cut)."""
    kept, total = [], 0
    for text in texts:
        if total >= max_chars:
            break
        kept.append(text[: max_chars - total])
        total += len(kept[-1])
    return kept


def parallel_sets(seed: int) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Per language: (texts to train the multilingual BPE on, texts to measure on), split by item."""
    records = list(iter_documents(SOURCES, "tokenizer-eval"))
    random.Random(seed).shuffle(records)
    half = len(records) // 2
    train, evaluate = {}, {}
    for language in sorted({k for r in records for k, v in r.items() if isinstance(v, str) and k != "id"}):
        # Only items present in every language, so the sets hold the same content.
        train[language] = [r[language] for r in records[:half] if isinstance(r.get(language), str)]
        evaluate[language] = [r[language] for r in records[half:] if isinstance(r.get(language), str)]
    return train, evaluate


@task
def train_tokenizer(kind: str, texts: list[str], vocab_size: int, params: Params) -> tok.Tokenizer:
    p = params.tokenizer
    if kind == "char":
        return tok.train_char(texts)
    return tok.train_sentencepiece(texts, kind, vocab_size, character_coverage=p.character_coverage,
                                   input_sentence_size=p.max_sentences, seed=params.project.seed)


@task
def measure_all(tokenizers: dict[str, tok.Tokenizer], eval_sets: dict[str, list[str]]) -> list[dict]:
    rows = []
    for name, tokenizer in tokenizers.items():
        for set_name, texts in eval_sets.items():
            rows.append({"tokenizer": name, "eval_set": set_name, **tok.measure(tokenizer, texts)})
    return rows


def cl100k_file() -> Path | None:
    for folder in downloaded(SOURCES, "asset"):
        found = sorted((folder / "files").glob("cl100k_base.tiktoken"))
        if found:
            return found[0]
    return None


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokenizers = list(dict.fromkeys(r["tokenizer"] for r in rows))
    sets = list(dict.fromkeys(r["eval_set"] for r in rows))
    value = {(r["tokenizer"], r["eval_set"]): r["chars_per_token"] for r in rows}
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(sets)
    for i, set_name in enumerate(sets):
        xs = [t + i * width for t in range(len(tokenizers))]
        ax.bar(xs, [value[(t, set_name)] for t in tokenizers], width, label=set_name)
    ax.set_xticks([t + width * (len(sets) - 1) / 2 for t in range(len(tokenizers))], tokenizers)
    ax.set_ylabel("characters per token (higher = cheaper)")
    ax.set_title("What each tokenizer charges per language")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def language_cost(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per tokenizer: tokens spent on each parallel language / tokens spent on the same English."""
    tokens = {(r["tokenizer"], r["eval_set"]): r["tokens"] for r in rows}
    cost: dict[str, dict[str, float]] = {}
    for (name, set_name), n in tokens.items():
        reference = tokens.get((name, f"parallel-{REFERENCE_LANGUAGE}"))
        if set_name.startswith("parallel-") and set_name != f"parallel-{REFERENCE_LANGUAGE}" and reference:
            cost.setdefault(name, {})[f"{set_name.removeprefix('parallel-')}_over_{REFERENCE_LANGUAGE}"] = n / reference
    return cost


@flow(name="tokenizer", log_prints=True, validate_parameters=False)
def tokenizer_flow(params: Params) -> dict:
    params = as_params(params)
    p = params.tokenizer
    log = get_run_logger()
    with stage_run("tokenizer", params) as stage:
        texts = [d["text"] for d in iter_documents(SOURCES, "pretrain")]
        if not texts:
            raise StageError("no pretraining text: the download stage has no source with role 'pretrain'")
        train_texts, heldout = split_documents(texts, p.heldout_fraction, params.project.seed)
        try:
            project = train_tokenizer(p.kind, train_texts, p.vocab_size, params)
        except ValueError as err:
            raise StageError(str(err)) from err
        with atomic_dir(TOKENIZER) as tmp:
            project.save(tmp)
        log.info(f"{p.kind} tokenizer: vocab {project.vocab_size}, fingerprint {project.fingerprint()[:12]}")
        metrics = {"kind": p.kind, "vocab_size": project.vocab_size, "train_documents": len(train_texts),
                   "heldout_documents": len(heldout)}
        # The comparison outputs are always written (DVC declares them): with compare: false they
        # measure the project's tokenizer alone.
        try:
            rows, compared = compare(project, train_texts, heldout, params)
        except ValueError as err:
            raise StageError(f"tokenizer comparison: {err} (or set tokenizer.compare: false)") from err
        metrics["comparison"] = {f"{r['tokenizer']}.{r['eval_set']}": _rounded(r) for r in rows}
        metrics["language_cost"] = language_cost(rows)
        write_comparison(rows, stage)
        with atomic_dir(COMPARISON) as tmp:
            tok.save_tokenizers(compared, tmp)
        summary = comparison_markdown(rows, metrics["language_cost"])
        return stage.finish(metrics, summary)


def compare(project: tok.Tokenizer, train_texts: list[str], heldout: list[str],
            params: Params) -> tuple[list[dict], dict[str, tok.Tokenizer]]:
    """The measurements (rows), and the tokenizers measured by name."""
    p = params.tokenizer
    train_parallel, eval_parallel = parallel_sets(params.project.seed)
    eval_sets = {"heldout-en": capped(heldout, p.eval_chars)} if heldout else {}
    eval_sets.update({f"parallel-{lang}": capped(t, p.eval_chars) for lang, t in eval_parallel.items()})
    eval_sets = {name: texts for name, texts in eval_sets.items() if texts}
    tokenizers = {p.kind: project}  # the project's own, same key as its kind
    if not p.compare:
        return measure_all(tokenizers, eval_sets), tokenizers
    for kind in ("bpe", "unigram", "char"):
        if kind != p.kind:
            tokenizers[kind] = train_tokenizer(kind, train_texts, p.vocab_size, params)
    other_languages = [t for lang, t in train_parallel.items() if lang != REFERENCE_LANGUAGE]
    if other_languages:
        mixed = train_texts + [text for texts in other_languages for text in texts]
        names = "-".join([REFERENCE_LANGUAGE, *[lang for lang in train_parallel if lang != REFERENCE_LANGUAGE]])
        tokenizers[f"bpe-{names}"] = train_tokenizer("bpe", mixed, p.vocab_size, params)
    ranks = cl100k_file()
    if ranks is not None:
        tokenizers["cl100k"] = tok.TiktokenTokenizer.from_file(ranks)
    return measure_all(tokenizers, eval_sets), tokenizers


def _rounded(row: dict) -> dict:
    keys = ("tokens_per_word", "chars_per_token", "bytes_per_token", "byte_fallback_rate", "encode_mb_per_s")
    return {k: round(row[k], 4) for k in keys}


def write_comparison(rows: list[dict], stage) -> None:
    with open(OUT / "comparison.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, OUT / "comparison.png")
    stage.log_artifact(OUT / "comparison.csv")
    stage.log_artifact(OUT / "comparison.png")


def comparison_markdown(rows: list[dict], cost: dict) -> str:
    lines = ["| tokenizer | eval set | tokens/word | chars/token | bytes/token | byte fallback | MB/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokenizer']} | {r['eval_set']} | {r['tokens_per_word']:.2f} | {r['chars_per_token']:.2f} "
                     f"| {r['bytes_per_token']:.2f} | {r['byte_fallback_rate']:.2%} | {r['encode_mb_per_s']:.1f} |")
    for name, ratios in cost.items():
        for key, value in ratios.items():
            lines.append(f"\n**{name}**: {key.replace('_over_', ' costs ')} x{value:.2f} tokens for the same content")
    return "\n".join(lines)


if __name__ == "__main__":
    main(tokenizer_flow, "tokenizer")
