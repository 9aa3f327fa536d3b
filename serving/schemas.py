"""Request and response bodies, as strict pydantic models: the server's OpenAPI schema comes from here.

Strict on purpose (schemathesis found 500s in LitServe's OpenAI models on `"n": null`, `n=0`
and `false` taken as an integer): no type coercion (`"1"`, `1.0` and `true` are not integers),
no NaN or infinity, no unknown fields. Limits that depend on the served model (context length,
configured caps) are checked by the routes, which also write them into the OpenAPI schema.

OpenAI fields we accept only at their neutral value (`n` = 1, penalties = 0) are declared so
that clients sending the defaults work, and anything else gets a 400 naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from llm.generate import Sampling


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class Loose(BaseModel):
    """Responses: plain models, documented in the OpenAPI schema."""
    model_config = ConfigDict(extra="forbid")


ModelName = Annotated[str, Field(min_length=1, max_length=256, description="The served model's id (GET /v1/models).")]
Seed = Annotated[int, Field(ge=-(2 ** 63), le=2 ** 64 - 1)]
Penalty = Annotated[float, Field(ge=0, le=0, description="Only 0 (no penalty) is supported.")]
# Not Literal[1] / Literal[False]: pydantic lets `true` and `1.0` through a Literal[1], `0` through a Literal[False].
def _only_one(value: int) -> int:
    if value != 1:
        raise ValueError(f"only 1 is supported, got {value}")
    return value


def _only_false(value: bool) -> bool:
    if value:
        raise ValueError("only false is supported")
    return value


OnlyOne = Annotated[int, AfterValidator(_only_one), WithJsonSchema({"type": "integer", "const": 1})]
OnlyFalse = Annotated[bool, AfterValidator(_only_false), WithJsonSchema({"type": "boolean", "const": False})]


# --- generation requests ------------------------------------------------------------------------

class StreamOptions(Strict):
    include_usage: bool | None = Field(None, description="Send usage in one extra chunk with no choices, "
                                                         "as OpenAI does. Without it the last chunk carries usage.")


class SamplingFields(Strict):
    """Fields shared by chat and text completions."""
    model: ModelName
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most; finish_reason "
                                                           "'length' when reached.")
    temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy. Default 1.")
    top_p: float | None = Field(None, ge=0, le=1, description="Nucleus sampling mass. Default 1.")
    n: OnlyOne | None = Field(None, description="Only 1 choice per request is supported.")
    stream: bool | None = Field(None, description="Server-sent events, ending with `data: [DONE]`.")
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="Up to 4 strings; the text ends before the first one.")
    seed: Seed | None = Field(None, description="Same seed and request: same tokens (best effort).")
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    user: str | None = Field(None, max_length=256, description="Accepted and ignored.")

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        stops = [value] if isinstance(value, str) else value
        if stops is not None and len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        if stops is not None and any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_list(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart] = Field(description="Text, or a list of text parts (joined).")
    name: str | None = Field(None, max_length=256, description="Accepted and ignored.")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens.")
    logprobs: bool | None = Field(None, description="Return the log probability of each output token.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Also the k likeliest tokens at each "
                                                                    "position; needs logprobs true.")

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise ValueError("max_tokens and max_completion_tokens differ; send one of them")
        return self

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] = Field(
        description="Text, or token ids. An empty text starts a new document.")
    logprobs: int | None = Field(None, ge=0, le=5, description="Log probabilities of each output token and "
                                                               "of the k likeliest alternatives (legacy "
                                                               "completions semantics).")
    echo: OnlyFalse | None = Field(None, description="Only false is supported.")
    best_of: OnlyOne | None = None
    suffix: None = Field(None, description="Not supported.")

    def token_budget(self) -> int | None:
        return self.max_tokens


# --- generation responses ------------------------------------------------------------------------

class Usage(Loose):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(Loose):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(Loose):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Loose):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class AssistantMessage(Loose):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(Loose):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(Loose):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionLogprobs(Loose):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(Loose):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"]


class Completion(Loose):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(Loose):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(Loose):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionChunk(Loose):
    """One event of a streamed chat completion. `usage`: see StreamOptions."""
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunkChoice(Loose):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class CompletionChunk(Loose):
    """One event of a streamed text completion."""
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


# --- models, tokenize, errors --------------------------------------------------------------------

class ModelCard(Loose):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    context_length: int
    max_tokens: int
    source: str
    config: dict[str, Any] = Field(description="The model's architecture (llm.model.ModelConfig).")
    snapshots: list[int] = Field(description="Training steps this model kept a snapshot of (GET /v1/snapshots; "
                                             "`step` in /v1/introspect); empty if none.")


class ModelList(Loose):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def _exactly_one_of(*names: str) -> ConfigDict:
    """Fields given as `T = None` (absent, never null) and a schema saying one must be present."""
    return ConfigDict(strict=True, extra="forbid", allow_inf_nan=False,
                      json_schema_extra={"oneOf": [{"required": [name]} for name in names]})


class TokenizeRequest(Strict):
    model_config = _exactly_one_of("text", "messages")
    model: ModelName | None = None
    text: str = Field(None, description="Plain text; special-token strings stay plain text.")
    messages: list[ChatMessage] = Field(None, min_length=1, description="A conversation, encoded with the "
                                                                        "chat template as a generation prompt.")

    @model_validator(mode="after")
    def _one_input(self):
        if (self.text is None) == (self.messages is None):
            raise ValueError("send exactly one of text or messages")
        return self


class TokenSpan(Loose):
    id: int
    text: str = Field(description="The token for display: its text, <0xNN> for a lone byte.")
    byte_start: int = Field(description="Offset of the token's first byte in the UTF-8 of the decoded text.")
    byte_end: int


class TokenizeResponse(Loose):
    model: str
    count: int
    tokens: list[TokenSpan]
    max_context: int


class ErrorDetail(Loose):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Loose):
    error: ErrorDetail


# --- introspection -------------------------------------------------------------------------------

class AttentionRequest(Strict):
    layers: list[Annotated[int, Field(ge=0)]] = Field(min_length=1, description="0-based block indices.")
    heads: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1,
                                                            description="0-based head indices; all heads if omitted.")


SnapshotStep = Annotated[int, Field(ge=0, description="Ask the model as it was at this training step (one of "
                                                    "GET /v1/models' `snapshots`); the trained model if omitted.")]
ServedStep = Annotated[int | None, Field(description="The snapshot's training step; null for the trained model.")]


class PromptInput(Strict):
    model_config = _exactly_one_of("text", "token_ids")
    text: str = Field(None, min_length=1, description="Text (special-token strings stay text).")
    token_ids: list[Annotated[int, Field(ge=0)]] = Field(None, min_length=1, description="Or token ids.")

    @model_validator(mode="after")
    def _one_input(self):
        if (self.text is None) == (self.token_ids is None):
            raise ValueError("send exactly one of text or token_ids")
        return self


class IntrospectRequest(PromptInput):
    model: ModelName | None = None
    top_k: int = Field(5, ge=1, description="Candidates per position, for the next token and the logit lens.")
    attention: AttentionRequest | None = Field(None, description="Attention maps to return (none by default).")
    logit_lens: bool = Field(False, description="Top-k read-out of the residual stream after every layer.")
    step: SnapshotStep | None = None


class Candidate(Loose):
    id: int
    text: str
    prob: float


class IntrospectToken(Loose):
    position: int
    id: int
    text: str
    byte_start: int
    byte_end: int
    prob: float | None = Field(description="p(token | tokens before it); null for the first token.")
    surprisal_bits: float | None = Field(description="-log2 prob: how unexpected the token was.")
    next: list[Candidate] = Field(description="The top-k candidates for the token after this one.")


class HeadMap(Loose):
    head: int
    weights: list[list[float]] = Field(description="weights[q][k]: attention of query position q to key "
                                                   "position k; each row sums to 1.")


class LayerAttention(Loose):
    layer: int
    heads: list[HeadMap]


class LensLayer(Loose):
    layer: int = Field(description="0 = the embeddings, i = the residual stream after block i-1.")
    label: str
    positions: list[list[Candidate]]


class IntrospectResponse(Loose):
    model: str
    step: ServedStep
    tokens: list[IntrospectToken]
    attention: list[LayerAttention] | None
    logit_lens: list[LensLayer] | None
    caps: dict[str, int] = Field(description="The size caps this server applies to introspection requests.")


# --- training snapshots ----------------------------------------------------------------------------

class Curve(Loose):
    steps: list[int]
    loss: list[float] = Field(description="loss[i] at steps[i]")


class SnapshotList(Loose):
    model: str
    steps: list[int] = Field(description="The snapshots' training steps (optimizer updates done).")
    probes: list[str] = Field(description="The names of the fixed texts every snapshot recorded.")
    train: Curve = Field(description="The training loss of every update of the run.")
    val: Curve = Field(description="The validation loss of every evaluation of the run.")


class SnapshotToken(Loose):
    position: int
    id: int
    text: str
    prob: float | None = Field(description="p(token | tokens before it) at that step; null for the first token.")
    surprisal_bits: float | None
    next: list[Candidate]


class SnapshotProbe(Loose):
    name: str
    text: str
    ids: list[int]
    tokens: list[SnapshotToken]
    attention: list[LayerAttention] = Field(description="Every layer and head.")


class SnapshotRecord(Loose):
    model: str
    step: int
    val_loss: float | None = Field(description="Validation loss at that step; null at step 0.")
    probes: list[SnapshotProbe]


@dataclass
class Job:
    """What the HTTP process hands a generation worker through LitServe's queue (pickled): the
    prompt's tokens, how to decode them (checked against the model and the limits already), and
    what only the text side needs."""
    prompt: list[int]
    sampling: Sampling
    stop: list[str]                 # stop strings, found in the decoded text
    stream: bool


# --- inspecting the model: architecture, why this token, tokenizers side by side -----------------

class AttributionRequest(PromptInput):
    model: ModelName | None = None
    position: int = Field(-1, ge=-(2 ** 31), lt=2 ** 31,
                          description="The position whose next-token prediction is explained; negative "
                                      "counts from the end (-1, the default, is the last token).")
    target: int | None = Field(None, ge=0, description="The token id whose logit is explained "
                                                       "(default: the model's top prediction there).")
    top_k: int = Field(5, ge=1, le=50, description="Top predictions at the position to return.")
    step: SnapshotStep | None = None


class PatchingRequest(Strict):
    model: ModelName | None = None
    clean: PromptInput = Field(description="The prompt whose answer we look for.")
    corrupted: PromptInput = Field(description="The same prompt with something changed; same number of tokens.")
    target: int | None = Field(None, ge=0, description="The answer token (default: the clean prompt's prediction).")
    foil: int | None = Field(None, ge=0, description="The token it competes with (default: the corrupted "
                                                     "prompt's prediction, if different).")
    step: SnapshotStep | None = None


class TokenChoice(Loose):
    id: int
    text: str


class Prediction(Loose):
    id: int
    text: str
    logit: float
    prob: float


class FinalNorm(Loose):
    kind: str = Field(description="layernorm or rmsnorm")
    scale: float = Field(description="The final norm's scale s at the position, frozen for the attribution.")


class LayerAttribution(Loose):
    layer: int
    heads: list[float] = Field(description="Each attention head's direct contribution to the target's logit.")
    sources: list[list[float]] = Field(description="sources[h][k]: the part of head h's contribution it read "
                                                   "from position k (its attention weight times its value).")
    attention_bias: float = Field(description="The attention output projection's bias (0 without biases).")
    mlp: float


class AttributionResponse(Loose):
    model: str
    step: ServedStep
    tokens: list[TokenChoice] = Field(description="The prompt's tokens.")
    position: int
    target: TokenChoice
    logit: float = Field(description="The target's logit at the position.")
    bias_term: float = Field(description="W_U[target] . (final norm bias): the part of the logit no write owns.")
    sum: float = Field(description="Sum of every contribution = logit - bias_term.")
    final_norm: FinalNorm
    embeddings: dict[str, float] = Field(description="token, and position for learned positions.")
    layers: list[LayerAttribution]
    top: list[Prediction]
    method: str = Field(description="How the final norm is handled.")


class PatchedLayer(Loose):
    layer: int = Field(description="0 = the embeddings, i = the residual stream after block i-1.")
    label: str
    values: list[float] = Field(description="The metric with this layer's stream at each position taken from "
                                            "the clean run.")
    restored: list[float | None] = Field(description="(value - corrupted) / (clean - corrupted): 1 = the clean "
                                                     "answer fully restored; null when clean = corrupted.")


class PatchingTokens(Loose):
    clean: list[str]
    corrupted: list[str]


class PatchingResponse(Loose):
    model: str
    step: ServedStep
    target: TokenChoice
    foil: TokenChoice | None
    metric: str
    clean: float
    corrupted: float
    layers: list[PatchedLayer]
    tokens: PatchingTokens


class ArchitecturePart(Loose):
    name: str = Field(description="The module's name in the model (tok_emb, attn, ...).")
    label: str
    detail: str
    equation: str
    params: int = Field(description="Parameters of this part (of one block, for a block's parts).")
    flops: int = Field(description="Training FLOPs per token of this part (of one block, for a block's parts).")
    params_all: int | None = Field(None, description="A block's part: summed over all blocks.")
    flops_all: int | None = Field(None, description="A block's part: summed over all blocks.")


class ArchitectureBlock(Loose):
    count: int
    norm_placement: str
    equation: str
    parts: list[ArchitecturePart]


class ArchitectureTotals(Loose):
    params: int
    non_embedding_params: int
    flops_per_token: int
    seq_len: int
    flops_note: str


class ArchitectureResponse(Loose):
    model: str
    totals: ArchitectureTotals
    input: list[ArchitecturePart]
    block: ArchitectureBlock
    output: list[ArchitecturePart]


MAX_COMPARE_CHARS = 10_000


class CompareTokenizersRequest(Strict):
    text: str = Field(min_length=1, max_length=MAX_COMPARE_CHARS, description="The text every tokenizer splits.")


class TokenizerSplit(Loose):
    name: str
    kind: str
    vocab_size: int
    count: int = Field(description="Tokens for the text.")
    chars_per_token: float
    tokens: list[TokenSpan]


class CompareTokenizersResponse(Loose):
    chars: int
    bytes: int
    tokenizers: list[TokenizerSplit] = Field(description="The served model's tokenizer first, then the comparison's.")
    folder: str = Field(description="Where the comparison tokenizers are looked for.")
    message: str | None = Field(description="Why only the served model's tokenizer is shown, if so.")
