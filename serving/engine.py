"""Continuous batching: many generation requests decoded together, joining and leaving at any step.

`llm.generate.Decoder` decodes a fixed batch that starts and ends together. A server needs more:
a request that arrives while others are half-way must start at once, and a finished one must
free its place at once. So the engine keeps one key/value cache with a row per running request,
each row at its own length:

    add([seq, ...])   prefill the newcomers' prompts (one padded forward pass) into free rows
                      and sample their first token
    step()            one token for every running row, in one batched forward pass
    cancel(uid)       drop a row (client gone, stop string found)

Rows stay packed at the front of the cache (a finished row is replaced by the last one), so each
step attends over `cache[:, :, :B]`, a view, never a gathered copy. Per row we keep its length;
a (B, 1, 1, S) mask hides the slots a row has not reached. Every row samples with its own
temperature / top_p / seed, and reports log-probabilities when it asked for them.

The forward pass is written here on plain tensors (as Decoder does, for speed), with weights
taken from the GPT module once (see _Linear for the batched matrix products). It covers every
switch of llm.model.ModelConfig; tests check its tokens against Decoder's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llm.model import GPT, apply_rope

LOGPROB_FLOOR = -9999.0  # log p of a token the model rules out: JSON has no -inf


@dataclass
class Sampling:
    """How one request picks its tokens. temperature 0 (or top_p 0) is greedy."""
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: bool = False          # report log p of each chosen token
    top_logprobs: int = 0           # and of the k likeliest alternatives
    stop_ids: frozenset[int] = frozenset()


@dataclass
class Sequence:
    """One request inside the engine."""
    uid: str
    prompt: list[int]
    sampling: Sampling
    rng: random.Random | None = None   # the request's own random numbers, when it has a seed
    length: int = 0                 # tokens in the cache
    last_token: int = -1            # sampled, not yet fed back in
    produced: int = 0               # output tokens so far (stop tokens not counted)


@dataclass
class TokenEvent:
    """What one step did for one request. token is None when the row stopped on a stop token."""
    uid: str
    token: int | None
    finish_reason: str | None = None          # 'stop' | 'length' when the row finished now
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


def _pack(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight prepacked for oneDNN's linear kernel, or None where that kernel is unavailable
    (not a CPU float32 weight, a torch without oneDNN, or a failed self-check)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 32)
        probe = torch.randn(2, weight.size(1))
        same = torch.allclose(torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], ""),
                              probe @ weight.t(), atol=1e-4, rtol=1e-4)
        return packed if same else None
    except (RuntimeError, AttributeError):
        return None


class _Linear:
    """One linear layer of the decoding pass.

    One row (batch-1 decoding) is a matrix-vector product: plain F.linear on the model's weight.
    Several rows go to oneDNN with a prepacked weight: on this project's 2-core AVX-512 CPU that
    was 2x faster than the default GEMM from 4 to 64 rows (torch 2.13), and it fuses the GELU.
    The op is torch's own (torch.compile's CPU backend emits it); without it, F.linear everywhere.
    """
    __slots__ = ("weight", "bias", "packed")

    def __init__(self, linear: torch.nn.Linear):
        self.weight = linear.weight.detach()
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.packed = _pack(self.weight)

    def __call__(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        if self.packed is not None and x.size(0) > 1:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "gelu" if gelu else "none",
                                                      [], "tanh" if gelu else "")
        y = F.linear(x, self.weight, self.bias)
        return F.gelu(y, approximate="tanh") if gelu else y


class _Weights:
    """A GPT's parameters as plain tensors and _Linear layers, in the order the pass reads them."""

    def __init__(self, model: GPT):
        c = model.config
        d = lambda p: None if p is None else p.detach()
        norm = lambda n: (d(getattr(n, "weight", None)), d(getattr(n, "bias", None)))
        self.layers = []
        for block in model.blocks:
            self.layers.append(dict(
                norm1=norm(block.norm1), qkv=_Linear(block.attn.qkv), proj=_Linear(block.attn.proj),
                norm2=norm(block.norm2), fc=_Linear(block.mlp.fc), out=_Linear(block.mlp.proj),
            ))
        self.final_norm = norm(model.final_norm)
        self.lm_head = _Linear(model.lm_head)
        self.tok_emb = model.tok_emb.weight.detach()
        self.pos_emb = model.pos_emb.weight.detach() if c.position == "learned" else None
        self.rope = (model.rope_cos, model.rope_sin) if c.position == "rope" else None


class Engine:
    """The batch of running requests and their key/value cache. Not thread-safe: one caller."""

    def __init__(self, model: GPT, max_batch_size: int = 32, seed: int | None = None,
                 vocab_limit: int | None = None):
        """vocab_limit: ids at or above it are never produced (a model's embedding table may be
        padded beyond its tokenizer's vocabulary)."""
        model.eval()
        c = self.config = model.config
        self.vocab_limit = vocab_limit if vocab_limit is not None and vocab_limit < c.vocab_size else None
        self.max_batch_size = max_batch_size
        self.H, self.Hkv, self.D = c.n_head, c.n_kv_head, c.head_dim
        self.group = self.H // self.Hkv
        self.scale = self.D ** -0.5
        self.pre_norm = c.norm_placement == "pre"
        self.w = _Weights(model)
        self.device, self.dtype = self.w.tok_emb.device, self.w.tok_emb.dtype
        self.rows: list[Sequence] = []            # row i lives in cache slot i
        self._slots = 0                           # cache time dimension, grown on demand
        self.kv = self._empty_cache(0)
        # Requests without a seed share one generator; seeded ones get their own.
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

    def _empty_cache(self, slots: int) -> torch.Tensor:
        # (layer, key/value, row, kv head, slot, head dim)
        return torch.zeros(self.config.n_layer, 2, self.max_batch_size, self.Hkv, slots, self.D,
                           dtype=self.dtype, device=self.device)

    def _reserve(self, slots: int) -> None:
        """Grow the cache's time dimension to hold `slots` positions (doubling, capped at the
        context): memory follows the longest running request, not the model's context."""
        if slots <= self._slots:
            return
        new = min(max(slots, 2 * self._slots, 64), self.config.context_length)
        grown = self._empty_cache(new)
        grown[..., :self._slots, :] = self.kv
        self.kv, self._slots = grown, new

    def _remove(self, i: int) -> None:
        """Free row i, moving the last row into its slot so that rows stay packed."""
        last = len(self.rows) - 1
        if i != last:
            n = self.rows[last].length
            self.kv[:, :, i, :, :n] = self.kv[:, :, last, :, :n]
            self.rows[i] = self.rows[last]
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
        first = len(self.rows)
        self.rows.extend(sequences)
        logits = self._prefill(first, sequences)
        for seq in sequences:
            seq.length = len(seq.prompt)
        return self._sample_and_retire(logits, list(range(first, first + len(sequences))))

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """One new token for every running request."""
        if not self.rows:
            return []
        logits = self._decode()
        for row in self.rows:
            row.length += 1
        return self._sample_and_retire(logits, list(range(len(self.rows))))

    # --- sampling ---

    def _sample_and_retire(self, logits: torch.Tensor, row_ids: list[int]) -> list[TokenEvent]:
        """Pick a token for each of `row_ids` (logits row j belongs to row_ids[j]), report it,
        and remove rows that finished."""
        rows = [self.rows[i] for i in row_ids]
        if self.vocab_limit is not None:
            logits[:, self.vocab_limit:] = float("-inf")
        tokens = self._choose(logits, rows)
        lp_rows = [j for j, r in enumerate(rows) if r.sampling.logprobs or r.sampling.top_logprobs]
        chosen_lp, tops = {}, {}
        if lp_rows:
            logp = logits[lp_rows].float().log_softmax(dim=-1)
            picked = logp.gather(-1, torch.tensor([tokens[j] for j in lp_rows])[:, None]).squeeze(-1).tolist()
            k = max(rows[j].sampling.top_logprobs for j in lp_rows)
            best = logp.topk(k, dim=-1) if k else None
            for n, j in enumerate(lp_rows):
                chosen_lp[j] = max(picked[n], LOGPROB_FLOOR)
                want = rows[j].sampling.top_logprobs
                if want:
                    tops[j] = [(i, max(v, LOGPROB_FLOOR)) for i, v in
                               zip(best.indices[n, :want].tolist(), best.values[n, :want].tolist())]
        events, finished = [], []
        context = self.config.context_length
        for j, (row_index, row) in enumerate(zip(row_ids, rows)):
            token = tokens[j]
            if token in row.sampling.stop_ids:
                events.append(TokenEvent(row.uid, None, "stop"))
                finished.append(row_index)
                continue
            row.last_token = token
            row.produced += 1
            event = TokenEvent(row.uid, token, logprob=chosen_lp.get(j), top=tops.get(j, []))
            # The token just sampled is fed back at slot `length`: the cache must have room.
            if row.produced >= row.sampling.max_tokens or row.length >= context:
                event.finish_reason = "length"
                finished.append(row_index)
            events.append(event)
        for i in sorted(finished, reverse=True):
            self._remove(i)
        return events

    def _choose(self, logits: torch.Tensor, rows: list[Sequence]) -> list[int]:
        """Greedy rows take the argmax; the others sample from temperature / top_p-shaped
        distributions, with their own random numbers if they have a seed."""
        tokens = logits.argmax(dim=-1).tolist()
        sampled = [j for j, r in enumerate(rows) if r.sampling.temperature > 0 and r.sampling.top_p > 0]
        if not sampled:
            return tokens
        temps = torch.tensor([rows[j].sampling.temperature for j in sampled], device=self.device)
        scaled = logits[sampled].float() / temps[:, None]
        top_p = torch.tensor([rows[j].sampling.top_p for j in sampled], device=self.device)
        if (top_p < 1).any():
            # Nucleus: keep the likeliest tokens until their mass reaches top_p (the best always kept).
            ordered, order = scaled.sort(dim=-1, descending=True)
            probs = ordered.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs
            ordered = ordered.masked_fill(mass_before >= top_p[:, None], float("-inf"))
            scaled = torch.full_like(scaled, float("-inf")).scatter(-1, order, ordered)
        # Inverse-CDF sampling, vectorised: one uniform number per row, from the row's own
        # generator when it has a seed (so its tokens do not depend on its batch neighbours).
        # Python's generator: a number costs ~0.1 us, a torch.Generator call ~5 us.
        uniform = torch.tensor([(rows[j].rng or self.rng).random() for j in sampled], device=self.device)
        cdf = scaled.softmax(dim=-1).cumsum(dim=-1)
        # side="right" never lands on a zero-probability token; the factor keeps u * total < total.
        target = uniform[:, None] * cdf[:, -1:] * (1 - 2 ** -20)
        picks = torch.searchsorted(cdf, target, side="right").squeeze(-1).clamp_(max=cdf.size(-1) - 1)
        for n, token in enumerate(picks.tolist()):
            tokens[sampled[n]] = token
        return tokens

    # --- the forward passes ---

    def _norm(self, x, weight_bias):
        weight, bias = weight_bias
        if self.config.norm == "rmsnorm":
            return F.rms_norm(x, (x.size(-1),), weight, self.config.norm_eps)
        return F.layer_norm(x, (x.size(-1),), weight, bias, self.config.norm_eps)

    def _block_rest(self, layer, x, attn_out):
        """Residual additions, norms and MLP after attention; x and attn_out are (N, C)."""
        def mlp(h):
            if self.config.mlp == "swiglu":
                gate, up = layer["fc"](h).chunk(2, dim=-1)
                h = F.silu(gate) * up
            else:
                h = layer["fc"](h, gelu=True)
            return layer["out"](h)
        if self.pre_norm:
            x = x + attn_out
            return x + mlp(self._norm(x, layer["norm2"]))
        x = self._norm(x + attn_out, layer["norm1"])
        return self._norm(x + mlp(x), layer["norm2"])

    def _readout(self, x):
        if self.pre_norm:
            x = self._norm(x, self.w.final_norm)
        return self.w.lm_head(x)

    def _prefill(self, first: int, sequences: list[Sequence]) -> torch.Tensor:
        """Run the newcomers' prompts, right-padded to the longest, as one batch; their keys and
        values go to rows first.. of the cache. Causal attention means a real token never sees
        the padding after it, so no mask is needed. Returns the last real token's logits (n, V)."""
        n, T = len(sequences), max(len(s.prompt) for s in sequences)
        H, Hkv, D = self.H, self.Hkv, self.D
        self._reserve(T)
        lengths = torch.tensor([len(s.prompt) for s in sequences], device=self.device)
        tokens = torch.zeros(n, T, dtype=torch.long, device=self.device)
        for i, s in enumerate(sequences):
            tokens[i, :len(s.prompt)] = torch.tensor(s.prompt, device=self.device)
        x = F.embedding(tokens, self.w.tok_emb)
        if self.w.pos_emb is not None:
            x = x + self.w.pos_emb[:T]
        x = x.reshape(n * T, -1)
        if self.w.rope is not None:
            cos, sin = (table[:T].to(self.dtype) for table in self.w.rope)
        for i, layer in enumerate(self.w.layers):
            h = self._norm(x, layer["norm1"]) if self.pre_norm else x
            qkv = layer["qkv"](h).view(n, T, H + 2 * Hkv, D).transpose(1, 2)
            q, k, v = qkv.split([H, Hkv, Hkv], dim=1)
            if self.w.rope is not None:
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            self.kv[i, 0, first:first + n, :, :T] = k
            self.kv[i, 1, first:first + n, :, :T] = v
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.group > 1)
            y = layer["proj"](y.transpose(1, 2).reshape(n * T, H * D))
            x = self._block_rest(layer, x, y)
        last = x.view(n, T, -1)[torch.arange(n, device=self.device), lengths - 1]
        return self._readout(last)

    def _decode(self) -> torch.Tensor:
        """Feed every row's last token at its own position; returns next-token logits (B, V)."""
        B = len(self.rows)
        H, Hkv, D = self.H, self.Hkv, self.D
        positions = torch.tensor([r.length for r in self.rows], device=self.device)
        tokens = torch.tensor([r.last_token for r in self.rows], device=self.device)
        S = int(positions.max()) + 1
        self._reserve(S)
        rows = torch.arange(B, device=self.device)
        # A row attends to its own slots 0..position; longer rows' slots are hidden from it.
        hidden = (torch.arange(S, device=self.device)[None, :] > positions[:, None]).view(B, 1, 1, S)
        x = F.embedding(tokens, self.w.tok_emb)
        if self.w.pos_emb is not None:
            x = x + self.w.pos_emb[positions]
        if self.w.rope is not None:
            cos, sin = (table[positions].to(self.dtype).view(B, 1, D) for table in self.w.rope)
        for i, layer in enumerate(self.w.layers):
            h = self._norm(x, layer["norm1"]) if self.pre_norm else x
            qkv = layer["qkv"](h).view(B, H + 2 * Hkv, D)
            q, k, v = qkv.split([H, Hkv, Hkv], dim=1)
            if self.w.rope is not None:
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            self.kv[i, 0, rows, :, positions] = k
            self.kv[i, 1, rows, :, positions] = v
            # One query per row: the G query heads sharing a key/value head become G query rows.
            # Written out rather than SDPA: with a single query per row, three plain ops were
            # about 2x faster than the fused CPU kernel with a mask (torch 2.13, 2 cores).
            scores = q.reshape(B, Hkv, self.group, D) @ self.kv[i, 0, :B, :, :S].transpose(-1, -2)
            scores = (scores * self.scale).masked_fill_(hidden, float("-inf"))
            y = scores.softmax(dim=-1) @ self.kv[i, 1, :B, :, :S]
            y = layer["proj"](y.reshape(B, H * D))
            x = self._block_rest(layer, x, y)
        return self._readout(x)
