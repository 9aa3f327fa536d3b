"""Several processes training one model (DDP, gloo on the CPU) give the single-process loss curve.

The multi-process runs are real: `torchrun --standalone --nproc_per_node=2` starts this file as a
script (the `__main__` part at the bottom), and its two processes train with llm.train.train,
exactly as the pretrain stage's torchrun processes do.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # when torchrun runs this file as a script

from train_driver import CONTEXT, tiny_model_config  # noqa: E402

from llm import distributed  # noqa: E402
from llm.checkpoint import STATE_FILE, CheckpointMismatch, checkpoint_name  # noqa: E402
from llm.distributed import Dist  # noqa: E402
from llm.model import GPT  # noqa: E402
from llm.train import (  # noqa: E402
    TrainConfig,
    TrainResult,
    accumulation_steps,
    global_tokens_per_step,
    load_datasets,
    micro_batch_index,
    train,
)

PROCESSES = 2


def accumulating_config(**overrides) -> TrainConfig:
    """8 rows per update: 4 micro-batches of 2 in one process, 2 in each of two. Evaluations over
    3 batches (shared unevenly between two ranks), document masking, checkpoints every 3 steps."""
    values = dict(lr=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=6, batch_size=2, tokens_per_step=8 * CONTEXT,
                  eval_every=3, eval_steps=3, checkpoint_every=3, keep_checkpoints=5, sample_tokens=0,
                  doc_masking=True, threads=1, seed=1, progress=False)
    return TrainConfig(**{**values, **overrides})


def per_process_config(**overrides) -> TrainConfig:
    """tokens_per_step=0: one micro-batch per process, so the global batch grows with the processes."""
    values = dict(lr=3e-3, min_lr=3e-4, warmup_steps=1, max_steps=2, batch_size=2, tokens_per_step=0,
                  eval_every=0, eval_steps=1, checkpoint_every=1, keep_checkpoints=5, sample_tokens=0,
                  threads=1, seed=1, progress=False)
    return TrainConfig(**{**values, **overrides})


def run_training(data_dir: Path, out_dir: Path, config: TrainConfig) -> tuple[GPT, TrainResult]:
    torch.manual_seed(0)   # the initial weights (DDP copies rank 0's to the other rank)
    model = GPT(tiny_model_config())
    train_data, val_data = load_datasets(data_dir / "train.bin", data_dir / "val.bin", CONTEXT, config)
    return model, train(model, train_data, val_data, config, out_dir)


def values(result: TrainResult, name: str) -> list[float]:
    return [v for _, v in result.history[name]]


def ddp_report(out: Path, name: str, rank: int = 0) -> dict:
    return json.loads((out / f"{name}.rank{rank}.json").read_text())


# --- pure bookkeeping ---------------------------------------------------------------------------

@pytest.mark.parametrize("accumulation, world_size", [(1, 1), (4, 1), (1, 2), (2, 2), (3, 4)])
def test_each_update_reads_the_same_batches_whatever_the_number_of_processes(accumulation, world_size):
    group = accumulation * world_size
    for step in range(3):
        read = sorted(micro_batch_index(step, micro, accumulation, Dist(rank, rank, world_size))
                      for rank in range(world_size) for micro in range(accumulation))
        assert read == list(range(step * group, (step + 1) * group))   # each batch once, none else
    assert [micro_batch_index(5, i, 3) for i in range(3)] == [15, 16, 17]   # one process: as before


def test_global_batch_and_accumulation_across_processes():
    config = TrainConfig(batch_size=4, tokens_per_step=1024)
    assert accumulation_steps(config, 32, world_size=2) == 4
    assert global_tokens_per_step(config, 32, 1) == global_tokens_per_step(config, 32, 8) == 1024
    assert global_tokens_per_step(TrainConfig(batch_size=4), 32, world_size=3) == 3 * 4 * 32
    with pytest.raises(ValueError, match=r"tokens_per_step=1024 must be a multiple of batch_size \* seq_len \* "
                                         r"processes = 4 \* 32 \* 16 = 2048"):
        accumulation_steps(config, 32, world_size=16)


def test_device_counts():
    assert distributed.resolve_devices(1) == 1
    assert distributed.resolve_devices(3, "cpu") == 3          # gloo processes on a CPU, for tests
    if not torch.cuda.is_available():
        assert distributed.resolve_devices("auto") == 1
        assert distributed.resolve_devices("auto", "cpu") == 1
    with pytest.raises(ValueError, match="devices must be 'auto' or a count >= 1"):
        distributed.resolve_devices(0)
    assert distributed.from_env() == distributed.SINGLE        # not started by torchrun
    command = distributed.torchrun_command(2, ["-m", "flows.pretrain", "--ddp-rank", "job.json"])
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "flows.pretrain", "--ddp-rank", "job.json"]


def test_devices_in_params_is_auto_or_a_positive_count():
    from flows.params import PretrainParams
    assert PretrainParams().devices == 1
    assert PretrainParams.model_validate({"devices": "auto"}).devices == "auto"
    assert PretrainParams.model_validate({"devices": 4}).devices == 4
    for bad in (0, "all", 1.5):
        with pytest.raises(ValueError):
            PretrainParams.model_validate({"devices": bad})


# --- two processes against one ------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_process_runs(data_dir, tmp_path_factory) -> Path:
    """Both configs trained by 2 processes under torchrun, once for the module (the slow part)."""
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = distributed.torchrun_command(PROCESSES, [__file__, str(data_dir), str(out)])
    finished = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
                              stdin=subprocess.DEVNULL)
    assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-4000:]
    return out


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_two_processes_follow_the_single_process_loss_curve(data_dir, two_process_runs, tmp_path):
    model, single = run_training(data_dir, tmp_path / "single", accumulating_config())
    ddp, rank_1 = ddp_report(two_process_runs, "accumulating"), ddp_report(two_process_runs, "accumulating", 1)
    assert ddp["world_size"] == PROCESSES and ddp["tokens_per_step"] == single.tokens_per_step == 8 * CONTEXT
    # Both ranks report the same numbers: the loss is averaged over them, the evaluation shared.
    assert rank_1 == ddp
    assert ddp["train_loss"] == pytest.approx(values(single, "train_loss"), rel=1e-5)
    assert ddp["val_loss"] == pytest.approx(values(single, "val_loss"), rel=1e-5)
    assert ddp["grad_norm"] == pytest.approx(values(single, "grad_norm"), rel=1e-4)
    final = two_process_runs / "accumulating" / "checkpoints" / checkpoint_name(6)
    ddp_model = GPT(tiny_model_config())
    from safetensors.torch import load_model
    load_model(ddp_model, str(final / "model.safetensors"))
    for p, q in zip(model.parameters(), ddp_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)
    # Each rank's RNG state is in the checkpoint, so two processes can resume exactly.
    state = torch.load(final / STATE_FILE, weights_only=True)
    assert len(state["rng_per_rank"]) == PROCESSES
    assert json.loads((final / "train_config.json").read_text())["world_size"] == PROCESSES


def test_a_two_process_checkpoint_resumes_in_one_process(data_dir, two_process_runs, tmp_path):
    _, single = run_training(data_dir, tmp_path / "single", accumulating_config())
    halfway = checkpoint_name(3)
    shutil.copytree(two_process_runs / "accumulating" / "checkpoints" / halfway,
                    tmp_path / "resumed" / "checkpoints" / halfway)
    _, resumed = run_training(data_dir, tmp_path / "resumed", accumulating_config())
    ddp = ddp_report(two_process_runs, "accumulating")
    assert resumed.resumed_from == 3 and len(resumed.history["train_loss"]) == 6
    assert values(resumed, "train_loss")[:3] == ddp["train_loss"][:3]   # the checkpoint's history
    assert values(resumed, "train_loss") == pytest.approx(values(single, "train_loss"), rel=1e-5)
    assert values(resumed, "val_loss") == pytest.approx(values(single, "val_loss"), rel=1e-5)
    # A result survives JSON, as the pretrain stage's rank 0 hands it to the flow.
    again = TrainResult.from_dict(json.loads(json.dumps(resumed.to_dict())))
    assert again.history == resumed.history and again.checkpoint == resumed.checkpoint
    assert again.diagnosis == resumed.diagnosis and again.train_loss == resumed.train_loss


def test_a_changed_global_batch_is_refused_and_the_message_says_how_to_keep_it(data_dir, two_process_runs, tmp_path):
    # Two processes with tokens_per_step=0 made updates of 2 x 2 rows; one process would make 2.
    first = checkpoint_name(1)
    shutil.copytree(two_process_runs / "per_process" / "checkpoints" / first, tmp_path / "checkpoints" / first)
    with pytest.raises(CheckpointMismatch, match=rf"global_tokens_per_step \(checkpoint {4 * CONTEXT}, "
                                                 rf"now {2 * CONTEXT}\).*2 process\(es\).*"
                                                 rf"with 2 process\(es\) as before, or set tokens_per_step: {4 * CONTEXT}"):
        run_training(data_dir, tmp_path, per_process_config())
    # Following the advice continues the same curve in one process (2 micro-batches of 2 rows).
    _, resumed = run_training(data_dir, tmp_path, per_process_config(tokens_per_step=4 * CONTEXT))
    ddp = ddp_report(two_process_runs, "per_process")
    assert resumed.resumed_from == 1
    assert values(resumed, "train_loss") == pytest.approx(ddp["train_loss"], rel=1e-5)


# --- the pretrain stage on two processes ------------------------------------------------------------

def stage_workspace(root: Path, **train_overrides) -> tuple[Path, dict]:
    """A folder with what the pretrain stage reads (a small BPE tokenizer, packed tokens) and params."""
    import yaml

    from llm.data import write_token_file
    from llm.tokenizer import ENDOFTEXT, train_sentencepiece

    import sample_sources as samples

    repo = root / "repo"
    params = samples.tiny_pipeline_params(root)
    texts = [f.read_text() for f in sorted((root / "corpus").glob("*.txt"))]
    tokenizer = train_sentencepiece(texts, "bpe", 400, num_threads=1, progress=False)
    tokenizer.save(repo / "data/tokenizer/model")
    for split, docs in (("train", texts[:36]), ("val", texts[36:])):
        write_token_file(repo / f"data/pack/tokens/{split}.bin", [tokenizer.encode(t) for t in docs],
                         vocab_size=tokenizer.vocab_size, boundary_id=tokenizer.special_tokens[ENDOFTEXT],
                         tokenizer_fingerprint=tokenizer.fingerprint())
    params["pretrain"]["devices"] = 2
    params["pretrain"]["train"].update(max_steps=6, eval_every=3, checkpoint_every=3, device="cpu",
                                       batch_size=4, tokens_per_step=0, **train_overrides)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return repo, params


def run_stage(repo: Path, prefect_api: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}", "PREFECT_API_URL": prefect_api}
    env.pop("LLM_PIPELINE_RUN_ID", None)
    return subprocess.run([sys.executable, "-m", "flows.pretrain"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.e2e
def test_pretrain_stage_trains_on_two_processes_and_refuses_to_continue_on_one(prefect_api, tmp_path):
    import yaml
    from mlflow.tracking import MlflowClient

    repo, params = stage_workspace(tmp_path)
    finished = run_stage(repo, prefect_api)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert "torch.distributed.run --standalone --nproc_per_node=2 -m flows.pretrain --ddp-rank" in finished.stderr
    metrics = json.loads((repo / "data/pretrain/metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["tokens_seen"] == 6 * 2 * 4 * 64   # 2 processes x 4 rows x 64
    curve = (repo / "data/pretrain/curves/train.csv").read_text().splitlines()
    assert curve[0] == "step,tokens,loss,lr,grad_norm" and len(curve) == 7 and curve[-1].startswith("6,3072,")
    assert len((repo / "data/pretrain/curves/val.csv").read_text().splitlines()) == 3
    # Rank 0 logged every step into the stage's MLflow run; the stage registered the trained model.
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("tests").experiment_id], "tags.`llm.stage` = 'pretrain'")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 7))
    assert client.get_metric_history(run.info.run_id, "loss")[-1].value == pytest.approx(metrics["train_loss"])
    assert client.search_model_versions("name = 'testllm-base'")[0].run_id == run.info.run_id
    from safetensors.torch import load_file

    from llm.checkpoint import latest_checkpoint
    [checkpoints] = list((repo / "data/pretrain/checkpoints").iterdir())
    final, model = load_file(latest_checkpoint(checkpoints / "checkpoints") / "model.safetensors"), load_file(
        repo / "data/pretrain/model/model.safetensors")
    assert final.keys() == model.keys() and all(torch.equal(final[k], model[k]) for k in final)
    # Snapshots: step 0 taken by the flow, the evaluations by rank 0, all in the model folder.
    from llm.snapshots import list_steps
    assert list_steps(repo / "data/pretrain/model/snapshots") == [0, 3, 6] and metrics["snapshots"] == 3
    assert [m.step for m in client.get_metric_history(run.info.run_id, "snapshot.probe_text_bits")] == [0, 3, 6]

    # The same settings on one device would continue with half the global batch: refused, clearly.
    params["pretrain"]["devices"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    refused = run_stage(repo, prefect_api)
    assert refused.returncode != 0
    assert "global_tokens_per_step (checkpoint 512, now 256)" in refused.stderr
    assert "Continue it with 2 process(es) as before, or set tokens_per_step: 512" in refused.stderr


# --- run by torchrun: each of the processes -----------------------------------------------------

def _each_process(data_dir: Path, out: Path) -> None:
    where = distributed.from_env()
    assert where.world_size == PROCESSES, "run me under torchrun --nproc_per_node=2"
    torch.set_num_threads(1)
    for name, config in (("accumulating", accumulating_config()), ("per_process", per_process_config())):
        _, result = run_training(data_dir, out / name, config)
        report = {"world_size": where.world_size, "tokens_per_step": result.tokens_per_step,
                  "train_loss": values(result, "train_loss"), "val_loss": values(result, "val_loss"),
                  "grad_norm": values(result, "grad_norm")}
        (out / f"{name}.rank{where.rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    _each_process(Path(sys.argv[1]), Path(sys.argv[2]))
