"""Text generation: the model's own forward pass with a key/value cache, one sampler, and a batch
that requests join and leave at any step.

Generating token n+1 needs the keys and values of tokens 1..n at every layer. Recomputing them
each step makes generation quadratic; keeping them in a `KVCache` makes each step one token's
worth of work. The forward pass is GPT.forward itself (llm/model.py): generation passes it the
cache, so every architecture switch decodes exactly as it trains.

    [completion] = generate(model, [prompt_ids], max_new_tokens=50)          # a fixed batch
    for step in stream(model, [prompt_ids], max_new_tokens=50, temperature=0.8, seed=0):
        print(step.tokens[0])                                                 # token by token
    engine = Engine(model, max_batch_size=32)                                 # what a server runs:
    engine.add([Sequence("a", prompt_ids, Sampling(max_tokens=50))])          #   requests join...
    events = engine.step()                                                    #   ...one token each

The Engine keeps a row of the cache per running request, each row at its own length:

    add([seq, ...])   prefill the newcomers' prompts (one right-padded forward pass) into free
                      rows and sample their first token
    step()            one token for every running row, in one batched forward pass
    cancel(uid)       drop a row (client gone, stop string found)

Rows stay packed at the front of the cache (a finished row is replaced by the last one), so a
step runs over the first B rows, a view. A fixed batch (`generate`, `stream`) is the case where
every row joins at step 0.

Speed is a mode of the same forward pass, not a second one: `for_decoding(model)` lays each
linear layer's weight out once for the kernels that read it fastest (see DecodingLinear) and
calls every module straight through its forward (see _called_directly: at batch 1 a small
model's step is as much Python as kernels), and everything runs under inference_mode. One
sampler, `choose_tokens`, serves the library and the server: temperature, top-k, top-p, a seed
per request, log-probabilities.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterable, Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm.model import GPT, MLP, KVCache

LOGPROB_FLOOR = -9999.0  # log p of a token the model rules out: JSON has no -inf


# --- the decoding layout of the weights ---------------------------------------------------------

def _mkldnn_pack(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight prepacked for oneDNN's linear kernel, or None where that kernel is unavailable
    (not a CPU float32 weight, a torch without oneDNN, or a failed self-check)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 32)
        probe = torch.randn(2, weight.size(1), generator=torch.Generator().manual_seed(0))  # not the global RNG
        same = torch.allclose(torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], ""),
                              probe @ weight.t(), atol=1e-4, rtol=1e-4)
        return packed if same else None
    except (RuntimeError, AttributeError):
        return None


class DecodingLinear(nn.Module):
    """An nn.Linear's weight laid out for decoding, computing the same x @ W^T + b.

    Decoding is almost all matrix products of a few rows by the weights, and on a CPU the
    layout decides their speed (bench/decode.py): one row (batch-1 decoding) reads a weight
    stored (in, out) fastest, several rows go fastest through oneDNN with a prepacked weight.
    So a CPU weight is stored (in, out) and a float32 one is also prepacked; elsewhere (a GPU)
    the weight is used as it is. One row, x (1, 1, in), is multiplied as a batch of one
    (bmm on the (1, in, out) view): the same kernel and bits as F.linear, without its reshaping
    of x and transposing of the weight on every call. The weights are copies: rebuild
    (for_decoding) after the model's weights change.
    """

    def __init__(self, linear: nn.Linear, gelu: bool = False):
        super().__init__()
        weight = linear.weight.detach()
        self.gelu = gelu  # apply GPT-2's tanh GELU to the output: fused into oneDNN's matmul where it runs
        on_cpu = weight.device.type == "cpu"
        self.packed = _mkldnn_pack(weight)
        self.weight = weight.t().contiguous().t() if on_cpu else weight   # (out, in), stored (in, out) on a CPU
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.one_row = (1, 1, weight.size(1)) if on_cpu else None           # x's shape for the bmm path
        self.batched = self.weight.t().unsqueeze(0)                          # (1, in, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape == self.one_row:
            y = torch.bmm(x, self.batched) if self.bias is None else torch.baddbmm(self.bias, x, self.batched)
        elif self.packed is None:
            y = F.linear(x, self.weight, self.bias)
        else:  # oneDNN flattens x's leading dimensions itself
            post = ("gelu", "tanh") if self.gelu else ("none", "")
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, post[0], [], post[1])
        return F.gelu(y, approximate="tanh") if self.gelu else y


def for_decoding(model: GPT) -> GPT:
    """The model in eval mode with every linear layer a DecodingLinear and every module called
    straight through its forward (see _called_directly): a copy of its modules sharing all its
    parameters, so the model itself stays trainable. The copy only decodes: its modules are
    DirectModules, not nn.Modules (no .to(), no state_dict). Idempotent."""
    if getattr(model, "decoding", False):
        return model
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    fast = copy.deepcopy(model, memo=shared).eval()
    for module in list(fast.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                # A GELU MLP's activation goes into its fc's matmul (one op, not two per step).
                fused = isinstance(module, MLP) and module.kind == "gelu" and name == "fc"
                setattr(module, name, DecodingLinear(child, gelu=fused))
            elif isinstance(child, nn.Dropout):         # the identity in eval mode, without the call
                setattr(module, name, nn.Identity())
        if isinstance(module, MLP) and module.kind == "gelu":
            module.kind = "gelu in fc"
    for module in list(fast.modules()):
        _called_directly(module)
    fast.decoding = True
    return fast


# The modules whose forward is one functional call: called as the ATen op that call ends in (the
# same kernel, without the wrapper's checks for overrides and options the model does not use).
_ATEN_FORWARD = {
    nn.LayerNorm: lambda self, x: torch.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps),
    nn.RMSNorm: lambda self, x: torch.rms_norm(x, self.normalized_shape, self.weight, self.eps),
    nn.Embedding: lambda self, ids: torch.embedding(self.weight, ids),
}


class DirectModule:
    """What a module of the decoding copy keeps of nn.Module: a walk over it and its children."""

    def modules(self) -> Iterator[DirectModule]:
        yield self
        for child in self._modules.values():
            yield from child.modules()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(decoding)"


_DIRECT_CLASSES: dict[type, type] = {}
_NOT_COPIED = {"__dict__", "__weakref__", "__repr__", "__call__", "modules"}


def _called_directly(module: nn.Module) -> None:
    """`module(...)` runs its forward and nothing else: the module becomes an instance of a plain
    class (a DirectModule with its own class's methods, not an nn.Module), and its parameters,
    buffers and child modules become plain attributes. A decoding step of a small model calls
    some forty modules and reads their attributes hundreds of times; nn.Module's call (hook
    dispatch: two Python frames) and its __getattr__ (which also keeps Python from specialising
    any attribute read on the object) cost about as much as the kernels at batch 1
    (bench/decode.py). The decoding copy has no hooks, and its modules stay as for_decoding
    built them."""
    cls = type(module)
    if cls not in _DIRECT_CLASSES:
        methods = {}
        for base in reversed(cls.__mro__):  # the class's own methods and its torch bases', not nn.Module's
            if issubclass(base, nn.Module) and base is not nn.Module:
                methods.update({name: value for name, value in vars(base).items() if name not in _NOT_COPIED})
        _DIRECT_CLASSES[cls] = type(cls.__name__, (DirectModule,), {
            **methods, "__call__": _ATEN_FORWARD.get(cls, cls.forward),
            "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    module.__dict__.update({**module._parameters, **module._buffers, **module._modules})
    module.__class__ = _DIRECT_CLASSES[cls]


# --- sampling -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sampling:
    """How one request picks its tokens. temperature 0 is greedy; top_k / top_p filter first."""
    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None          # the request's own random numbers: its tokens then do not
    logprobs: bool = False           # depend on the requests decoded beside it
    top_logprobs: int = 0            # report log p of the chosen token / of the k likeliest
    stop_ids: frozenset[int] = frozenset()

    def check(self, vocab_size: int) -> None:
        """A ValueError naming the field, before any work: a stream never fails half-way."""
        if self.max_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if not 0 <= self.top_logprobs <= vocab_size:
            raise ValueError(f"top_logprobs must be in [0, {vocab_size}], got {self.top_logprobs}")

    @cached_property  # read for every row at every step
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_p == 0.0 or self.top_k == 1


def choose_tokens(logits: torch.Tensor, samplings: Seq[Sampling], uniforms: Seq[float]) -> list[int]:
    """One token per row of logits (N, V): the argmax for greedy rows; the others sample from
    their temperature-scaled distribution cut to the top_k likeliest, then to the smallest set
    whose mass reaches top_p. uniforms: one number in [0, 1) per row (unused by greedy rows),
    from each request's own generator, so a seeded request's tokens are its own."""
    return chosen_ids(logits, samplings, uniforms).tolist()


def chosen_ids(logits: torch.Tensor, samplings: Seq[Sampling], uniforms: Seq[float]) -> torch.Tensor:
    """choose_tokens' tokens as a tensor (N,) on the logits' device: the engine feeds them back in."""
    tokens = logits.argmax(dim=-1)
    sampled = [j for j, s in enumerate(samplings) if not s.greedy]
    if not sampled:
        return tokens
    device = logits.device
    temps = torch.tensor([samplings[j].temperature for j in sampled], device=device)
    scaled = logits[sampled].float() / temps[:, None]
    top_k = [samplings[j].top_k or scaled.size(-1) for j in sampled]
    top_p = torch.tensor([samplings[j].top_p for j in sampled], device=device)
    if min(top_k) < scaled.size(-1) or (top_p < 1).any():
        ordered, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(scaled.size(-1), device=device)
        cut = rank[None, :] >= torch.tensor(top_k, device=device)[:, None]
        # Nucleus: keep the likeliest tokens until their mass reaches top_p (the best always kept).
        probs = ordered.masked_fill(cut, float("-inf")).softmax(dim=-1)
        cut |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
        scaled = torch.full_like(scaled, float("-inf")).scatter(-1, order, ordered.masked_fill(cut, float("-inf")))
    # Inverse-CDF sampling, vectorised: one uniform number per row. side="right" never lands on
    # a zero-probability token; the factor keeps u * total below total.
    cdf = scaled.softmax(dim=-1).cumsum(dim=-1)
    uniform = torch.tensor([uniforms[j] for j in sampled], device=device, dtype=cdf.dtype)
    target = uniform[:, None] * cdf[:, -1:] * (1 - 2 ** -20)
    picks = torch.searchsorted(cdf, target, side="right").squeeze(-1).clamp_(max=cdf.size(-1) - 1)
    tokens[torch.tensor(sampled, device=device)] = picks
    return tokens


def token_logprobs(logits: torch.Tensor, tokens: Seq[int], top: int) -> tuple[list[float], list[list]]:
    """log p (temperature 1, unfiltered) of each row's chosen token, and of its `top` likeliest
    as (id, log p) pairs; floored at LOGPROB_FLOOR so they stay finite."""
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(-1, torch.tensor(tokens, device=logits.device)[:, None]).squeeze(-1).tolist()
    best = [[] for _ in tokens]
    if top:
        values, ids = logp.topk(top, dim=-1)
        best = [[(i, max(v, LOGPROB_FLOOR)) for i, v in zip(row_ids, row_values)]
                for row_ids, row_values in zip(ids.tolist(), values.tolist())]
    return [max(c, LOGPROB_FLOOR) for c in chosen], best


def room_for_new_tokens(prompt_tokens: int, context_length: int) -> int:
    """The most tokens a prompt can be followed by: every new token but the last is fed back in,
    and the cache holds context_length tokens."""
    return context_length + 1 - prompt_tokens


# --- the engine ---------------------------------------------------------------------------------

@dataclass
class Sequence:
    """One request inside the engine."""
    uid: str
    prompt: list[int]
    sampling: Sampling
    rng: random.Random | None = None   # the request's own random numbers, when it has a seed
    length: int = 0                    # tokens in the cache
    last_token: int = -1               # sampled, not yet fed back in
    produced: int = 0                  # output tokens so far (stop tokens not counted)
    limit: int = 0                     # the most it may produce: max_tokens, or what the context leaves


@dataclass
class TokenEvent:
    """What one step did for one request. token is None when the row stopped on a stop token."""
    uid: str
    token: int | None
    finish_reason: str | None = None          # 'stop' | 'length' when the row finished now
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


class Engine:
    """The batch of running requests and their key/value cache. Not thread-safe: one caller."""

    def __init__(self, model: GPT, max_batch_size: int = 32, seed: int | None = None,
                 vocab_limit: int | None = None):
        """vocab_limit: ids at or above it are never produced (a model's embedding table may be
        padded beyond its tokenizer's vocabulary). seed: the generator of requests without one."""
        self.model = for_decoding(model)
        c = self.config = model.config
        self.vocab_limit = vocab_limit if vocab_limit is not None and vocab_limit < c.vocab_size else None
        self.max_batch_size = max_batch_size
        weight = model.tok_emb.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.rows: list[Sequence] = []            # row i lives in cache row i
        self._fed: torch.Tensor | None = None     # the rows' last tokens (B, 1), when the last step left them so
        self.cache = KVCache(c, max_batch_size, 0, device=self.device, dtype=self.dtype)
        self.rng = random.Random(seed)

    # --- bookkeeping ---

    @property
    def free(self) -> int:
        return self.max_batch_size - len(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def uids(self) -> list[str]:
        return [row.uid for row in self.rows]

    @torch.inference_mode()
    def cancel(self, uid: str) -> bool:
        """Drop a running request; False if it is not here."""
        for i, row in enumerate(self.rows):
            if row.uid == uid:
                self._remove(i)
                return True
        return False

    def reset(self) -> None:
        """Forget every running request (after a failure: the cache may be half-written)."""
        self.rows.clear()
        self._fed = None
        self.cache.lengths[:] = [0] * self.max_batch_size

    def _reserve(self, slots: int) -> None:
        """Grow the cache to hold `slots` tokens per row (doubling, capped at the context):
        memory follows the longest running request, not the model's context."""
        if slots <= self.cache.slots:
            return
        grown = KVCache(self.config, self.max_batch_size, min(max(slots, 2 * self.cache.slots, 64),
                                                             self.config.context_length),
                        device=self.device, dtype=self.dtype)
        grown.kv[..., :self.cache.slots, :] = self.cache.kv
        grown.lengths[:] = self.cache.lengths
        self.cache = grown

    def _remove(self, i: int) -> None:
        """Free row i, moving the last row into its place so that rows stay packed."""
        last = len(self.rows) - 1
        self._fed = None
        if i != last:
            n = self.rows[last].length
            self.cache.kv[:, :, i, :, :n] = self.cache.kv[:, :, last, :, :n]
            self.cache.lengths[i] = n
            self.rows[i] = self.rows[last]
        self.cache.lengths[last] = 0
        self.rows.pop()

    # --- public steps ---

    @torch.inference_mode()  # the cache is an inference tensor: every update happens in this mode
    def add(self, sequences: list[Sequence]) -> list[TokenEvent]:
        """Admit new requests (at most `free`): prefill their prompts, sample their first tokens."""
        if len(sequences) > self.free:
            raise ValueError(f"{len(sequences)} new requests but only {self.free} free rows")
        if not sequences:
            return []
        context = self.config.context_length
        for seq in sequences:
            if not 0 < len(seq.prompt) <= context:
                raise ValueError(f"prompt of {len(seq.prompt)} tokens; must be 1..{context}")
            if seq.sampling.seed is not None:
                seq.rng = random.Random(seq.sampling.seed)
            seq.limit = min(seq.sampling.max_tokens, room_for_new_tokens(len(seq.prompt), context))
        first = len(self.rows)
        self.rows.extend(sequences)
        # Right-padded to the longest: causal attention means a real token never sees the padding
        # after it, and the padding's slots are overwritten as the row grows.
        lengths = [len(s.prompt) for s in sequences]
        T = max(lengths)
        self._reserve(T)
        tokens = torch.tensor([s.prompt + [0] * (T - len(s.prompt)) for s in sequences], device=self.device)
        rows = self.cache.rows(first, first + len(sequences))
        last = torch.tensor(lengths, device=self.device) - 1
        logits = self.model(tokens, cache=rows, logits_at=last).logits.squeeze(1)
        self.cache.lengths[first:first + len(sequences)] = lengths
        for seq in sequences:
            seq.length = len(seq.prompt)
        return self._sample_and_retire(logits, list(range(first, first + len(sequences))))

    def step(self) -> list[TokenEvent]:
        """One new token for every running request."""
        if not torch.is_inference_mode_enabled():  # the cache is an inference tensor (see add)
            with torch.inference_mode():
                return self.step()
        if not self.rows:
            return []
        self._reserve(max(r.length for r in self.rows) + 1)
        tokens = self._fed if self._fed is not None else torch.tensor([[r.last_token] for r in self.rows],
                                                                      device=self.device)
        logits = self.model(tokens, cache=self.cache.rows(0, len(self.rows))).logits.squeeze(1)
        for row in self.rows:
            row.length += 1
        return self._sample_and_retire(logits, list(range(len(self.rows))))

    def _sample_and_retire(self, logits: torch.Tensor, row_ids: list[int]) -> list[TokenEvent]:
        """Pick a token for each of `row_ids` (logits row j belongs to row_ids[j]), report it,
        and remove rows that finished."""
        rows = [self.rows[i] for i in row_ids]
        if self.vocab_limit is not None:
            logits[:, self.vocab_limit:] = float("-inf")
        uniforms = [(r.rng or self.rng).random() if not r.sampling.greedy else 0.0 for r in rows]
        ids = chosen_ids(logits, [r.sampling for r in rows], uniforms)
        tokens = ids.tolist()
        # Every row continues with these tokens unless one finishes: the next step feeds them as they are.
        self._fed = ids[:, None] if len(row_ids) == len(self.rows) else None
        lp_rows = [j for j, r in enumerate(rows) if r.sampling.logprobs or r.sampling.top_logprobs]
        chosen_lp, tops = {}, {}
        if lp_rows:
            top = max(rows[j].sampling.top_logprobs for j in lp_rows)
            picked, best = token_logprobs(logits[lp_rows], [tokens[j] for j in lp_rows], top)
            for n, j in enumerate(lp_rows):
                chosen_lp[j], tops[j] = picked[n], best[n][:rows[j].sampling.top_logprobs]
        events, finished = [], []
        for j, (row_index, row) in enumerate(zip(row_ids, rows)):
            token = tokens[j]
            if token in row.sampling.stop_ids:
                events.append(TokenEvent(row.uid, None, "stop"))
                finished.append(row_index)
                continue
            row.last_token = token
            row.produced += 1
            event = TokenEvent(row.uid, token, logprob=chosen_lp.get(j), top=tops.get(j, []))
            if row.produced >= row.limit:
                event.finish_reason = "length"
                finished.append(row_index)
            events.append(event)
        for i in sorted(finished, reverse=True):
            self._remove(i)
        return events

    # --- fixed batches: every row joins at step 0 ---

    def stream(self, prompts, max_new_tokens: int = 256, **options) -> Iterator[Step]:
        return stream(self, prompts, max_new_tokens, **options)

    def generate(self, prompts, max_new_tokens: int = 256, **options) -> list[Completion]:
        return generate(self, prompts, max_new_tokens, **options)


# --- fixed batches ------------------------------------------------------------------------------

@dataclass
class Step:
    """One decoding step of a batch: what each row produced. A row that finished at an earlier
    step, or that produced a stop token now, has token None (stop tokens are not output)."""
    tokens: list[int | None]
    finish_reasons: list[str | None]                  # 'stop' or 'length' in the step a row finishes
    logprobs: list[float | None] | None = None        # log p(token) under the model, if asked for
    top_logprobs: list[list[tuple[int, float]] | None] | None = None  # the k likeliest (id, log p)


@dataclass
class Completion:
    """Everything one prompt produced."""
    tokens: list[int]
    finish_reason: str                                # 'stop' or 'length'
    prompt_tokens: int                                # after any truncation
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


def _check_prompts(prompts, config, max_new_tokens: int, truncate: bool) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"a prompt tensor must be (batch, tokens), got shape {tuple(prompts.shape)}")
        prompts = prompts.tolist()
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    context, vocab = config.context_length, config.vocab_size
    room = max(1, context + 1 - max_new_tokens)  # the longest prompt that leaves room for them (see room_for_new_tokens)
    checked = []
    for i, prompt in enumerate(prompts):
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token")
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab}): {bad[:5]}")
        if len(prompt) > context and not truncate:
            raise ValueError(
                f"prompt {i} has {len(prompt)} tokens but context_length is {context}: "
                f"shorten it or pass truncate_prompt=True to keep its last tokens")
        if truncate and len(prompt) > room:
            prompt = prompt[-room:]
        checked.append(prompt)
    return checked


def stream(model: GPT | Engine, prompts: Seq[Seq[int]] | torch.Tensor, max_new_tokens: int = 256, *,
           temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           stop_token_ids: Iterable[int] = (), seed: int | None = None, logprobs: bool = False,
           top_logprobs: int = 0, truncate_prompt: bool = False) -> Iterator[Step]:
    """Yield one Step per decoding step until every row has finished.

    prompts: a batch of token id lists (lengths may differ) or a (B, T) tensor. temperature 0 =
    greedy; otherwise sample after top_k / top_p filtering, reproducibly for a given seed.
    logprobs / top_logprobs add the model's log-probabilities (temperature 1, unfiltered) of the
    chosen / likeliest tokens. A prompt longer than the context raises ValueError, unless
    truncate_prompt=True, which drops its oldest tokens to leave room for max_new_tokens.
    Everything is checked here, before the first step. Pass an Engine to reuse its weight
    layout (each call decodes in a cache of its own, so streams may interleave).
    """
    return _steps(*_prepare(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            stop_token_ids=stop_token_ids, seed=seed, logprobs=logprobs,
                            top_logprobs=top_logprobs, truncate_prompt=truncate_prompt))


def _prepare(model: GPT | Engine, prompts, max_new_tokens: int, *, temperature=0.0, top_k=None, top_p=None,
             stop_token_ids=(), seed=None, logprobs=False, top_logprobs=0,
             truncate_prompt=False) -> tuple[Engine, list[list[int]], Sampling]:
    """stream's options checked: a fresh engine, the prompts as they will be decoded, the sampling."""
    decoding = model.model if isinstance(model, Engine) else for_decoding(model)
    config = decoding.config
    sampling = Sampling(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=1.0 if top_p is None else top_p, logprobs=logprobs, top_logprobs=top_logprobs,
                        stop_ids=frozenset(stop_token_ids))
    if top_p is not None and top_p == 0.0:
        raise ValueError("top_p must be in (0, 1] or None, got 0.0")
    sampling.check(config.vocab_size)
    prompts = _check_prompts(prompts, config, max_new_tokens, truncate_prompt)
    return Engine(decoding, max_batch_size=len(prompts), seed=seed), prompts, sampling


def _steps(engine: Engine, prompts: list[list[int]], sampling: Sampling) -> Iterator[Step]:
    B = len(prompts)
    want_lp, want_top = sampling.logprobs, sampling.top_logprobs > 0
    events = engine.add([Sequence(str(i), p, sampling) for i, p in enumerate(prompts)])
    while True:
        out = Step(tokens=[None] * B, finish_reasons=[None] * B,
                   logprobs=[None] * B if want_lp else None, top_logprobs=[None] * B if want_top else None)
        for event in events:
            row = int(event.uid)
            out.tokens[row], out.finish_reasons[row] = event.token, event.finish_reason
            if want_lp and event.token is not None:
                out.logprobs[row] = event.logprob
            if want_top and event.token is not None:
                out.top_logprobs[row] = event.top
        yield out
        if not len(engine):
            return
        events = engine.step()  # inference mode inside: never across the yield, the caller's code stays normal


def generate(model: GPT | Engine, prompts, max_new_tokens: int = 256, **options) -> list[Completion]:
    """Run `stream` to the end; one Completion per prompt. Same options as stream."""
    engine, prompts, sampling = _prepare(model, prompts, max_new_tokens, **options)
    want_lp, want_top = sampling.logprobs, sampling.top_logprobs > 0
    done = [Completion(tokens=[], finish_reason="", prompt_tokens=len(p),
                       logprobs=[] if want_lp else None, top_logprobs=[] if want_top else None)
            for p in prompts]
    with torch.inference_mode():  # once for the whole loop, not per step: no caller code runs inside it
        for step in _steps(engine, prompts, sampling):
            for row, token in enumerate(step.tokens):
                if token is not None:
                    done[row].tokens.append(token)
                    if want_lp:
                        done[row].logprobs.append(step.logprobs[row])
                    if want_top:
                        done[row].top_logprobs.append(step.top_logprobs[row])
                if step.finish_reasons[row] is not None:
                    done[row].finish_reason = step.finish_reasons[row]
    return done
