"""Experiments (experiments.yaml, flows/experiments.py): validation and findings, then one experiment
end to end through real `dvc exp run`, Prefect and MLflow on a tiny configuration."""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import time
from pathlib import Path

import pytest
import yaml

from llm.experiments import (
    CatalogueError,
    Experiment,
    Measurement,
    early_loss,
    finding,
    load_catalogue,
    parse_catalogue,
    summarize,
)

ROOT = Path(__file__).resolve().parents[1]


# --- the catalogue -------------------------------------------------------------------------------

def test_the_shipped_catalogue_is_valid_and_every_variant_is_a_change():
    from flows.experiments import plan

    catalogue = load_catalogue(ROOT / "experiments.yaml")
    wanted = {"clipping", "warmup", "weight-decay", "dropout", "qkv-bias", "norm-placement", "norm-kind",
              "positions", "mlp", "attention", "optimizer", "preset", "attention-cost"}
    assert wanted <= set(catalogue.experiments)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    runs = plan(catalogue, raw, catalogue.select(None))
    assert all(len(e.seeds) >= 2 for e in catalogue.experiments.values() if isinstance(e, Experiment))
    assert isinstance(catalogue.experiments["attention-cost"], Measurement)
    # norm-placement sweeps the learning rate for both placements
    sweep = catalogue.experiments["norm-placement"]
    assert {v.sweep_value for v in sweep.variants} == {0.003, 0.01, 0.03, 0.1} and len(sweep.variants) == 8
    assert len(runs) == sum(len(e.runs()) for e in catalogue.experiments.values())


def _catalogue(**experiment) -> dict:
    entry = {"baseline": {"label": "clip", "set": {"pretrain.train.grad_clip": 1.0}},
             "variants": [{"label": "no clip", "set": {"pretrain.train.grad_clip": 0.0}}]}
    entry.update(experiment)
    return {"seeds": [1, 2], "base": {"pretrain.train.max_steps": 10, "pretrain.train.warmup_steps": 2},
            "experiments": {"clipping": entry}}


def _plan(raw_catalogue: dict):
    from flows.experiments import plan

    catalogue = parse_catalogue(raw_catalogue)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    return plan(catalogue, raw, catalogue.select(None))


def test_across_vocabularies_the_finding_compares_bits_per_byte():
    experiment = parse_catalogue(_catalogue(
        measure="bits_per_byte", baseline={"label": "vocab 8192", "set": {"tokenizer.vocab_size": 8192}},
        variants=[{"label": "vocab 512", "set": {"tokenizer.vocab_size": 512}}])).experiments["clipping"]

    def run(variant, seed, val_loss, bpb, per_word, share, parameters):
        return {"variant": variant, "seed": seed, "metrics": {
            "val_loss": val_loss, "train_loss": val_loss - 0.1, "val_bits_per_byte": bpb, "val_tokens_per_word": per_word,
            "embedding_share": share, "parameters": parameters}, "train": [], "diagnosis": []}

    # the 512 vocabulary has the LOWER loss per token and the HIGHER bits per byte: per byte decides
    results = [run("vocab-8192", 1, 5.0, 1.60, 1.3, 0.52, 2_100_000), run("vocab-8192", 2, 5.1, 1.62, 1.3, 0.52, 2_100_000),
               run("vocab-512", 1, 3.0, 1.90, 3.1, 0.06, 1_100_000), run("vocab-512", 2, 3.1, 1.94, 3.1, 0.06, 1_100_000)]
    text = finding(experiment, summarize(experiment, results))
    assert "vocab 8192: 1.610 bits/byte (±0.010), 1.30 tokens/word, 52% of 2,100,000 parameters in embeddings" in text
    assert "vocab 512: 1.920 bits/byte (±0.020), 3.10 tokens/word, 6% of 1,100,000" in text
    assert text.endswith("Lowest bits per byte: vocab 8192, 0.310 below vocab 512.")


def test_a_classify_experiment_seeds_the_classify_stage_and_reports_accuracy_against_random_weights(tmp_path):
    from flows.experiments import plan
    from llm.experiment_report import write_report

    raw = {"seeds": [1, 2], "base": {}, "experiments": {"value": {
        "stage": "classify", "measure": "accuracy",
        "baseline": {"label": "all labels", "set": {"classify.train_fraction": 1.0}},
        "variants": [{"label": "1% labels", "set": {"classify.train_fraction": 0.01}}]}}}
    catalogue = parse_catalogue(raw)
    experiment = catalogue.experiments["value"]
    runs = plan(catalogue, yaml.safe_load((ROOT / "params.yaml").read_text()), [experiment])
    assert {r.overrides["classify.seed"] for r in runs} == {1, 2} and "pretrain.train.seed" not in runs[0].overrides

    def run(variant, seed, pretrained, scratch):
        return {"variant": variant, "seed": seed, "train": [], "diagnosis": [], "metrics": {"test": {
            "pretrained": {"accuracy": pretrained}, "from_scratch": {"accuracy": scratch}}}}

    results = [run("all-labels", 1, 0.98, 0.97), run("all-labels", 2, 0.99, 0.98),
               run("1-labels", 1, 0.90, 0.80), run("1-labels", 2, 0.92, 0.84)]
    entry = write_report(tmp_path, experiment, results)
    assert entry["finding"] == ("all labels: 98.5% pretrained vs 97.5% from random weights (+1.0 points); 1% labels: "
                                "91.0% pretrained vs 82.0% from random weights (+9.0 points). Pretraining paid most "
                                "with 1% labels (+9.0 points) and least with all labels (+1.0).")
    report = (tmp_path / "report.md").read_text()
    assert "| 1% labels | 2 | 91.00% ± 1.00% | 82.00% ± 2.00% | +9.0 | 90.00%, 92.00% |" in report
    assert (tmp_path / "accuracy.png").stat().st_size > 1000 and "Loss-curve diagnosis" not in report


def test_a_measurement_names_a_known_bench():
    with pytest.raises(CatalogueError, match=r"bench: 'attention' is not one of attention_cost"):
        parse_catalogue({"seeds": [1, 2], "experiments": {"cost": {"bench": "attention"}}})


def test_an_unknown_experiment_name_is_refused_with_the_known_ones():
    catalogue = parse_catalogue(_catalogue())
    with pytest.raises(CatalogueError, match=r"unknown experiment 'cliping'.*known: clipping"):
        catalogue.select(["cliping"])


def test_a_mistyped_params_key_is_named_before_anything_runs():
    from flows.experiments import ExperimentError

    bad = _catalogue(variants=[{"label": "typo", "set": {"pretrain.train.grad_clp": 0.0}}])
    with pytest.raises(ExperimentError, match=r"clipping / typo: unknown key 'pretrain.train.grad_clp'"):
        _plan(bad)
    wrong_type = _catalogue(variants=[{"label": "text", "set": {"pretrain.train.grad_clip": "none"}}])
    with pytest.raises(ExperimentError, match=r"clipping / text: pretrain.train.grad_clip"):
        _plan(wrong_type)
    with pytest.raises(CatalogueError, match=r"'instruct.lr': experiments change the pretrain stage \(or the tokenizer"):
        parse_catalogue(_catalogue(variants=[{"label": "x", "set": {"instruct.lr": 0.1}}]))
    with pytest.raises(ExperimentError, match=r"clipping / vocab: unknown key 'tokenizer.vocab'"):
        _plan(_catalogue(variants=[{"label": "vocab", "set": {"tokenizer.vocab": 512}}]))
    # a tokenizer change is a change, though the pretrain settings stay the same
    assert len(_plan(_catalogue(variants=[{"label": "vocab", "set": {"tokenizer.vocab_size": 512}}]))) == 4


def test_a_variant_identical_to_its_baseline_is_refused():
    from flows.experiments import ExperimentError

    same = _catalogue(variants=[{"label": "same again", "set": {"pretrain.train.grad_clip": 1.0}}])
    with pytest.raises(ExperimentError, match=r"clipping / same again: identical to the baseline 'clip'"):
        _plan(same)
    with pytest.raises(CatalogueError, match="sets nothing"):
        parse_catalogue(_catalogue(variants=[{"label": "empty"}]))


def test_variants_must_share_the_token_budget_and_have_two_seeds():
    from flows.experiments import ExperimentError

    longer = _catalogue(variants=[{"label": "longer", "set": {"pretrain.train.max_steps": 20}}])
    with pytest.raises(ExperimentError, match="same number of tokens"):
        _plan(longer)
    one_seed = _catalogue()
    one_seed["seeds"] = [1]
    with pytest.raises(CatalogueError, match="at least 2 distinct integer seeds"):
        parse_catalogue(one_seed)


# --- findings: written from the numbers -----------------------------------------------------------

def _result(variant: str, seed: int, val: float, train: float = 4.0, diverged=None, diagnosis=()):
    curve = [[s, 6.0 - s / 10] for s in range(1, 21)]
    return {"variant": variant, "seed": seed, "metrics": {"val_loss": val, "train_loss": train, "parameters": 1000},
            "diverged": diverged, "diagnosis": list(diagnosis), "train": curve, "val": []}


def test_the_finding_follows_the_measured_numbers():
    experiment = parse_catalogue(_catalogue()).experiments["clipping"]
    close = [_result("clip", 1, 5.00), _result("clip", 2, 5.10), _result("no-clip", 1, 5.04), _result("no-clip", 2, 5.08)]
    text = finding(experiment, summarize(experiment, close))
    assert "no clip made no difference beyond the seeds' spread" in text and "5.060 vs 5.050" in text
    apart = [_result("clip", 1, 5.00), _result("clip", 2, 5.02), _result("no-clip", 1, 5.50), _result("no-clip", 2, 5.54)]
    text = finding(experiment, summarize(experiment, apart))
    assert "no clip raised val loss by 0.510 (5.520 vs 5.010" in text
    broke = [_result("clip", 1, 5.0), _result("clip", 2, 5.0),
             _result("no-clip", 1, math.nan, diverged={"step": 7, "what": "training loss", "value": "nan", "last_loss": 9.5}),
             _result("no-clip", 2, 5.1)]
    text = finding(experiment, summarize(experiment, broke))
    assert "no clip diverged in 1 of 2 runs (first at step 7, at loss 9.500)" in text


def test_a_sweep_finding_names_where_each_group_diverged():
    experiment = parse_catalogue(_catalogue(sweep={"pretrain.train.lr": [0.001, 0.01]})).experiments["clipping"]
    runaway = {"kind": "divergence", "severity": "error", "at": 15, "value": 8.0, "message": "ran away"}
    results = []
    for v in experiment.variants:
        bad = v.group == "no clip" and v.sweep_value == 0.01
        results += [_result(v.key, s, 5.0 + v.sweep_value, diagnosis=[runaway] if bad else []) for s in (1, 2)]
    text = finding(experiment, summarize(experiment, results))
    assert text.startswith("clip trained at every lr up to 0.01 (best val loss 5.001 at 0.001)")
    assert "no clip diverged at lr >= 0.01 and trained up to 0.001" in text


def test_early_loss_skips_the_untrained_first_step():
    result = {"train": [[1, 9.0], [2, 7.0], [3, 8.0], [4, 5.0], [5, 4.0], [10, 3.0], [20, 2.0]]}
    assert early_loss(result) == 8.0


# --- end to end: real dvc exp run, Prefect and MLflow --------------------------------------------------

def tree_hash(folder: Path, skip: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and skip not in path.parts:
            digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


TINY_CATALOGUE = {
    "seeds": [1, 2],
    "base": {"pretrain.register_model": False, "pretrain.model.n_layer": 1, "pretrain.model.d_model": 32,
             "pretrain.model.n_head": 4, "pretrain.model.context_length": 32, "pretrain.train.optimizer": "adamw",
             "pretrain.train.max_steps": 12, "pretrain.train.warmup_steps": 2, "pretrain.train.batch_size": 4,
             "pretrain.train.eval_every": 6, "pretrain.train.eval_steps": 2, "pretrain.train.checkpoint_every": 0,
             "pretrain.train.sample_tokens": 0, "pretrain.train.threads": 1, "pretrain.train.progress": False},
    "experiments": {"clipping": {
        "question": "What does clipping do here?",
        "baseline": {"label": "clip at 1.0", "set": {"pretrain.train.grad_clip": 1.0}},
        # a learning rate of 1e12 overflows float32 within a few steps: a run that diverges, as a result
        "variants": [{"label": "absurd lr", "set": {"pretrain.train.lr": 1e12, "pretrain.train.grad_clip": 0.0}}]},
        # its baseline spells out the preset's own qkv bias: the same run as clipping's baseline, once resolved
        "qkv-bias": {
            "question": "Does a qkv bias matter here?",
            "baseline": {"label": "qkv bias", "set": {"pretrain.model.qkv_bias": True}},
            "variants": [{"label": "no qkv bias", "set": {"pretrain.model.qkv_bias": False}}]}},
}


@pytest.mark.e2e
def test_one_experiment_end_to_end(pipeline_repo, prefect_api, tmp_path):
    import sample_sources as samples
    from conftest import dvc, run, stage_env

    repo = pipeline_repo
    (repo / "params.yaml").write_text(yaml.safe_dump(samples.tiny_pipeline_params(tmp_path), sort_keys=False))
    (repo / "tiny.yaml").write_text(yaml.safe_dump(TINY_CATALOGUE, sort_keys=False))
    env = stage_env(repo)
    dvc(repo, "repro", "pack", env=env)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "pipeline"], repo)
    before = {name: (repo / name).read_bytes() for name in ("params.yaml", "dvc.lock")}
    data_before = tree_hash(repo / "data", skip="experiments")

    command = [sys.executable, "-m", "flows.experiments", "clipping", "--catalogue", "tiny.yaml"]
    started = time.time()
    first = run([*command[:3], "--all", *command[4:]], repo, env, timeout=900)   # both: one queue
    first_s = time.time() - started
    print(f"first run {first_s:.0f} s")

    # the workspace is the user's: params.yaml, dvc.lock and data/ of the pipeline untouched
    assert {name: (repo / name).read_bytes() for name in before} == before
    assert tree_hash(repo / "data", skip="experiments") == data_before
    assert run(["git", "status", "--porcelain"], repo).stdout.strip() == ""

    out = repo / "data/experiments/clipping"
    report = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2
    assert "clipping" in (repo / "data/experiments/index.md").read_text()

    # the report's numbers are the runs' own metrics files (as committed by `dvc exp run`)
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo).stdout.split()
    finished = [r for r in refs if "clip-at-1-0" in r]
    assert len(finished) == 2, refs
    val_losses = []
    for seed in (1, 2):
        [ref] = [r for r in finished if f"-s{seed}-" in r]
        metrics = json.loads(run(["git", "show", f"{ref}:data/pretrain/metrics.json"], repo).stdout)
        kept = json.loads((out / f"runs/clip-at-1-0/seed{seed}/metrics.json").read_text())
        assert kept == metrics and metrics["steps"] == 12
        val_losses.append(metrics["val_loss"])
        params = yaml.safe_load(run(["git", "show", f"{ref}:params.yaml"], repo).stdout)
        assert params["pretrain"]["train"]["seed"] == seed and params["pretrain"]["model"]["d_model"] == 32
    row = next(line for line in report.splitlines() if line.startswith("| clip at 1.0 (baseline)"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[3]) == pytest.approx(sum(val_losses) / 2, abs=5e-4)
    assert float(cells[4]) == pytest.approx(abs(val_losses[0] - val_losses[1]) / 2, abs=5e-4)
    assert cells[5] == ", ".join(f"{v:.3f}" for v in val_losses)

    # the diverging variant is a result with its step, not a crash; the finding says so
    diverged = json.loads((out / "runs/absurd-lr/seed1/result.json").read_text())
    assert diverged["status"] == "diverged" and 0 <= diverged["diverged"]["step"] < 12, diverged
    assert re.search(r"absurd lr diverged in 2 of 2 runs \(first at step \d+", report)
    assert "Loss-curve diagnosis per run" in report

    # dvc exp show lists the runs with their params and metrics, in the user's repository
    shown = dvc(repo, "exp", "show", "--json", env=env).stdout
    assert "clipping-clip-at-1-0-s1" in shown and "val_loss" in shown

    # MLflow: one parent per experiment, a child per variant and seed
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name("tests").experiment_id
    [parent] = client.search_runs([experiment_id], "tags.`llm.experiment` = 'clipping' and tags.`llm.stage` = 'pipeline'")
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags.get("llm.variant", "") + str(c.data.tags.get("llm.seed")) for c in children) == \
        ["absurd lr1", "absurd lr2", "clip at 1.01", "clip at 1.02"]

    # qkv-bias's baseline is clipping's, once the preset's default is seen as such: DVC's run-cache
    # restored it (no training), and MLflow still has a child for it, marked as restored
    assert "queued 8/8 runs" in first.stdout + first.stderr
    for seed, val_loss in zip((1, 2), val_losses):
        restored = json.loads((repo / f"data/experiments/qkv-bias/runs/qkv-bias/seed{seed}/result.json").read_text())
        assert restored["restored"] and restored["metrics"]["val_loss"] == val_loss
        trained = json.loads((repo / f"data/experiments/qkv-bias/runs/no-qkv-bias/seed{seed}/result.json").read_text())
        assert not trained["restored"] and trained["metrics"]["val_loss"] != val_loss
    [qkv_parent] = client.search_runs([experiment_id], "tags.`llm.experiment` = 'qkv-bias' and tags.`llm.stage` = 'pipeline'")
    qkv_children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{qkv_parent.info.run_id}'")
    assert sorted((c.data.tags["llm.variant"], "llm.restored_from" in c.data.tags) for c in qkv_children) == \
        [("no qkv bias", False)] * 2 + [("qkv bias", True)] * 2
    assert [c.data.metrics["val_loss"] for c in qkv_children if c.data.tags["llm.variant"] == "qkv bias"] != []
    # the queue's holding parent is gone once every run is filed under its experiment
    assert not client.search_runs([experiment_id], "tags.`llm.pipeline_run_id` = 'experiments-queue'")

    # a rerun reuses every finished run (nothing recomputed); one whose result was lost (a kill after
    # its run finished) is collected from its experiment commit, not trained again
    (out / "runs/clip-at-1-0/seed2/result.json").unlink()
    started = time.time()
    second = run(command, repo, env, timeout=600)
    assert "3 kept from earlier, 1 to run" in second.stdout + second.stderr
    assert json.loads((out / "runs/clip-at-1-0/seed2/metrics.json").read_text())["val_loss"] == val_losses[1]
    assert "clip at 1.0 (baseline) | 2 | – | " + cells[3] in (out / "report.md").read_text()
    assert {name: (repo / name).read_bytes() for name in before} == before
    print(f"second run {time.time() - started:.0f} s")


def test_a_measurement_is_one_bench_run_with_its_report_reused_until_its_code_changes(pipeline_repo, prefect_api,
                                                                                      tmp_path):
    import shutil

    import sample_sources as samples
    from conftest import run, stage_env

    repo = pipeline_repo
    shutil.copytree(ROOT / "bench", repo / "bench", ignore=shutil.ignore_patterns("__pycache__", "results"))
    (repo / "params.yaml").write_text(yaml.safe_dump(samples.tiny_pipeline_params(tmp_path), sort_keys=False))
    catalogue = {"seeds": [1, 2], "base": {}, "experiments": {"attention-cost": {
        "question": "How does attention's cost grow?", "bench": "attention_cost",
        "args": ["--min-length", "64", "--max-length", "512", "--memory-cap-mb", "4", "--repeats", "1",
                 "--fit-from", "64", "--threads", "1"]}}}
    (repo / "tiny.yaml").write_text(yaml.safe_dump(catalogue, sort_keys=False))
    env = stage_env(repo)
    command = [sys.executable, "-m", "flows.experiments", "attention-cost", "--catalogue", "tiny.yaml"]
    first = run(command, repo, env, timeout=300)

    out = repo / "data/experiments/attention-cost"
    result = json.loads((out / "result.json").read_text())
    report = (out / "report.md").read_text()
    assert "data:image/png;base64," in (out / "report.html").read_text()
    # the finding is the bench's own numbers: its fitted exponents and where the cap stopped a path
    fit = result["fit"]
    for path in ("explicit", "sdpa"):
        assert f"T^{fit[path]['memory_exponent']:.2f}" in report and f"T^{fit[path]['time_exponent']:.2f}" in report
    stopped = result["out_of_memory_at"]["explicit"]
    assert stopped is not None and f"ran out of memory at {stopped:,} tokens" in report
    assert "attention-cost" in (repo / "data/experiments/index.md").read_text()
    assert "attention-cost: Explicit softmax attention" in first.stdout

    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name("tests").experiment_id
    [parent] = client.search_runs([experiment_id], "tags.`llm.experiment` = 'attention-cost'")
    assert parent.data.metrics["explicit.out_of_memory_at"] == stopped
    assert parent.data.metrics["sdpa.memory_exponent"] == pytest.approx(fit["sdpa"]["memory_exponent"])

    # nothing changed: the kept result is reused; the bench's code changed: it runs again
    second = run(command, repo, env, timeout=300)
    assert "kept from earlier" in second.stdout + second.stderr
    assert json.loads((out / "result.json").read_text()) == result
    with open(repo / "bench/attention_cost.py", "a") as script:
        script.write("\n# changed\n")
    third = run(command, repo, env, timeout=300)
    assert "kept from earlier" not in third.stdout + third.stderr
