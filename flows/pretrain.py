"""Pretrain stage: train the GPT on the packed tokens, resumably, and read its loss curve.

Output: data/pretrain/model/ (model.safetensors, config.json, tokenizer/: the folder every later
stage and the server load), data/pretrain/curves/{train,val}.csv (DVC plots), samples.txt (what
the trained model writes), metrics.json (with the unigram baseline its val loss must beat).
Registered in MLflow as <project.name>-base.

Snapshots (llm.snapshots, `pretrain.snapshots`): at step 0 and at evenly spaced evaluations the
weights (float16) and what the model does with a probe text and one training row (token
probabilities, top-k, attention of every head). Taken into the run's checkpoint folder (so a
resumed run keeps them), copied into the model folder's snapshots/ at the end: DVC tracks them
with the model, MLflow logs them with it, and the server's training timeline reads them there.

Checkpoints live in data/pretrain/checkpoints/<run key>/, which is not a DVC output (so DVC
neither deletes it before a run nor tracks it): a run killed at any point continues from its last
checkpoint when the stage runs again with the same settings, while changed settings get a fresh
folder (and a fresh run). Not declaring it (rather than `persist: true`) keeps the stage in DVC's
run-cache: settings trained once before (an experiment's baseline, a `git checkout` back) are
restored instead of trained again.

Several GPUs (`pretrain.devices: N` or `auto`): the flow (wherever it runs: in the DVC process or
on a pool's worker) starts `torchrun --standalone --nproc_per_node=N -m flows.pretrain --ddp-rank
JOB` and waits. Each of those processes trains with DistributedDataParallel, or FSDP with
`pretrain.sharding: fsdp` (llm.train); rank 0 writes the checkpoints and the curves and logs the
step metrics to this stage's MLflow run, the others only compute. The flow then loads the final
weights and finishes the stage as with one device. LLM_PRETRAIN_TORCHRUN=1 takes this path even
with one device (to try it on one GPU).

Several hosts (`pretrain.nodes: N`, `pretrain.rendezvous: NODE0:PORT`): the stage runs on every
host with that host's node rank, and their torchruns meet at node 0 (llm.distributed.Nodes).
Node 0 (`dvc repro`, or `python -m flows.pretrain`) holds global rank 0 and finishes the stage;
the others (`python -m flows.pretrain --node-rank R`) only train. The hosts must share the
repository folder (checkpoints are written there by every host with fsdp, and read by all on
resume). With `execution.mode: pool` the stage submits one flow run per node (flows/remote.py).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from prefect import flow
from prefect.logging import get_run_logger

from flows._snapshots import snapshot, snapshot_metrics, snapshots_of
from flows._stage import BASE_MODEL, TOKENIZER, TOKENS, StageError, as_params, main, metric_name, stage_dir, stage_run
from flows.params import Params
from llm import distributed
from llm.checkpoint import WEIGHTS_FILE, CheckpointMismatch, load_weights, save_model_dir
from llm.data import TokenDataset, unigram_loss
from llm.device import describe, resolve_device
from llm.files import atomic_dir
from llm.generate import generate
from llm.model import GPT, ModelConfig, num_params
from llm.snapshots import SNAPSHOTS_DIR, SnapshotConfig, Snapshots
from llm.step import TrainingDiverged
from llm.tokenizer import load_tokenizer
from llm.train import TrainConfig, TrainResult, bits_per_byte, evaluation_steps, global_tokens_per_step, perplexity, train

OUT = stage_dir("pretrain")
DDP_RANK = "--ddp-rank"                   # argv of the torchrun processes of a multi-device run
FORCE_TORCHRUN_ENV = "LLM_PRETRAIN_TORCHRUN"


def run_key(*parts: dict) -> str:
    """A short hash of everything that decides the training run, to name its checkpoint folder."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# Sampled, not greedy: greedy decoding of a small model loops ("of the of the ..."), which says
# more about greedy decoding than about what the model learned. Seeded, so runs compare.
SAMPLING = dict(temperature=0.8, top_k=50, seed=0)
FINAL_PROMPTS = ("The", "It was a", "In the year")


def sampler(tokenizer):
    def sample(model, prompt: str, max_new_tokens: int) -> str:
        [completion] = generate(model, [tokenizer.encode(prompt)], max_new_tokens, truncate_prompt=True,
                                **SAMPLING)
        return prompt + tokenizer.decode(completion.tokens)
    return sample


def final_samples(model: GPT, tokenizer, max_new_tokens: int) -> list[str]:
    """What the trained model writes after a few everyday openings."""
    model.eval()
    sample = sampler(tokenizer)
    return [sample(model, prompt, max_new_tokens) for prompt in FINAL_PROMPTS]


class Curves:
    """Train and validation curves as CSV files (DVC plots), written as training goes."""

    def __init__(self, folder: Path, tokens_per_step: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.tokens_per_step = tokens_per_step
        self.train = open(folder / "train.csv", "w", newline="")
        self.val = open(folder / "val.csv", "w", newline="")
        self.train_writer = csv.writer(self.train)
        self.val_writer = csv.writer(self.val)
        self.train_writer.writerow(["step", "tokens", "loss", "lr", "grad_norm"])
        self.val_writer.writerow(["step", "tokens", "val_loss", "val_ppl"])

    def add_train(self, step: int, loss: float, lr: float, grad_norm: float) -> None:
        self.train_writer.writerow([step + 1, (step + 1) * self.tokens_per_step, f"{loss:.5f}", f"{lr:.3e}",
                                    f"{grad_norm:.4f}"])

    def add_val(self, step: int, val_loss: float, val_ppl: float) -> None:
        self.val_writer.writerow([step, step * self.tokens_per_step, f"{val_loss:.5f}", f"{val_ppl:.3f}"])
        self.val.flush()

    def close(self) -> None:
        self.train.close()
        self.val.close()


def datasets(model_config: ModelConfig, train_config: TrainConfig, tokenizer) -> tuple[TokenDataset, TokenDataset]:
    """The packed training and validation tokens, as train() reads them (also in each torchrun process)."""
    data_options = dict(seq_len=model_config.context_length, batch_size=train_config.batch_size,
                        with_doc_ids=train_config.doc_masking, expected_fingerprint=tokenizer.fingerprint())
    train_data = TokenDataset(TOKENS / "train.bin", seed=train_config.seed, max_tokens=train_config.train_tokens,
                              **data_options)
    val_data = TokenDataset(TOKENS / "val.bin", seed=train_config.seed + 1, **data_options)
    return train_data, val_data


def pretrain_snapshots(config: SnapshotConfig | None, folder: Path, train_config: TrainConfig, tokenizer,
                       train_data: TokenDataset) -> Snapshots | None:
    """The run's snapshot taker: its evaluations, and the first training row as a probe."""
    return snapshots_of(config, folder, evaluation_steps(train_config), train_data.batch(0)[0][0].tolist(), tokenizer)


def callbacks(curves: Curves, log_metrics, info, snapshots: Snapshots | None = None, model: GPT | None = None):
    """train()'s on_step / on_eval: curves, MLflow metrics, samples in the log, snapshots."""
    def on_step(step: int, m: dict) -> None:
        curves.add_train(step, m["loss"], m["lr"], m["grad_norm"])
        log_metrics({k: v for k, v in m.items() if v is not None}, step=step + 1)

    def on_eval(step: int, m: dict) -> None:
        curves.add_val(step, m["val_loss"], m["val_ppl"])
        log_metrics({"val_loss": m["val_loss"], "val_ppl": m["val_ppl"]}, step=step)
        if m.get("sample"):
            info(f"sample at step {step}: {m['sample']!r}")
        snapshot(snapshots, model, step, m["val_loss"], log_metrics, info)

    return on_step, on_eval


@flow(name="pretrain", log_prints=True, validate_parameters=False)
def pretrain_flow(params: Params, node_rank: int = 0) -> dict:
    """The stage; node_rank > 0: one of the other hosts of a several-host run, which only trains."""
    params = as_params(params)
    p = params.pretrain
    log = get_run_logger()
    tokenizer = load_tokenizer(TOKENIZER)
    model_config = p.model.build()
    if p.model.vocab_size is None:
        model_config.vocab_size = tokenizer.vocab_size  # the model's vocabulary is the tokenizer's
    elif p.model.vocab_size < tokenizer.vocab_size:
        raise StageError(f"pretrain.model.vocab_size={p.model.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} ids; leave it unset to use the tokenizer's")
    train_config = p.train.build()
    try:
        # Multi-device: the processes to train with on this host (1: train in this process, as always).
        devices = distributed.resolve_devices(p.devices, train_config.device)
        train_data, val_data = datasets(model_config, train_config, tokenizer)
        tokens_per_step = global_tokens_per_step(train_config, model_config.context_length, devices * p.nodes)
    except ValueError as err:
        raise StageError(str(err)) from err
    # Sharded checkpoints are another format: an fsdp run keeps its own folder (ddp keys stay as they were).
    key = run_key(model_config.to_dict(), {k: v for k, v in vars(train_config).items() if k != "progress"},
                  train_data.meta["tokenizer_fingerprint"], train_data.meta["num_tokens"],
                  *([{"sharding": p.sharding}] if p.sharding != "ddp" else []))
    checkpoints = OUT / "checkpoints" / key
    nodes = p.launch(node_rank, run_id=f"pretrain-{key}")
    if node_rank > 0:   # another host: its processes train with node 0's; node 0 finishes the stage
        train_with_torchrun(devices, model_config, train_config, checkpoints, tokens_per_step, None, nodes, p.sharding)
        return {}
    if train_config.resume == "never":
        shutil.rmtree(checkpoints / SNAPSHOTS_DIR, ignore_errors=True)   # the run starts over: so do its snapshots
    snapshot_config = p.snapshots.build()
    snapshots = pretrain_snapshots(snapshot_config, checkpoints / SNAPSHOTS_DIR, train_config, tokenizer, train_data)
    torch.manual_seed(train_config.seed)  # the initial weights too: same params, same model
    model = GPT(model_config)
    shape = p.model.preset + (f" at depth {p.model.depth}" if p.model.depth else "")
    log.info(f"model: {num_params(model):,} parameters ({shape}: {model_config.n_layer} layers, "
             f"{model_config.d_model} wide); run key {key}; "
             f"{train_data.meta['num_tokens']:,} training tokens")

    if p.sharding == "fsdp" and devices * p.nodes == 1:
        log.info("note: pretrain.sharding fsdp with one process shards nothing: it trains as one process and "
                 "writes sharded checkpoints, which several processes can resume")

    with stage_run("pretrain", params, system_metrics=True) as stage:
        machine = describe(resolve_device(train_config.device))   # the precisions and matmul rates of this run
        stage.log_params(machine, "machine")
        log.info("machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()))
        snapshot(snapshots, model, 0, None, stage.log_metrics, log.info)   # the untrained model
        if devices > 1 or p.nodes > 1 or os.environ.get(FORCE_TORCHRUN_ENV) == "1":
            # Multi-device: torchrun processes train; rank 0 writes curves, metrics, checkpoints.
            result = train_with_torchrun(devices, model_config, train_config, checkpoints, tokens_per_step,
                                         stage.run.info.run_id, nodes, p.sharding,
                                         snapshot_config)
            load_weights(model, result.checkpoint / WEIGHTS_FILE)
        else:
            curves = Curves(OUT / "curves", tokens_per_step)
            on_step, on_eval = callbacks(curves, stage.log_metrics, log.info, snapshots, model)
            try:
                result = train(model, train_data, val_data, train_config, checkpoints,
                               on_step=on_step, on_eval=on_eval, sample_fn=sampler(tokenizer), sharding=p.sharding)
            except (TrainingDiverged, CheckpointMismatch) as err:
                raise StageError(str(err)) from err
            finally:
                curves.close()
        rewrite_curves(OUT / "curves", result.history, tokens_per_step)

        with atomic_dir(BASE_MODEL) as tmp:
            save_model_dir(model, tokenizer, tmp)  # the tokenizer as the tokenizer stage saved it
            if snapshots is not None:
                snapshots.finish(model, result.history, tmp / SNAPSHOTS_DIR)
        for stale in (OUT / "checkpoints").iterdir():
            if stale.name != key:  # checkpoints of settings no longer in params
                shutil.rmtree(stale)
        version = stage.log_model(BASE_MODEL, f"{params.project.name}-base" if p.register_model else None)
        for path in (OUT / "curves" / "train.csv", OUT / "curves" / "val.csv"):
            stage.log_artifact(path, "curves")

        # The context-blind baseline: a model that does not beat it has learned no word order.
        unigram = unigram_loss(train_data.tokens, val_data.tokens, model_config.vocab_size)
        metrics = {
            "parameters": num_params(model), "steps": result.steps, "tokens_seen": result.tokens_seen,
            "train_loss": result.train_loss, "val_loss": result.val_loss, "val_ppl": result.val_ppl,
            "unigram_val_loss": unigram,
            **text_measures(result.val_loss, val_data.meta, model),
            "tokens_per_s": result.tokens_per_s, "elapsed_s": result.elapsed_s,
            "resumed_from_step": result.resumed_from or 0, "registered_version": int(version or 0),
            **snapshot_metrics(BASE_MODEL / SNAPSHOTS_DIR),
            **result.diagnosis.metrics(),
        }
        samples = final_samples(model, tokenizer, max(train_config.sample_tokens, 32))
        (OUT / "samples.txt").write_text("\n\n".join(samples) + "\n")
        stage.log_artifact(OUT / "samples.txt")
        for text in samples:
            log.info(f"sample: {text!r}")
        summary = (f"{metrics['parameters']:,} parameters, {result.steps} steps, {result.tokens_seen:,} tokens, "
                   f"{result.tokens_per_s:,.0f} tokens/s.\n\n"
                   f"| train loss | val loss | val ppl | unigram baseline (val) |\n|---|---|---|---|\n"
                   f"| {result.train_loss:.3f} | {result.val_loss or float('nan'):.3f} | "
                   f"{result.val_ppl or float('nan'):.1f} | {unigram:.3f} |\n\n"
                   f"**Loss curve**: {result.diagnosis.report()}\n\n"
                   f"**Samples** (temperature {SAMPLING['temperature']}, top-k {SAMPLING['top_k']}):\n\n"
                   + "\n".join(f"- {text!r}" for text in samples))
        return stage.finish(metrics, summary)


def text_measures(val_loss: float | None, meta: dict, model: GPT) -> dict:
    """What compares across vocabularies: validation bits per byte, tokens per word of the
    validation text, and the share of parameters spent on embeddings (when the pack stage
    recorded the text's bytes and words)."""
    out = {"embedding_share": 1 - num_params(model, non_embedding=True) / num_params(model)}
    if meta.get("bytes") and meta.get("words"):
        out["val_tokens_per_word"] = meta["num_tokens"] / meta["words"]
        if val_loss is not None:
            out["val_bits_per_byte"] = bits_per_byte(val_loss, meta["num_tokens"], meta["bytes"])
    return out


def rewrite_curves(folder: Path, history: dict, tokens_per_step: int) -> None:
    """After a resume the CSVs hold only this invocation's steps: rewrite them from the full history."""
    c = Curves(folder, tokens_per_step)
    lrs = dict(history.get("lr", []))
    norms = dict(history.get("grad_norm", []))
    for step, loss in history.get("train_loss", []):
        c.add_train(step, loss, lrs.get(step, 0.0), norms.get(step, 0.0))
    for step, loss in history.get("val_loss", []):
        c.add_val(step, loss, perplexity(loss))
    c.close()


# --- several devices: torchrun processes ------------------------------------------------------------

def train_with_torchrun(devices: int, model_config: ModelConfig, train_config: TrainConfig, checkpoints: Path,
                        tokens_per_step: int, mlflow_run_id: str | None,
                        nodes: distributed.Nodes = distributed.ONE_HOST, sharding: str = "ddp",
                        snapshot_config: SnapshotConfig | None = None) -> TrainResult | None:
    """Train in `devices` processes (on each of `nodes`) under torchrun and wait for the result,
    whose checkpoint holds the trained weights. A host other than node 0 gets None.

    The processes get the configs in a job file and run `ddp_rank`; rank 0 (on node 0) writes the
    result (or the error) back to a file. Only this process talks to Prefect; rank 0 logs to MLflow."""
    log = get_run_logger()
    with tempfile.TemporaryDirectory(prefix="pretrain-ddp-") as tmp:
        job, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job.write_text(json.dumps({"model": model_config.to_dict(), "train": train_config.to_dict(),
                                   "checkpoints": str(checkpoints), "tokens_per_step": tokens_per_step,
                                   "mlflow_run_id": mlflow_run_id, "result": str(result_file),
                                   "sharding": sharding,
                                   "snapshots": snapshot_config.to_dict() if snapshot_config else None}))
        target = ["-m", "flows.pretrain", DDP_RANK, str(job)]
        command = distributed.torchrun_command(devices, target, nodes=nodes)
        log.info(f"training in {devices} process(es) on node {nodes.rank} of {nodes.count}: {' '.join(command)}")
        try:
            status = distributed.run_torchrun(devices, target, nodes=nodes)
        except distributed.RendezvousTimeout as err:
            raise StageError(str(err)) from err
        outcome = json.loads(result_file.read_text()) if result_file.exists() else None
    if outcome is not None and "error" in outcome:
        raise StageError(outcome["error"])
    if status != 0:
        raise StageError(f"torchrun exited with status {status}; the processes' output is above")
    if nodes.rank > 0:
        return None
    if outcome is None:
        raise StageError("torchrun's processes finished without a result; their output is above")
    result = TrainResult.from_dict(outcome)
    log.info(f"trained in {devices} process(es): {result.tokens_per_s:,.0f} tokens/s")
    return result


def ddp_rank(job_file: Path) -> None:
    """One torchrun process of train_with_torchrun. All ranks train together (llm.train joins
    the process group); rank 0 also writes the curves, logs step metrics to the stage's MLflow
    run and writes the result file. The checkpoints are written by rank 0 inside train()."""
    job = json.loads(job_file.read_text())
    rank = distributed.from_env().rank
    tokenizer = load_tokenizer(TOKENIZER)
    model_config, train_config = ModelConfig.from_dict(job["model"]), TrainConfig.from_dict(job["train"])
    train_data, val_data = datasets(model_config, train_config, tokenizer)
    torch.manual_seed(train_config.seed)
    model = GPT(model_config)   # DDP copies rank 0's initial weights to every rank
    curves, on_step, on_eval = None, None, None
    if rank == 0:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        from flows.environment import mlflow_tracking_uri
        client = MlflowClient(mlflow_tracking_uri())

        def log_metrics(metrics: dict, step: int = 0) -> None:
            now = int(time.time() * 1000)
            client.log_batch(job["mlflow_run_id"], metrics=[Metric(metric_name(k), float(v), now, step)
                                                            for k, v in metrics.items()])

        curves = Curves(OUT / "curves", job["tokens_per_step"])
        # A sharded model is whole on no process: rank 0 alone cannot run it (llm.train skips samples so too).
        whole = job["sharding"] != "fsdp" or distributed.from_env().world_size == 1
        if job["snapshots"] and not whole:
            print("note: with sharding fsdp, evaluations take no snapshots (the model is whole on no process); "
                  "the snapshot of step 0 is kept")
        config = SnapshotConfig.from_dict(job["snapshots"]) if job["snapshots"] and whole else None
        snapshots = pretrain_snapshots(config, Path(job["checkpoints"]) / SNAPSHOTS_DIR, train_config, tokenizer,
                                       train_data)
        on_step, on_eval = callbacks(curves, log_metrics, print, snapshots, model)
    try:
        result = train(model, train_data, val_data, train_config, job["checkpoints"],
                       on_step=on_step, on_eval=on_eval, sample_fn=sampler(tokenizer), sharding=job["sharding"])
    except (TrainingDiverged, CheckpointMismatch) as err:
        if rank == 0:
            Path(job["result"]).write_text(json.dumps({"error": str(err)}))
        sys.exit(f"error: {err}")
    finally:
        if curves is not None:
            curves.close()
    if rank == 0:
        Path(job["result"]).write_text(json.dumps(result.to_dict()))


NODE_RANK_OPTION = {"--node-rank": dict(type=int, default=0, dest="node_rank", help=(
    "this host's place in a several-host run (pretrain.nodes): 0 on the host that runs `dvc repro` and "
    "finishes the stage, 1 .. nodes-1 on the others, which only train"))}

if __name__ == "__main__":
    if sys.argv[1:2] == [DDP_RANK]:   # a process started by train_with_torchrun
        ddp_rank(Path(sys.argv[2]))
    else:
        main(pretrain_flow, "pretrain", options=NODE_RANK_OPTION)
