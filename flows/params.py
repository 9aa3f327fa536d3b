"""The pipeline's typed parameters, loaded from params.yaml and validated before any stage works.

This schema is the pipeline's (stage sections, where stages run, MLflow names), not the library's:
`llm` takes plain dataclasses, and each section here builds them (`.build()`).

params.yaml has one section per pipeline stage plus `project`. Each section is a strict pydantic
model: an unknown key, a wrong type or an impossible value stops the stage with a message that
names the key and says what is allowed, e.g.

    params.yaml: download.sources.0.role: Input should be 'pretrain', 'tokenizer-eval', ... (got 'pretrian')
    params.yaml: unknown key 'download.cache'; allowed keys: sources, cache_dir, timeout_s, retries
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from llm import distributed, sources
from llm.classify import ClassifyConfig
from llm.files import read_yaml
from llm.finetune import FinetuneConfig
from llm.model import PRESETS, ModelConfig
from llm.snapshots import SnapshotConfig
from llm.train import TrainConfig


class ConfigError(ValueError):
    """params.yaml is missing, malformed or holds a value the pipeline cannot use."""


class Strict(BaseModel):
    """Base of every params section: no unknown keys, no silent type coercion."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# --- sections that mirror the library's own dataclasses -----------------------------------------

def mirror(dataclass: type, *, optional: bool = False) -> type[BaseModel]:
    """A strict params model with the fields, types and defaults of a library dataclass.

    The dataclass stays the one definition (with its own value checks in __post_init__); this
    adds what a params file needs: unknown keys and wrong types named before anything runs.
    With optional=True every field defaults to None ("not set here").
    """
    hints = typing.get_type_hints(dataclass)
    fields = {}
    for f in dataclasses.fields(dataclass):
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:  # a factory's value, or required (...) when the dataclass has no default either
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else ...
        fields[f.name] = (Optional[hints[f.name]], None) if optional else (hints[f.name], default)
    model = create_model(f"{dataclass.__name__}Params", __base__=_Mirror, **fields)
    model.mirrored = dataclass
    return model


class _Mirror(Strict):
    """What every mirror does: build its dataclass (fields a subclass adds stay out of it), and
    refuse values the dataclass's own checks refuse, when the params are loaded."""

    mirrored: ClassVar[type]

    @model_validator(mode="after")
    def _buildable(self):
        self.build()
        return self

    def build(self, **changes: Any) -> Any:
        names = {f.name for f in dataclasses.fields(self.mirrored)}
        return _build(self.mirrored, {**self.model_dump(include=names), **changes})


def _build(dataclass: type, values: dict) -> Any:
    try:
        return dataclass(**values)
    except (TypeError, ValueError) as err:
        raise ValueError(str(err)) from None


# --- project -------------------------------------------------------------------------------

class ProjectParams(Strict):
    name: str = Field("tinyllm", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # MLflow model names: <name>-base, ...
    experiment: str = Field("llm-from-scratch", min_length=1)  # MLflow experiment of every stage
    seed: int = Field(1337, ge=0)


# --- download --------------------------------------------------------------------------------

SCHEMES = ("pypi", "file", "https", "http", "hf")
Role = Literal["pretrain", "tokenizer-eval", "classify", "instruct", "asset"]


class Source(mirror(sources.Source)):
    """One raw data source (llm.sources.Source, built by `.build()`), with what params.yaml must
    get right: a known role and scheme, a sha256 for anything downloaded."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    role: Role
    sha256: Optional[str] = Field(None, pattern=r"^[0-9a-f]{64}$")

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, uri: str) -> str:
        scheme = uri.split(":", 1)[0] if ":" in uri else ""
        if scheme not in SCHEMES:
            raise ValueError(f"unknown URI scheme {scheme!r} in {uri!r}; allowed: {', '.join(SCHEMES)}")
        if scheme == "pypi" and not re.fullmatch(r"pypi:[A-Za-z0-9_.-]+==[A-Za-z0-9_.+!-]+", uri):
            raise ValueError(f"{uri!r}: write pypi sources as pypi:NAME==VERSION")
        return uri

    @model_validator(mode="after")
    def _downloads_are_pinned(self) -> "Source":
        # A download can change under us; a local file or a hub dataset is the user's own choice.
        if self.uri.split(":", 1)[0] in ("pypi", "https", "http") and self.sha256 is None:
            raise ValueError(f"source {self.name!r}: a sha256 is required for {self.uri!r}")
        return self


class DownloadParams(Strict):
    sources: list[Source] = Field(min_length=1)
    cache_dir: str = ".cache/downloads"  # verified archives are kept here across runs
    timeout_s: float = Field(60.0, gt=0)  # per network request
    retries: int = Field(2, ge=0)         # for transient network errors, never for a bad checksum

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[Source]) -> list[Source]:
        names = [s.name for s in sources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"source names must be unique; repeated: {', '.join(duplicates)}")
        return sources


# --- tokenizer and pack ------------------------------------------------------------------------

class TokenizerParams(Strict):
    kind: Literal["bpe", "unigram", "char"] = "bpe"  # the project's tokenizer (SentencePiece, byte fallback)
    vocab_size: int = Field(8192, ge=300, le=1 << 20)
    character_coverage: float = Field(0.9995, gt=0, le=1)
    max_sentences: int = Field(1_000_000, ge=1000)   # SentencePiece samples at most this many lines
    heldout_fraction: float = Field(0.02, ge=0, lt=0.5)  # pretraining documents kept out for the comparison
    compare: bool = True                             # train and measure the other tokenizers too
    eval_chars: int = Field(1_000_000, ge=1000)      # characters per evaluation set in the comparison


class PackParams(Strict):
    val_fraction: float = Field(0.05, gt=0, lt=0.5)  # documents held out for validation
    workers: int = Field(0, ge=0)                    # encoding processes; 0 = one per core
    min_chars: int = Field(1, ge=1)                  # shorter documents are dropped and counted


# --- model and stages that train -------------------------------------------------------------

class ModelParams(mirror(ModelConfig, optional=True)):
    """A preset plus any fields to change: `{preset: tiny, n_layer: 6}`; depth resizes the preset
    (llm.model.shape_for_depth) before the fields apply: `{preset: llama-tiny, depth: 8}`."""

    preset: str = "tiny"
    depth: Optional[int] = None

    @model_validator(mode="after")
    def _buildable(self) -> "ModelParams":
        if self.preset not in PRESETS:
            raise ValueError(f"unknown model preset {self.preset!r}; presets: {', '.join(PRESETS)}")
        self.build()
        return self

    def build(self) -> ModelConfig:
        overrides = {k: v for k, v in self.model_dump(exclude={"preset", "depth"}).items() if v is not None}
        try:
            return ModelConfig.from_preset(self.preset, depth=self.depth, **overrides)
        except (TypeError, ValueError) as err:
            raise ValueError(str(err)) from None


TrainParams = mirror(TrainConfig)
SnapshotParams = mirror(SnapshotConfig)


class PretrainParams(Strict):
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    register_model: bool = True  # register the final model in the MLflow model registry as <project.name>-base
    snapshots: SnapshotParams = SnapshotParams()  # weights and probe records along the run (llm.snapshots)
    # Processes to train with, one per GPU, under torchrun with DistributedDataParallel: 'auto' = every
    # CUDA GPU of the host; on a CPU a count > 1 runs that many gloo processes (to test the path).
    devices: Union[int, str] = 1
    # How the processes share the model: ddp (each holds all of it) or fsdp (each holds 1/N of the
    # weights, gradients and optimizer state: for models whose training state outgrows one GPU).
    sharding: Literal["ddp", "fsdp"] = "ddp"
    # Hosts, each running `devices` processes; with more than one, every host runs the stage with its
    # node rank (flows/pretrain.py) and the launchers meet at rendezvous, HOST:PORT of node 0.
    nodes: int = Field(1, ge=1)
    rendezvous: str = ""
    join_timeout_s: float = Field(600.0, gt=0)   # a host not there by then stops the others

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: int | str) -> int | str:
        if value == "auto" or (isinstance(value, int) and value >= 1):
            return value
        raise ValueError("must be 'auto' (every CUDA GPU of the host) or a count >= 1")

    @field_validator("rendezvous")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value and not distributed.is_host_port(value):
            raise ValueError("must be HOST:PORT (node 0's address and a free port every host can reach)")
        return value

    @model_validator(mode="after")
    def _rendezvous_for_nodes(self) -> "PretrainParams":
        if self.nodes > 1 and not self.rendezvous:
            # Raised for the field itself, so the message names pretrain.rendezvous.
            raise ValidationError.from_exception_data("PretrainParams", [{
                "type": "value_error", "loc": ("rendezvous",), "input": self.rendezvous,
                "ctx": {"error": ValueError(f"nodes={self.nodes} needs the rendezvous endpoint HOST:PORT where the "
                                            "hosts' launchers meet (node 0's address and a free port)")}}])
        return self

    def launch(self, node_rank: int = 0, run_id: str = "llm") -> distributed.Nodes:
        """The hosts of this stage, seen from node `node_rank`, as llm.distributed launches them."""
        return distributed.Nodes(count=self.nodes, rank=node_rank, endpoint=self.rendezvous, run_id=run_id,
                                 join_timeout_s=self.join_timeout_s)


class ClassifyParams(mirror(ClassifyConfig)):
    from_scratch: bool = True    # also train the same architecture from random weights, for comparison
    register_model: bool = True  # as <project.name>-classifier


class InstructParams(mirror(FinetuneConfig)):
    val_fraction: float = Field(0.1, ge=0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0, lt=0.5)
    max_test_items: int = Field(100, ge=1)     # test instructions answered (and judged later)
    max_new_tokens: int = Field(96, ge=1)      # per answer
    temperature: float = Field(0.0, ge=0)      # 0 = greedy: the same answers every run
    generate_batch_size: int = Field(16, ge=1)
    register_model: bool = True                # as <project.name>-instruct
    snapshots: SnapshotParams = SnapshotParams()   # the model along the tuning run, as pretrain.snapshots


class JudgeParams(Strict):
    backend: Literal["local", "openai"] = "local"  # local: the downloaded GGUF served on 127.0.0.1
    base_url: str = ""          # backend openai: the endpoint, up to and including /v1
    model: str = ""             # backend openai: the model name to ask for
    api_key_env: str = ""       # backend openai: the environment variable holding the API key, if any
    gguf_sha256: str = Field("", pattern=r"^([0-9a-f]{64})?$")  # of the assembled local judge model
    n_ctx: int = Field(4096, ge=512)
    # yes_probability: 100 x P("Yes") to "is this a correct answer?" (needs logprobs; measured far
    # better calibrated with the local judge); rubric: the judge writes a 0-100 number.
    scoring: Literal["yes_probability", "rubric"] = "yes_probability"
    max_items: int = Field(40, ge=2)            # test items judged (4 judgements each)
    min_separation: float = Field(20.0, ge=0)   # reference minus mismatched mean below this: unreliable
    timeout_s: float = Field(120.0, gt=0)       # per judge request
    retries: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _backend_complete(self) -> "JudgeParams":
        if self.backend == "openai" and not (self.base_url and self.model):
            raise ValueError("backend 'openai' needs base_url and model")
        if self.backend == "local" and not self.gguf_sha256:
            raise ValueError("backend 'local' needs gguf_sha256 (of the assembled judge model)")
        return self


class ExportParams(Strict):
    """What the export stage writes (flows/export.py); its command line overrides these."""

    model: str = Field("data/instruct/model", min_length=1)  # a model folder or models:/NAME@ALIAS
    formats: list[Literal["hf", "gguf"]] = Field(["hf", "gguf"], min_length=1)
    # llm.gguf.GGUF_TYPES, spelled out: importing llm.gguf would load transformers for every stage
    gguf_types: list[Literal["f32", "f16", "q8_0", "q4_k_m"]] = Field(["f32", "f16", "q8_0"], min_length=1)
    out: str = Field("data/export", min_length=1)
    push: str = Field("", pattern=r"^([\w.-]+/[\w.-]+)?$")  # hub repository OWNER/NAME to upload to; "" = never


# --- where stages run -----------------------------------------------------------------------------

class ExecutionParams(Strict):
    """`local`: each stage's flow runs in the `dvc repro` process. `pool`: the listed stages run as
    deployment runs on a Prefect work pool (a GPU host's worker); see flows/remote.py."""

    mode: Literal["local", "pool"] = "local"
    pool: str = Field("llm-gpu", min_length=1)
    stages: list[Literal["download", "tokenizer", "pack", "pretrain", "classify", "instruct", "judge", "export"]] = \
        ["pretrain", "classify", "instruct"]
    pickup_timeout_s: float = Field(120.0, gt=0)  # no worker took the run by then: cancel, fail the stage
    timeout_s: float = Field(86400.0, gt=0)       # the run has not finished by then: cancel, fail


# --- the whole file -------------------------------------------------------------------------

class Params(Strict):
    project: ProjectParams = ProjectParams()
    execution: ExecutionParams = ExecutionParams()
    download: DownloadParams
    tokenizer: TokenizerParams = TokenizerParams()
    pack: PackParams = PackParams()
    pretrain: PretrainParams = PretrainParams()
    classify: ClassifyParams = ClassifyParams()
    instruct: InstructParams = InstructParams()
    judge: Optional[JudgeParams] = None
    export: ExportParams = ExportParams()


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raise ConfigError with a readable message on any problem."""
    path = Path(path)
    raw = read_yaml(path, ConfigError, " (run from the repository root)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        # Validated as JSON: strict types, but a YAML list may fill a tuple and an int a float.
        return Params.model_validate_json(json.dumps(raw))
    except ValidationError as err:
        raise ConfigError("\n".join(f"{path}: {line}" for line in _describe(err))) from None


def with_changes(params: Params, section: str, **changes: Any) -> Params:
    """`params` with some keys of one section changed (a command line's options), validated as
    params.yaml is; a ConfigError names the key."""
    values = {**getattr(params, section).model_dump(mode="json"), **changes}
    try:
        return params.model_copy(update={section: type(getattr(params, section)).model_validate_json(json.dumps(values))})
    except ValidationError as err:
        raise ConfigError("\n".join(f"{section}.{line}" for line in _describe(err))) from None


def _describe(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        key = ".".join(str(part) for part in e["loc"])
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(Params, e["loc"][:-1])
            lines.append(f"unknown key {key!r}; allowed keys: {', '.join(allowed)}")
        elif e["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            message = e["msg"].removeprefix("Value error, ").removeprefix("ValueError: ")
            got = "" if isinstance(e["input"], (dict, list)) else f" (got {e['input']!r})"
            lines.append(f"{key}: {message}{got}")
    return lines


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the model found by following `loc` through nested models and lists."""
    for part in loc:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[part].annotation
        model = _inner_model(annotation)
    return list(model.model_fields)


def _inner_model(annotation: Any) -> type[BaseModel]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        try:
            return _inner_model(arg)
        except TypeError:
            continue
    raise TypeError(f"no model inside {annotation!r}")

