"""Text generation: a key/value cache, sampling, stop tokens, streaming, log-probabilities.

Generating token n+1 needs the keys and values of tokens 1..n at every layer. Recomputing them
each step makes generation quadratic; caching them makes each step one token's worth of work.

    decoder = Decoder(model)                       # lays the weights out once (see below)
    for step in decoder.stream([prompt_ids], max_new_tokens=50, temperature=0.8, seed=0):
        print(step.tokens[0])                      # one new token per row per step
    [completion] = generate(model, [prompt_ids], max_new_tokens=50)   # or all at once

Why a separate forward pass instead of `model(...)`: one decode step of a small model is ~60
small operations, and around each one `model(...)` adds module calls, autograd bookkeeping and
shape juggling for T tokens. The step here calls torch functions directly on plain tensors under
inference_mode, with the fewest operations we could manage (one matmul for q, k and v; k and v
written into a preallocated cache with one copy; no repeated keys for grouped-query attention),
and linear weights stored (in, out), the layout CPU matmul kernels read fastest for one row.
What remains at the 'tiny' size on a 2-core CPU is mostly reading the weights: ~21 MB of fp32
per token, more than the cache holds, so each step streams them from memory (bench/decode.py).
The tests check that this path produces the same tokens as recomputing the whole sequence
with `model(...)`, for every architecture switch.

Batches of prompts with different lengths are left-padded, so every row's newest token sits in
the same cache slot; a mask hides the padding and each row counts its positions from its own
first token. Rows finish independently ('stop' on a stop token, 'length' at max_new_tokens or
the context limit); the batch stops when all have.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llm.model import GPT, apply_rope


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


# --- sampling -----------------------------------------------------------------------------------

def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from logits (B, V). temperature 0 is greedy (argmax)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Nucleus sampling: keep the likeliest tokens until their mass reaches top_p.
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs      # the top token always has 0 before it: kept
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _check_sampling(max_new_tokens, temperature, top_k, top_p, top_logprobs, vocab_size):
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    if not 0 <= top_logprobs <= vocab_size:
        raise ValueError(f"top_logprobs must be in [0, {vocab_size}], got {top_logprobs}")


# --- the decoder --------------------------------------------------------------------------------

class _Layer:
    """One block's weights as plain tensors. Linear weights are stored (in, out), ready for
    x @ W (see _input_major); biases and norm parameters as they are; None where absent."""
    __slots__ = ("norm1_w", "norm1_b", "qkv_w", "qkv_b", "proj_w", "proj_b",
                 "norm2_w", "norm2_b", "fc_w", "fc_b", "out_w", "out_b")


def _input_major(weight: torch.Tensor) -> torch.Tensor:
    """A linear layer's (out, in) weight as (in, out) for `x @ W`.

    On CPU we copy it into that layout: multiplying one row x by a weight stored (in, out) was
    20-30% faster than by one stored (out, in) (measured with torch 2.13 on the 2-core AVX-512
    CPU this project runs on), and batch-1 decoding is almost all such products. Elsewhere the
    transposed view is as fast, and costs no memory.
    """
    weight = weight.detach().t()
    return weight.contiguous() if weight.device.type == "cpu" else weight


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (N, in) @ weight (in, out) + bias: one addmm call."""
    if bias is None:
        return torch.mm(x, weight)
    return torch.addmm(bias, x, weight)


class _Cache:
    """Per-stream state: the key/value cache and the padding bookkeeping of one batch.

    One tensor holds every layer's keys and values, allocated once, token-major:
    (layer, B, slot, k heads then v heads, D). The k and v of a new token are then one
    contiguous piece of the qkv projection's output and go into the cache with one copy.
    keys[i] / values[i] are layer i's (B, kv heads, slot, D) views for attention.
    A compiled decoder's cache always has key_valid, first_slot and slot_ids, so that every
    step takes the same inputs; in_use marks a cache that a running stream holds.
    """
    __slots__ = ("kv", "keys", "values", "key_valid", "first_slot", "slot_ids", "in_use")


class Decoder:
    """A GPT's weights laid out for fast cached decoding.

    Build it once per trained model and call `stream` / `generate` as often as you like. On CPU
    it holds a copy of the linear weights: rebuild it if the model changes. compile=True
    decodes through torch.compile (see `compile`).
    """

    def __init__(self, model: GPT, compile: bool = False):
        c = self.config = model.config
        self.n_head, self.n_kv_head, self.head_dim = c.n_head, c.n_kv_head, c.head_dim
        self.group = c.n_head // c.n_kv_head
        self.pre_norm = c.norm_placement == "pre"
        self.rms = c.norm == "rmsnorm"
        self.rope = c.position == "rope"
        self.swiglu = c.mlp == "swiglu"
        self.eps = c.norm_eps

        def norm_params(norm):
            weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
            return (None if weight is None else weight.detach()), (None if bias is None else bias.detach())

        def bias_of(linear):
            return None if linear.bias is None else linear.bias.detach()

        self.layers = []
        for block in model.blocks:
            layer = _Layer()
            layer.norm1_w, layer.norm1_b = norm_params(block.norm1)
            layer.qkv_w, layer.qkv_b = _input_major(block.attn.qkv.weight), bias_of(block.attn.qkv)
            layer.proj_w, layer.proj_b = _input_major(block.attn.proj.weight), bias_of(block.attn.proj)
            layer.norm2_w, layer.norm2_b = norm_params(block.norm2)
            layer.fc_w, layer.fc_b = _input_major(block.mlp.fc.weight), bias_of(block.mlp.fc)
            layer.out_w, layer.out_b = _input_major(block.mlp.proj.weight), bias_of(block.mlp.proj)
            self.layers.append(layer)
        self.final_norm_w, self.final_norm_b = norm_params(model.final_norm)
        self.lm_head = _input_major(model.lm_head.weight)
        self.tok_emb = model.tok_emb.weight.detach()
        self.pos_emb = model.pos_emb.weight.detach() if c.position == "learned" else None
        self.device, self.dtype = self.tok_emb.device, self.tok_emb.dtype
        if self.rope:
            self.rope_cos = model.rope_cos.to(self.dtype)
            self.rope_sin = model.rope_sin.to(self.dtype)
        self.compiled = False
        self._decode_step = self._decode
        self._static_caches: dict[tuple[int, int], _Cache] = {}   # (batch, slots) -> cache, if compiled
        if compile:
            self.compile()

    def compile(self, **options) -> Decoder:
        """Decode through torch.compile with fixed shapes; on a GPU, replay the step as a CUDA graph.

        A decode step of a small model at batch 1 is launch-bound: ~100 tiny kernels, each of which
        costs more to launch than to run. A CUDA graph launches them all at once, but it replays
        fixed shapes at fixed addresses. So a compiled decoder rounds its caches' slots up to a
        power of two, passes the slot as a tensor, and attends over the whole cache with a mask
        that hides the slots not written yet: one compiled step per (batch size, slot count),
        whatever the prompts' lengths. Past torch's limit of compilations per function
        (torch._dynamo.config.recompile_limit, 8) new shapes run uncompiled.
        On a CPU it compiles too but replays no graph, and was slower than the plain decoder in
        bench/decode.py (memory-bound, not launch-bound). options go to torch.compile, e.g.
        fullgraph=True, backend="eager" to check that the step traces as one graph.
        """
        options = {"dynamic": False,
                   "mode": "reduce-overhead" if self.device.type == "cuda" else None, **options}
        if options.get("backend", "inductor") != "inductor":
            options.pop("mode")                                # modes belong to inductor
        if self.device.type == "cuda":
            # The weights are plain tensors, not parameters: without this, a CUDA graph would
            # copy every one of them into its own buffers before each replay.
            for tensor in self._tensors():
                torch._dynamo.mark_static_address(tensor)
        self.compiled = True
        self._decode_step = torch.compile(self._decode, **options)
        return self

    def _tensors(self) -> Iterator[torch.Tensor]:
        for layer in self.layers:
            yield from (getattr(layer, name) for name in _Layer.__slots__ if getattr(layer, name) is not None)
        extra = (self.final_norm_w, self.final_norm_b, self.lm_head, self.tok_emb, self.pos_emb,
                 getattr(self, "rope_cos", None), getattr(self, "rope_sin", None))
        yield from (t for t in extra if t is not None)

    # --- public API ---

    def stream(self, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int = 256, *,
               temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
               stop_token_ids: Iterable[int] = (), seed: int | None = None,
               generator: torch.Generator | None = None, logprobs: bool = False, top_logprobs: int = 0,
               truncate_prompt: bool = False) -> Iterator[Step]:
        """Yield one Step per decoding step until every row has finished.

        prompts: a batch of token id lists (lengths may differ) or a (B, T) tensor.
        temperature 0 = greedy; otherwise sample, after top_k / top_p filtering, from a
        torch.Generator seeded with `seed` (or the one given). logprobs / top_logprobs add the
        model's log-probabilities (temperature 1, unfiltered) of the chosen / likeliest tokens.
        A prompt longer than the context raises ValueError, unless truncate_prompt=True, which
        drops a prompt's oldest tokens so that it leaves room for max_new_tokens.
        Everything is checked here, before the first step, so a stream never fails half-way.
        """
        _check_sampling(max_new_tokens, temperature, top_k, top_p, top_logprobs, self.config.vocab_size)
        prompts = self._prepare_prompts(prompts, max_new_tokens, truncate_prompt)
        if generator is None and seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        return self._steps(prompts, max_new_tokens, sampling, frozenset(stop_token_ids),
                           logprobs, top_logprobs)

    def generate(self, prompts, max_new_tokens: int = 256, **options) -> list[Completion]:
        """Run `stream` to the end; one Completion per prompt. Same options as stream."""
        prompts = self._prepare_prompts(prompts, max_new_tokens, options.get("truncate_prompt", False))
        want_lp, want_top = options.get("logprobs", False), options.get("top_logprobs", 0) > 0
        done = [Completion(tokens=[], finish_reason="", prompt_tokens=len(p),
                           logprobs=[] if want_lp else None, top_logprobs=[] if want_top else None)
                for p in prompts]
        for step in self.stream(prompts, max_new_tokens, **options):
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

    # --- prompts and the step loop ---

    def _prepare_prompts(self, prompts, max_new_tokens: int, truncate: bool) -> list[list[int]]:
        if isinstance(prompts, torch.Tensor):
            if prompts.dim() != 2:
                raise ValueError(f"a prompt tensor must be (batch, tokens), got shape {tuple(prompts.shape)}")
            prompts = prompts.tolist()
        if len(prompts) == 0:
            raise ValueError("no prompts given")
        context, vocab = self.config.context_length, self.config.vocab_size
        room = max(1, context + 1 - max_new_tokens)  # the last new token is never fed back in
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

    def _new_cache(self, prompts: list[list[int]], budgets: list[int]) -> _Cache:
        B, longest = len(prompts), max(len(p) for p in prompts)
        pad = [longest - len(p) for p in prompts]
        n_slots = longest + max(budgets) - 1  # every new token but the last is fed back in
        if self.compiled:
            return self._static_cache(pad, n_slots)
        cache = self._allocate(B, n_slots)
        if any(pad):
            cache.slot_ids = torch.arange(n_slots, device=self.device)
            self._set_padding(cache, pad)
        return cache

    def _allocate(self, B: int, n_slots: int) -> _Cache:
        Hkv = self.n_kv_head
        cache = _Cache()
        # Zeros, not empty: a compiled step reads every slot, and a masked-out NaN would still
        # turn the attention output into NaN (0 * NaN).
        cache.kv = torch.zeros(self.config.n_layer, B, n_slots, 2 * Hkv, self.head_dim,
                               dtype=self.dtype, device=self.device)
        cache.keys = [layer[:, :, :Hkv].transpose(1, 2) for layer in cache.kv]
        cache.values = [layer[:, :, Hkv:].transpose(1, 2) for layer in cache.kv]
        cache.key_valid = cache.first_slot = cache.slot_ids = None
        cache.in_use = False
        return cache

    def _set_padding(self, cache: _Cache, pad: list[int]) -> None:
        pad_t = torch.tensor(pad, device=self.device)
        # (B, 1, 1, slots): a row attends to every slot from its first real token on.
        key_valid = (cache.slot_ids[None, :] >= pad_t[:, None])[:, None, None, :]
        if cache.first_slot is None:
            cache.key_valid, cache.first_slot = key_valid, pad_t  # positions count from a row's first token
        else:  # in place: a recorded CUDA graph reads these very tensors
            cache.key_valid.copy_(key_valid)
            cache.first_slot.copy_(pad_t)

    def _static_cache(self, pad: list[int], n_slots: int) -> _Cache:
        """A compiled decoder's cache. Its slots are rounded up to a power of two, so that streams
        of one batch size share a few shapes, each compiled once; and it is kept for the next
        stream of the same shape, because a CUDA graph replays the addresses it recorded: a new
        cache would make it record again (after 128 records torch gives up on it). The keys and
        values of the last stream stay in the slots, hidden by the mask until overwritten."""
        key = len(pad), 1 << (n_slots - 1).bit_length()
        cache = self._static_caches.get(key)
        if cache is None or cache.in_use:                  # in use: two streams at once
            cache = self._allocate(*key)
            cache.slot_ids = torch.arange(key[1], device=self.device)
            self._set_padding(cache, pad)
            if self.device.type == "cuda":
                for tensor in (cache.kv, cache.key_valid, cache.first_slot, cache.slot_ids):
                    torch._dynamo.mark_static_address(tensor)   # written in place, not copied in
            self._static_caches.setdefault(key, cache)
        else:
            self._set_padding(cache, pad)
        return cache

    def _steps(self, prompts, max_new_tokens, sampling, stop_ids, want_logprobs, top_logprobs):
        context = self.config.context_length
        budgets = [min(max_new_tokens, context + 1 - len(p)) for p in prompts]
        cache = self._new_cache(prompts, budgets)
        cache.in_use = True
        try:
            yield from self._run(cache, prompts, budgets, sampling, stop_ids, want_logprobs, top_logprobs)
        finally:
            cache.in_use = False

    def _run(self, cache, prompts, budgets, sampling, stop_ids, want_logprobs, top_logprobs):
        B, longest = len(prompts), max(len(p) for p in prompts)
        produced, finished = [0] * B, [False] * B
        # Left-pad so that every row's newest token is in the same slot.
        tokens = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=self.device)
        # inference_mode around each piece of work, never across a yield: the caller's code
        # between steps must not run in inference mode.
        with torch.inference_mode():
            logits = self._prefill(cache, tokens)
            slots = cache.slot_ids if self.compiled else range(cache.kv.size(2))  # a tensor keeps shapes fixed
        for step in range(max(budgets)):
            with torch.inference_mode():
                next_tokens = sample_next_token(logits, **sampling)
                lp_all = (logits.float().log_softmax(dim=-1) if want_logprobs or top_logprobs else None)
            ids = next_tokens.tolist()
            out = Step(tokens=[None] * B, finish_reasons=[None] * B)
            if want_logprobs:
                out.logprobs = [None] * B
                chosen = lp_all.gather(-1, next_tokens[:, None]).squeeze(-1).tolist()
            if top_logprobs:
                out.top_logprobs = [None] * B
                best = lp_all.topk(top_logprobs, dim=-1)
                best_lp, best_ids = best.values.tolist(), best.indices.tolist()
            for row, token in enumerate(ids):
                if finished[row]:
                    continue
                if token in stop_ids:
                    finished[row], out.finish_reasons[row] = True, "stop"
                    continue
                out.tokens[row] = token
                if want_logprobs:
                    out.logprobs[row] = chosen[row]
                if top_logprobs:
                    out.top_logprobs[row] = list(zip(best_ids[row], best_lp[row]))
                produced[row] += 1
                if produced[row] == budgets[row]:
                    finished[row], out.finish_reasons[row] = True, "length"
            yield out
            if all(finished):
                return
            with torch.inference_mode():
                if self.compiled and self.device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()   # the last step's logits are read
                logits = self._decode_step(cache, next_tokens, slots[longest + step])

    # --- the forward passes ---

    def _norm(self, x, weight, bias):
        if self.rms:
            return F.rms_norm(x, (x.size(-1),), weight, self.eps)
        return F.layer_norm(x, (x.size(-1),), weight, bias, self.eps)

    def _mlp(self, layer: _Layer, x):
        h = _linear(x, layer.fc_w, layer.fc_b)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return _linear(h, layer.out_w, layer.out_b)

    def _after_attention(self, layer: _Layer, x, attn_out):
        """The residual additions, norms and MLP that follow attention in a block.
        x and attn_out are (N, C): rows are tokens."""
        if self.pre_norm:
            x = x + attn_out
            return x + self._mlp(layer, self._norm(x, layer.norm2_w, layer.norm2_b))
        x = self._norm(x + attn_out, layer.norm1_w, layer.norm1_b)
        return self._norm(x + self._mlp(layer, x), layer.norm2_w, layer.norm2_b)

    def _prefill(self, cache: _Cache, tokens: torch.Tensor) -> torch.Tensor:
        """All prompt tokens at once (B, T): fill cache slots 0..T-1, return the last logits (B, V)."""
        B, T = tokens.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        slots = torch.arange(T, device=self.device)
        if cache.first_slot is None:
            positions, mask = slots, None                       # plain causal attention
        else:
            positions = (slots[None, :] - cache.first_slot[:, None]).clamp(min=0)
            causal = slots[:, None] >= slots[None, :]
            # Padding queries attend to themselves only, so no softmax row is empty.
            mask = (causal & cache.key_valid[:, :, :, :T]) | torch.eye(T, dtype=torch.bool, device=self.device)
        x = F.embedding(tokens, self.tok_emb)
        if self.pos_emb is not None:
            x = x + self.pos_emb[positions]
        x = x.reshape(B * T, -1)                                # rows are tokens, as in _decode
        if self.rope:
            cos = self.rope_cos[positions].view(-1, 1, T, D)
            sin = self.rope_sin[positions].view(-1, 1, T, D)
        for i, layer in enumerate(self.layers):
            h = self._norm(x, layer.norm1_w, layer.norm1_b) if self.pre_norm else x
            qkv = _linear(h, layer.qkv_w, layer.qkv_b).view(B, T, H + 2 * Hkv, D)
            cache.kv[i, :, :T] = qkv[:, :, H:]                  # keys (before RoPE) and values
            q, k, v = qkv.transpose(1, 2).split([H, Hkv, Hkv], dim=1)  # (B, heads, T, D)
            if self.rope:
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
                cache.keys[i][:, :, :T] = k
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=self.group > 1)
            y = _linear(y.transpose(1, 2).reshape(B * T, H * D), layer.proj_w, layer.proj_b)
            x = self._after_attention(layer, x, y)
        x = x.view(B, T, -1)[:, -1]
        if self.pre_norm:
            x = self._norm(x, self.final_norm_w, self.final_norm_b)
        return torch.mm(x, self.lm_head)

    def _decode(self, cache: _Cache, tokens: torch.Tensor, slot: int | torch.Tensor) -> torch.Tensor:
        """One new token per row (B,), written to cache `slot`; returns the next logits (B, V).
        The hot loop of generation: kept to the fewest torch calls. `slot` is an int, or a 0-dim
        tensor when compiled: then every shape is fixed and a mask hides the slots after it."""
        B = tokens.size(0)
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        compiled = isinstance(slot, torch.Tensor)
        if compiled:
            n = cache.kv.size(2)                                # every slot, masked
            positions = (slot - cache.first_slot).clamp(max=self.config.context_length - 1)
            mask = cache.key_valid & (cache.slot_ids <= slot)
            slot = slot.view(1)                                 # an index for index_copy_
        elif cache.first_slot is None:
            n, positions, mask = slot + 1, slot, None           # same position in every row
        else:
            n = slot + 1                                        # the slots written so far
            positions = (slot - cache.first_slot).clamp_(max=self.config.context_length - 1)
            mask = cache.key_valid.narrow(3, 0, n)
        x = F.embedding(tokens, self.tok_emb)                   # (B, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb[positions]
        if self.rope:
            cos = self.rope_cos[positions].view(-1, 1, D)       # broadcast over heads
            sin = self.rope_sin[positions].view(-1, 1, D)
        for i, (layer, kv) in enumerate(zip(self.layers, cache.kv)):
            if compiled:  # views made in the graph: the cache enters it as one tensor, not with its aliases
                keys, values = kv.narrow(2, 0, Hkv).transpose(1, 2), kv.narrow(2, Hkv, Hkv).transpose(1, 2)
            else:
                keys, values = cache.keys[i], cache.values[i]
            h = self._norm(x, layer.norm1_w, layer.norm1_b) if self.pre_norm else x
            qkv = _linear(h, layer.qkv_w, layer.qkv_b).view(B, H + 2 * Hkv, D)
            _store(kv, slot, qkv.narrow(1, H, 2 * Hkv))          # k and v in one copy
            q = qkv.narrow(1, 0, H)
            if self.rope:  # rotate q and k together, then overwrite the cached keys with rotated ones
                qk = apply_rope(qkv.narrow(1, 0, H + Hkv), cos, sin)
                q = qk.narrow(1, 0, H)
                _store(kv.narrow(2, 0, Hkv), slot, qk.narrow(1, H, Hkv))
            # With one query per row, grouped-query attention needs no repeated keys: the G query
            # heads that share a key/value head become G query rows against it.
            y = F.scaled_dot_product_attention(q.reshape(B, Hkv, self.group, D), keys.narrow(2, 0, n),
                                               values.narrow(2, 0, n), attn_mask=mask)
            y = _linear(y.reshape(B, H * D), layer.proj_w, layer.proj_b)
            x = self._after_attention(layer, x, y)
        if self.pre_norm:
            x = self._norm(x, self.final_norm_w, self.final_norm_b)
        return torch.mm(x, self.lm_head)


def _store(cache: torch.Tensor, slot: int | torch.Tensor, rows: torch.Tensor) -> None:
    """Write rows (B, heads, D) into slot `slot` of a layer's cache (B, slots, heads, D).
    select + copy_ for an int: one cheap call, no index parsing; index_copy_ for a tensor slot,
    which a compiled step can take without baking the slot into the graph."""
    if isinstance(slot, int):
        cache.select(1, slot).copy_(rows)
    else:
        cache.index_copy_(1, slot, rows.unsqueeze(1))


# --- convenience --------------------------------------------------------------------------------

def _decoder(model: GPT | Decoder) -> Decoder:
    return model if isinstance(model, Decoder) else Decoder(model)


def stream(model: GPT | Decoder, prompts, max_new_tokens: int = 256, **options) -> Iterator[Step]:
    """Decoder(model).stream(...); pass a Decoder to skip re-packing the weights."""
    return _decoder(model).stream(prompts, max_new_tokens, **options)


def generate(model: GPT | Decoder, prompts, max_new_tokens: int = 256, **options) -> list[Completion]:
    """Decoder(model).generate(...); pass a Decoder to skip re-packing the weights."""
    return _decoder(model).generate(prompts, max_new_tokens, **options)
