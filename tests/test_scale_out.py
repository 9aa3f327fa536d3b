"""Scale out: two hosts joined by torchrun's rendezvous, and sharded training (FSDP2), on the CPU.

The two "hosts" are two torchrun launchers on 127.0.0.1, one process each, node ranks 0 and 1,
meeting at node 0's rendezvous endpoint, as two machines would (`--nnodes=2 --node-rank=R
--rdzv-endpoint=NODE0:PORT`).
Their processes run this file as a script (the `__main__` part at the bottom): each trains the
same tiny model with DDP and with FSDP, with AdamW and with Muon, and reports its losses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # when torchrun runs this file as a script
sys.path.insert(0, str(ROOT / "tests"))

from train_driver import CONTEXT, tiny_model_config  # noqa: E402

from llm import distributed  # noqa: E402
from llm.checkpoint import CheckpointMismatch, checkpoint_name  # noqa: E402
from llm.model import GPT  # noqa: E402
from llm.sharded import DCP_DIR  # noqa: E402
from llm.train import TrainConfig, TrainResult, load_datasets, train  # noqa: E402

# (name, sharding, optimizer) of the runs each process of the two hosts makes
RUNS = (("ddp", "ddp", "adamw"), ("fsdp", "fsdp", "adamw"), ("ddp-muon", "ddp", "muon"), ("fsdp-muon", "fsdp", "muon"))


def config(**overrides) -> TrainConfig:
    """8 rows per update: 4 micro-batches of 2 in one process, 2 in each of two (accumulation
    exercises DDP's no_sync and FSDP's deferred reduce-scatter); checkpoints every 3 steps."""
    values = dict(lr=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=6, batch_size=2, tokens_per_step=8 * CONTEXT,
                  eval_every=3, eval_steps=3, checkpoint_every=3, keep_checkpoints=5, sample_tokens=0,
                  threads=1, seed=1, progress=False)
    return TrainConfig(**{**values, **overrides})


def run_training(data_dir: Path, out_dir: Path, train_config: TrainConfig, sharding: str = "ddp") -> TrainResult:
    torch.manual_seed(0)   # the initial weights
    model = GPT(tiny_model_config())
    train_data, val_data = load_datasets(data_dir / "train.bin", data_dir / "val.bin", CONTEXT, train_config)
    return train(model, train_data, val_data, train_config, out_dir, sharding=sharding)


def losses(result: TrainResult, name: str = "train_loss") -> list[float]:
    return [v for _, v in result.history[name]]


def env_with_root() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def two_hosts(data_dir, tmp_path_factory) -> dict:
    """Every run of RUNS trained by two launchers joined as two hosts (the slow part, once)."""
    from conftest import free_port

    out = tmp_path_factory.mktemp("two-hosts")
    endpoint = f"127.0.0.1:{free_port()}"
    began = time.monotonic()
    launchers = []
    for rank in (0, 1):
        nodes = distributed.Nodes(count=2, rank=rank, endpoint=endpoint, run_id="test-two-hosts", join_timeout_s=60)
        command = distributed.torchrun_command(1, [__file__, str(data_dir), str(out)], nodes=nodes)
        launchers.append(subprocess.Popen(command, cwd=ROOT, env=env_with_root(), stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL))
    try:
        outputs = [launcher.communicate(timeout=180)[0] for launcher in launchers]
    finally:
        for launcher in launchers:   # after a failure: no launcher left waiting for its partner
            launcher.kill()
    for launcher, output in zip(launchers, outputs):
        assert launcher.returncode == 0, output[-4000:]
    reports = {rank: json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)}
    return {"out": out, "reports": reports, "seconds": time.monotonic() - began}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- two hosts ----------------------------------------------------------------------------------

def test_two_hosts_follow_the_one_process_loss_curve(data_dir, two_hosts, tmp_path):
    single = run_training(data_dir, tmp_path, config())
    first, second = two_hosts["reports"][0], two_hosts["reports"][1]
    assert first["world_size"] == 2 and {first["local_world_size"], second["local_world_size"]} == {1}
    assert (first["node_rank"], second["node_rank"]) == (0, 1)   # node 0 holds global rank 0
    assert first["ddp"] == second["ddp"]   # the loss is averaged over the ranks: both report the same
    # Not bitwise: each update's gradient is the sum of two half-batch gradients (all-reduce)
    # instead of one whole-batch one, and float addition is not associative; 1e-5 is a few
    # hundred float32 roundings of a loss near 4, far below a real difference (a single step of
    # a different batch moves the loss by more than 1e-2).
    assert first["ddp"]["train_loss"] == pytest.approx(losses(single), rel=1e-5)
    assert first["ddp"]["val_loss"] == pytest.approx(losses(single, "val_loss"), rel=1e-5)
    assert first["ddp"]["train_loss"][-1] < first["ddp"]["train_loss"][0] - 0.1   # it learned something


@pytest.mark.parametrize("rank", [0, 1])
def test_a_host_that_never_joins_stops_the_other_with_a_message(rank, tmp_path):
    """Node 0 alone waits for node 1 in vain; node 1 alone finds nobody at node 0's endpoint."""
    from conftest import free_port

    nodes = distributed.Nodes(count=2, rank=rank, endpoint=f"127.0.0.1:{free_port()}", run_id="test-alone",
                              join_timeout_s=2)
    (tmp_path / "script.py").write_text("open('ran', 'w')\n")
    began = time.monotonic()
    with pytest.raises(distributed.RendezvousTimeout, match=r"not all 2 hosts joined the rendezvous at "
                                                            rf"127\.0\.0\.1:\d+ .*within 2 s \(this is node {rank};"):
        distributed.run_torchrun(1, ["script.py"], nodes=nodes, cwd=str(tmp_path))
    assert not (tmp_path / "ran").exists()
    assert time.monotonic() - began < 60


def test_the_launch_lines():
    one = distributed.torchrun_command(2, ["-m", "x"])
    assert one[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "x"]
    two = distributed.torchrun_command(8, ["-m", "x"], nodes=distributed.Nodes(2, 1, "node0:29500", "run7", 120))
    assert two[3:] == ["--nnodes=2", "--node-rank=1", "--rdzv-backend=static", "--rdzv-endpoint=node0:29500",
                       "--rdzv-id=run7", "--rdzv-conf=timeout=120", "--nproc_per_node=8", "-m", "x"]
    with pytest.raises(ValueError, match="Nodes.count=2 needs an endpoint HOST:PORT"):
        distributed.Nodes(count=2)
    with pytest.raises(ValueError, match="Nodes.endpoint must be HOST:PORT, got 'node0'"):
        distributed.Nodes(count=2, endpoint="node0")
    with pytest.raises(ValueError, match=r"Nodes.rank must be in \[0, count=2\), got 2"):
        distributed.Nodes(count=2, rank=2, endpoint="node0:1")


def test_params_refuse_several_nodes_without_an_endpoint(tmp_path):
    import yaml

    from flows.params import ConfigError, load_params

    data = {"download": {"sources": [{"name": "a", "uri": "file:x.txt", "role": "pretrain"}]},
            "pretrain": {"nodes": 2}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"pretrain\.rendezvous: nodes=2 needs the rendezvous endpoint HOST:PORT"):
        load_params(tmp_path / "params.yaml")
    data["pretrain"].update(rendezvous="node0:29500", sharding="fsdp")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    pretrain = load_params(tmp_path / "params.yaml").pretrain
    assert pretrain.launch().endpoint == "node0:29500" and pretrain.sharding == "fsdp"
    data["pretrain"].update(sharding="zero3")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"pretrain\.sharding: Input should be 'ddp' or 'fsdp'"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.e2e
def test_on_a_pool_each_node_gets_a_run_on_its_queue_and_a_missing_worker_cancels_all(prefect_api, tmp_path,
                                                                                       monkeypatch, capsys):
    import uuid

    import yaml
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    from flows._stage import main
    from flows.deploy import deploy
    from flows.pretrain import pretrain_flow

    pool, pipeline = f"nodes-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex[:8]
    monkeypatch.setenv("LLM_PIPELINE_RUN_ID", pipeline)
    deploy(pool, ROOT)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "execution": {"mode": "pool", "pool": pool, "stages": ["pretrain"], "pickup_timeout_s": 2},
        "download": {"sources": [{"name": "a", "uri": "file:x.txt", "role": "pretrain"}]},
        "pretrain": {"nodes": 2, "rendezvous": "127.0.0.1:29400"}}))
    with pytest.raises(SystemExit) as failed:   # what `dvc repro` runs: python -m flows.pretrain
        main(pretrain_flow, "pretrain", ["--params", str(tmp_path / "params.yaml")])
    assert "no worker picked up 'pretrain' (node 0) within 2 s: start one on its node's queue" in str(failed.value)
    output = capsys.readouterr().out
    assert "on work queue node-0" in output and "on work queue node-1" in output
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"pipeline:{pipeline}"])))
    assert sorted((r.parameters["node_rank"], r.work_queue_name, r.state.type.value) for r in runs) == [
        (0, "node-0", "CANCELLED"), (1, "node-1", "CANCELLED")]


@pytest.mark.e2e
def test_the_pretrain_stage_on_two_hosts_sharded(prefect_api, tmp_path):
    """Node 0 runs the stage, node 1 joins with --node-rank 1 (the same repository folder, as an
    NFS share would give it); FSDP over the two. Node 0 alone finishes the stage."""
    import yaml
    from safetensors.torch import load_file
    from test_distributed import stage_workspace

    from llm.checkpoint import latest_checkpoint

    from conftest import free_port

    repo, params = stage_workspace(tmp_path)
    params["pretrain"].update(devices=1, nodes=2, rendezvous=f"127.0.0.1:{free_port()}", sharding="fsdp",
                              join_timeout_s=120)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**env_with_root(), "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}", "PREFECT_API_URL": prefect_api}
    env.pop("LLM_PIPELINE_RUN_ID", None)
    hosts = [subprocess.Popen([sys.executable, "-m", "flows.pretrain", *extra], cwd=repo, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for extra in ([], ["--node-rank", "1"])]
    try:
        outputs = [host.communicate(timeout=300)[0] for host in hosts]
    finally:
        for host in hosts:
            host.kill()
    for host, output in zip(hosts, outputs):
        assert host.returncode == 0, output[-4000:]
    assert "--nnodes=2 --node-rank=0 --rdzv-backend=static" in outputs[0]
    assert "--nnodes=2 --node-rank=1 --rdzv-backend=static" in outputs[1]
    metrics = json.loads((repo / "data/pretrain/metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["tokens_seen"] == 6 * 2 * 4 * 64   # 2 hosts x 4 rows x 64 tokens
    [run_dir] = list((repo / "data/pretrain/checkpoints").iterdir())
    final = latest_checkpoint(run_dir / "checkpoints")
    assert (final / DCP_DIR / ".metadata").is_file()
    weights, model = load_file(final / "model.safetensors"), load_file(repo / "data/pretrain/model/model.safetensors")
    assert weights.keys() == model.keys() and all(torch.equal(weights[k], model[k]) for k in weights)
    # Sharded, the model is whole on no process: only the untrained model's snapshot is taken.
    from llm.snapshots import list_steps
    assert list_steps(repo / "data/pretrain/model/snapshots") == [0] and "evaluations take no snapshots" in outputs[0]


# --- sharded training ---------------------------------------------------------------------------

def test_fsdp_gives_the_losses_of_ddp(two_hosts):
    report = two_hosts["reports"][0]
    assert report["fsdp"] == two_hosts["reports"][1]["fsdp"]
    # The same sums in another order (reduce-scatter instead of all-reduce): float32 rounding (7e-8 seen).
    for name in ("train_loss", "val_loss", "grad_norm"):
        assert report["fsdp"][name] == pytest.approx(report["ddp"][name], rel=1e-6)
    # Muon's five rounds of matrix products amplify those roundings (with its Newton-Schulz in bf16, as
    # on a GPU, a gradient changed by one part in a million moved this model's weights by 3e-3 in three
    # steps, and sharded against DDP the losses differed by 2e-5): the tolerance allows for bf16.
    assert report["fsdp-muon"]["train_loss"] == pytest.approx(report["ddp-muon"]["train_loss"], rel=2e-4)
    assert report["fsdp-muon"]["train_loss"] != pytest.approx(report["fsdp"]["train_loss"], rel=1e-3)


def test_a_sharded_checkpoint_holds_the_same_model_as_an_unsharded_one(two_hosts):
    from safetensors.torch import load_file

    final = checkpoint_name(6)
    sharded = two_hosts["out"] / "fsdp" / "checkpoints" / final
    assert (sharded / DCP_DIR / ".metadata").is_file() and not (two_hosts["out"] / "ddp" / "checkpoints" / final /
                                                                 DCP_DIR).exists()
    weights, ddp_weights = load_file(sharded / "model.safetensors"), load_file(
        two_hosts["out"] / "ddp" / "checkpoints" / final / "model.safetensors")
    assert weights.keys() == ddp_weights.keys()   # the tied output layer stored once, as save_model does
    for name in weights:
        torch.testing.assert_close(weights[name], ddp_weights[name], rtol=1e-4, atol=1e-5)


def test_a_sharded_run_resumes_exactly_on_the_same_processes_and_refuses_an_unsharded_checkpoint(two_hosts):
    report = two_hosts["reports"][0]
    assert report["fsdp-resumed"]["resumed_from"] == 3
    assert report["fsdp-resumed"]["train_loss"] == report["fsdp"]["train_loss"]   # bit for bit
    assert report["ddp-into-fsdp"]["error"].endswith(
        "sharded training resumes only sharded checkpoints (with dcp/). Continue it with sharding: ddp (the same "
        "loss curve), or use another out_dir, or resume='never' to start over.")


def test_a_two_process_fsdp_checkpoint_resumes_in_one_process(data_dir, two_hosts, tmp_path, capsys):
    halfway = checkpoint_name(3)
    shutil.copytree(two_hosts["out"] / "fsdp" / "checkpoints" / halfway, tmp_path / "checkpoints" / halfway)
    resumed = run_training(data_dir, tmp_path, config(), sharding="fsdp")
    assert "note: sharding='fsdp' with one process shards nothing" in capsys.readouterr().out
    fsdp = two_hosts["reports"][0]["fsdp"]
    assert resumed.resumed_from == 3
    assert losses(resumed)[:3] == fsdp["train_loss"][:3]   # the checkpoint's history
    assert losses(resumed) == pytest.approx(fsdp["train_loss"], rel=1e-5)
    assert losses(resumed, "val_loss") == pytest.approx(fsdp["val_loss"], rel=1e-5)
    # One process writes the sharded format too, so two can continue it again.
    assert (tmp_path / "checkpoints" / checkpoint_name(6) / DCP_DIR / ".metadata").is_file()


def test_an_unsharded_checkpoint_resumes_a_one_process_fsdp_run(data_dir, two_hosts, tmp_path):
    halfway = checkpoint_name(3)
    shutil.copytree(two_hosts["out"] / "ddp" / "checkpoints" / halfway, tmp_path / "checkpoints" / halfway)
    resumed = run_training(data_dir, tmp_path, config(), sharding="fsdp")
    assert resumed.resumed_from == 3
    assert losses(resumed) == pytest.approx(two_hosts["reports"][0]["ddp"]["train_loss"], rel=1e-5)


def test_unknown_sharding_is_refused(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"sharding must be one of \('ddp', 'fsdp'\), got 'zero3'"):
        run_training(data_dir, tmp_path, config(), sharding="zero3")


# --- run by torchrun: each process of the two hosts ---------------------------------------------

def _each_process(data_dir: Path, out: Path) -> None:
    where = distributed.from_env()
    torch.set_num_threads(1)
    report = {"world_size": where.world_size, "local_world_size": int(os.environ["LOCAL_WORLD_SIZE"]),
              "node_rank": int(os.environ["GROUP_RANK"])}
    for name, sharding, optimizer in RUNS:
        result = run_training(data_dir, out / name, config(optimizer=optimizer), sharding)
        report[name] = {"train_loss": losses(result), "val_loss": losses(result, "val_loss"),
                        "grad_norm": losses(result, "grad_norm")}
    # Killed after step 3 and started again on the same two processes; then an unsharded
    # checkpoint offered to sharded training.
    for name, source, sharding in (("fsdp-resumed", "fsdp", "fsdp"), ("ddp-into-fsdp", "ddp", "fsdp")):
        if where.is_main:
            shutil.copytree(out / source / "checkpoints" / checkpoint_name(3), out / name / "checkpoints" /
                            checkpoint_name(3))
        distributed.barrier(where)
        try:
            result = run_training(data_dir, out / name, config(), sharding)
            report[name] = {"train_loss": losses(result), "resumed_from": result.resumed_from}
        except CheckpointMismatch as err:
            report[name] = {"error": str(err)}
    (out / f"rank{where.rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    _each_process(Path(sys.argv[1]), Path(sys.argv[2]))
