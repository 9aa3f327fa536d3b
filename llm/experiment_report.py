"""The report of an experiment: curves per variant, final losses with the seed spread, the loss-curve
diagnosis of every run and the one-sentence finding, as Markdown and as one self-contained HTML page
(plots embedded as base64 PNG); and the index over all experiments.

Plain logic and matplotlib: `write_report(folder, experiment, results)` reads nothing but the run
results it is given (the dicts flows/experiments.py collects from each run's own metrics files).
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

from llm.experiments import (
    Experiment,
    Measurement,
    Summary,
    attention_cost_finding,
    diverged_at,
    finding,
    spread,
    summarize,
)

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]


def _figure_png(experiment: Experiment, results: list[dict], which: str) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=100)
    styles = ["-", "--", ":", "-."]
    for i, variant in enumerate(experiment.variants):
        colour = COLOURS[i % len(COLOURS)]
        mine = [r for r in results if r["variant"] == variant.key]
        for j, r in enumerate(mine):
            curve = [(s, v) for s, v in r.get(which, []) if v is not None and math.isfinite(v)]
            if not curve:
                continue
            xs, ys = zip(*curve)
            ax.plot(xs, ys, styles[j % len(styles)], color=colour, linewidth=1.2, alpha=0.85,
                    label=f"{variant.label} (seed {r['seed']})")
            where = diverged_at(r)
            if where is not None and r.get("diverged"):
                ax.plot([xs[-1]], [ys[-1]], "x", color=colour, markersize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss" if which == "train" else "validation loss")
    ax.set_title(f"{experiment.name}: {'train' if which == 'train' else 'validation'} loss")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, ncol=2 if len(ax.lines) > 6 else 1)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if math.isfinite(x) else str(x)
    return f"{x:,}" if isinstance(x, int) else str(x)


def _table(summaries: list[Summary]) -> list[list[str]]:
    rows = [["variant", "runs", "diverged", "val loss (mean)", "± seed spread", "val losses per seed",
             "train loss (mean)", "spikes", "parameters", "tokens/s"]]
    for s in summaries:
        rows.append([s.label + (" (baseline)" if s.baseline else ""), str(s.runs),
                     "–" if not s.diverged else ", ".join(f"step {a:g}" for a, _ in s.diverged_at),
                     _fmt(s.val_mean), _fmt(s.val_spread), ", ".join(_fmt(v) for v in s.val_loss) or "–",
                     _fmt(sum(s.train_loss) / len(s.train_loss)) if s.train_loss else "–", str(s.spikes),
                     _fmt(s.parameters), _fmt(s.tokens_per_s, 0)])
    return rows


def _markdown_table(rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            + ["| " + " | ".join(row) + " |" for row in rows[1:]])


def _html_table(rows: list[list[str]]) -> str:
    e = html.escape
    return ("<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in rows[0]) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows[1:]) + "</table>")


def _diagnoses(experiment: Experiment, results: list[dict]) -> list[tuple[str, list[str]]]:
    labels = {v.key: v.label for v in experiment.variants}
    out = []
    for r in sorted(results, key=lambda r: ([v.key for v in experiment.variants].index(r["variant"]), r["seed"])):
        lines = []
        if r.get("diverged"):
            d = r["diverged"]
            lines.append(f"stopped: the {d.get('what', 'loss')} became {d.get('value')} at step {d['step']}"
                         + (f" (last finite loss {_fmt(d['last_loss'])})" if d.get("last_loss") is not None else ""))
        lines += [f"[{f['severity']}] {f['kind']}: {f['message']}" for f in r.get("diagnosis", [])]
        out.append((f"{labels.get(r['variant'], r['variant'])}, seed {r['seed']}", lines or ["nothing unusual"]))
    return out


def _classify_share(variant) -> float:
    return float(variant.overrides.get("classify.train_fraction", 1.0))


def _accuracy_png(experiment: Experiment, summaries: list[Summary]) -> bytes:
    """Test accuracy against the share of labels, one line per way of tuning and per initial weights
    (pretrained solid, random dashed), the seed spread as error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=100)
    modes = sorted({v.overrides.get("classify.train", "all") for v in experiment.variants})
    for colour, mode in zip(COLOURS, modes):
        mine = sorted(((_classify_share(v), s) for v, s in zip(experiment.variants, summaries)
                       if v.overrides.get("classify.train", "all") == mode and s.accuracy), key=lambda t: t[0])
        for values, style, weights in ((lambda s: s.accuracy, "o-", "pretrained"),
                                       (lambda s: s.scratch_accuracy, "s--", "random init")):
            points = [(share, values(s)) for share, s in mine if values(s)]
            if not points:
                continue
            xs = [x for x, _ in points]
            ys = [sum(v) / len(v) for _, v in points]
            errors = [spread(v) for _, v in points]
            ax.errorbar(xs, ys, yerr=errors, fmt=style, color=colour, capsize=3, label=f"{weights}, tune {mode}")
    ax.set_xscale("log")
    ax.set_xlabel("share of the labelled training data")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{experiment.name}: where pretraining pays")
    ax.grid(alpha=0.3, which="both")
    if ax.lines:
        ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _accuracy_table(summaries: list[Summary]) -> list[list[str]]:
    def cell(values):
        return f"{sum(values) / len(values):.2%} ± {spread(values):.2%}" if values else "–"

    rows = [["variant", "runs", "pretrained: test accuracy ± seed spread", "random init: test accuracy",
             "gain (points)", "per seed (pretrained)"]]
    for s in summaries:
        gain = ((sum(s.accuracy) / len(s.accuracy) - sum(s.scratch_accuracy) / len(s.scratch_accuracy)) * 100
                if s.accuracy and s.scratch_accuracy else None)
        rows.append([s.label + (" (baseline)" if s.baseline else ""), str(s.runs), cell(s.accuracy),
                     cell(s.scratch_accuracy), "–" if gain is None else f"{gain:+.1f}",
                     ", ".join(f"{a:.2%}" for a in s.accuracy) or "–"])
    return rows


def render(experiment: Experiment, results: list[dict]) -> dict:
    """Everything the report says, as data: summaries, finding, table, plots (PNG bytes)."""
    summaries = summarize(experiment, results)
    if experiment.stage == "classify":
        return {"summaries": summaries, "finding": finding(experiment, summaries), "rows": _accuracy_table(summaries),
                "plots": {"accuracy": _accuracy_png(experiment, summaries)}}
    return {"summaries": summaries, "finding": finding(experiment, summaries), "rows": _table(summaries),
            "plots": {"train": _figure_png(experiment, results, "train"), "val": _figure_png(experiment, results, "val")}}


def write_report(folder: str | Path, experiment: Experiment, results: list[dict], *, command: str = "",
                 wall_s: float | None = None) -> dict:
    """Write report.md (+ train.png, val.png beside it) and report.html (plots embedded)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    r = render(experiment, results)
    for name, png in r["plots"].items():
        (folder / f"{name}.png").write_bytes(png)
    rows = r["rows"]
    runs_line = (f"{len(results)} runs ({len(experiment.variants)} variants x {len(experiment.seeds)} seeds)"
                 + (f", done {wall_s:.0f} s after the command started (its runs share one queue)"
                    if wall_s is not None else ""))
    md = [f"# Experiment: {experiment.name}", "", f"**{experiment.question}**" if experiment.question else "", "",
          f"**Finding:** {r['finding']}", "", runs_line + (f"; command: `{command}`" if command else ""), ""]
    if experiment.note:
        md += [f"_{experiment.note}_", ""]
    md += _markdown_table(rows) + [""]
    md += [f"![{name}]({name}.png)\n" for name in r["plots"]]
    diagnosed = _diagnoses(experiment, results) if experiment.stage == "pretrain" else []
    if diagnosed:
        md += ["## Loss-curve diagnosis per run", ""]
        md += [f"- **{title}**: " + " ".join(lines) for title, lines in diagnosed]
    md += ["", "## What each variant sets", ""]
    for v in experiment.variants:
        changes = ", ".join(f"`{k}={val}`" for k, val in v.overrides.items()) or "the base configuration"
        md.append(f"- {v.label}{' (baseline)' if v.baseline else ''}: {changes}")
    (folder / "report.md").write_text("\n".join(md) + "\n")

    e = html.escape
    images = "".join(f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
                     for name, png in r["plots"].items())
    table = _html_table(rows)
    diagnoses = ("<h2>Loss-curve diagnosis per run</h2><ul>" + "".join(
        f"<li><b>{e(t)}</b>: {e(' '.join(lines))}</li>" for t, lines in diagnosed) + "</ul>") if diagnosed else ""
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(experiment.name)}</title>{_STYLE}</head><body>"
            f"<h1>Experiment: {e(experiment.name)}</h1><p><b>{e(experiment.question)}</b></p>"
            f"<p class='finding'><b>Finding:</b> {e(r['finding'])}</p><p>{e(runs_line)}"
            + (f"; command: <code>{e(command)}</code>" if command else "") + "</p>"
            + (f"<p><i>{e(experiment.note)}</i></p>" if experiment.note else "")
            + f"{table}{images}{diagnoses}</body></html>")
    (folder / "report.html").write_text(page)
    return {"name": experiment.name, "finding": r["finding"], "runs": len(results),
            "summaries": [s.as_dict() for s in r["summaries"]], "wall_s": wall_s}


def _attention_cost_png(result: dict) -> bytes:
    """Time and peak memory against T on log-log axes, one line per path, the fitted exponent in
    the legend, and an x where a path ran out of the memory cap."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=100)
    for ax, column, exponent, unit in ((axes[0], "ms", "time_exponent", "time per forward (ms)"),
                                       (axes[1], "peak_mb", "memory_exponent", "peak memory (MB)")):
        for colour, path in zip(COLOURS, ("explicit", "sdpa")):
            done = [(r["length"], r[column]) for r in result["rows"]
                    if r["path"] == path and not r["out_of_memory"] and r[column]]
            if not done:
                continue
            p = result["fit"][path][exponent]
            ax.plot(*zip(*done), "o-", color=colour, label=f"{path}" + (f" (fit: T^{p:.2f})" if p is not None else ""))
            if column == "peak_mb" and result["out_of_memory_at"][path] is not None:
                ax.plot([result["out_of_memory_at"][path]], [result["memory_cap_mb"]], "x", color=colour,
                        markersize=11, label=f"{path}: out of memory")
        if column == "peak_mb":
            ax.axhline(result["memory_cap_mb"], color="#888", linestyle=":", label=f"cap {result['memory_cap_mb']:g} MB")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T (tokens)")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("one attention layer's forward: explicit softmax vs. the fused kernel")
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def write_measurement_report(folder: str | Path, measurement: Measurement, result: dict, *, command: str = "",
                             wall_s: float | None = None) -> dict:
    """report.md (+ cost.png) and report.html for a measurement experiment (bench/attention_cost.py)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = attention_cost_finding(result)
    png = _attention_cost_png(result)
    (folder / "cost.png").write_bytes(png)
    rows = [["path", "T", "ms", "peak MB"]] + [
        [r["path"], f"{r['length']:,}", "out of memory" if r["out_of_memory"] else _fmt(r["ms"], 2),
         "–" if r["out_of_memory"] else _fmt(r["peak_mb"], 1)] for r in result["rows"]]
    where = (f"{result.get('device_name', result.get('device', ''))}, preset {result.get('preset')}, "
             f"{result.get('n_head')} heads of {result.get('head_dim')}, batch {result.get('batch_size')}; "
             f"bench command: `{result.get('command', '')}`")
    md = [f"# Experiment: {measurement.name}", "", f"**{measurement.question}**", "", f"**Finding:** {text}", "",
          where + (f"; {wall_s:.0f} s" if wall_s is not None else "") + (f"; command: `{command}`" if command else ""), ""]
    if measurement.note:
        md += [f"_{measurement.note}_", ""]
    md += _markdown_table(rows)
    md += ["", "![cost against length](cost.png)", ""]
    (folder / "report.md").write_text("\n".join(md) + "\n")
    e = html.escape
    table = _html_table(rows)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(measurement.name)}</title>{_STYLE}</head>"
            f"<body><h1>Experiment: {e(measurement.name)}</h1><p><b>{e(measurement.question)}</b></p>"
            f"<p class='finding'><b>Finding:</b> {e(text)}</p><p>{e(where)}</p>"
            + (f"<p><i>{e(measurement.note)}</i></p>" if measurement.note else "")
            + f"<img alt='cost against length' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
            + f"{table}</body></html>")
    (folder / "report.html").write_text(page)
    return {"name": measurement.name, "finding": text, "runs": 1, "fit": result["fit"],
            "out_of_memory_at": result["out_of_memory_at"], "wall_s": wall_s}


def write_index(folder: str | Path, entries: list[dict]) -> None:
    """index.md and index.html: one line per experiment with its finding, linking its report."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    md = ["# Experiments", "", "| experiment | runs | finding |", "|---|---|---|"]
    md += [f"| [{x['name']}]({x['name']}/report.md) | {x['runs']} | {x['finding']} |" for x in entries]
    (folder / "index.md").write_text("\n".join(md) + "\n")
    e = html.escape
    rows = "".join(f"<tr><td><a href='{e(x['name'])}/report.html'>{e(x['name'])}</a></td><td>{x['runs']}</td>"
                   f"<td>{e(x['finding'])}</td></tr>" for x in entries)
    (folder / "index.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>Experiments</title>{_STYLE}</head><body>"
        f"<h1>Experiments</h1><table><tr><th>experiment</th><th>runs</th><th>finding</th></tr>{rows}</table>"
        "</body></html>")


_STYLE = ("<style>body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em}"
          "table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .5em}"
          "img{max-width:100%;display:block;margin:1em 0}.finding{background:#f3f6fb;padding:.6em}</style>")
