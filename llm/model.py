"""The model: one GPT class that covers the GPT-2 family and the LLaMA family.

Read top to bottom: the config (every architectural switch the from-scratch accounts discuss is one
field), the presets, the building blocks (norm, rotary positions, attention, MLP, block), the GPT
itself with its key/value cache (the one forward pass: training, introspection, generation and
the server all call it), then parameter and FLOP counts. Saving and loading: llm/checkpoint.py.

Switches are plain `if`s on the config, so what a GPT-2 does and what a LLaMA does differently is
visible in one place:

    GPT-2:  learned positions, LayerNorm,  GELU MLP,   biases,    multi-head attention
    LLaMA:  rotary positions,  RMSNorm,    SwiGLU MLP, no biases, grouped-query attention

Both are pre-norm; post-norm (the original Transformer's placement) is there to compare against.
Shapes in comments: B batch, T time (tokens), C model width (d_model), H heads, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm.plain import PlainDict

IGNORE_INDEX = -100  # targets equal to this are left out of the loss (e.g. prompt tokens in fine-tuning)

MLP_KINDS = ("gelu", "swiglu")
NORM_KINDS = ("layernorm", "rmsnorm")
NORM_PLACEMENTS = ("pre", "post")
POSITION_KINDS = ("learned", "rope")


# --- config -------------------------------------------------------------------------------------

@dataclass
class ModelConfig(PlainDict):
    """Everything that decides the architecture. The defaults are the 'tiny' preset."""

    vocab_size: int = 8192
    context_length: int = 256      # the most tokens one forward pass sees
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0             # key/value heads; 0 means n_head (multi-head attention), fewer is GQA
    d_model: int = 256
    mlp: str = "gelu"              # 'gelu' (GPT-2) or 'swiglu' (LLaMA)
    d_ff: int = 0                  # MLP hidden width; 0 picks the usual default for the MLP kind
    norm: str = "layernorm"        # 'layernorm' (GPT-2) or 'rmsnorm' (LLaMA)
    norm_placement: str = "pre"    # 'pre' (GPT-2 and later) or 'post' (the original Transformer)
    position: str = "learned"      # 'learned' absolute embeddings (GPT-2) or 'rope' rotary (LLaMA)
    rope_theta: float = 10000.0
    qkv_bias: bool = True          # bias on the query/key/value projection
    qk_norm: bool = False          # RMS-normalise each head's queries and keys (OLMo 2, Qwen3): bounds the attention logits
    bias: bool = True              # bias on every other linear layer and on LayerNorm
    dropout: float = 0.0
    tie_embeddings: bool = True    # the output layer reuses the token embedding matrix
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "d_model"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        _check_choice("mlp", self.mlp, MLP_KINDS)
        _check_choice("norm", self.norm, NORM_KINDS)
        _check_choice("norm_placement", self.norm_placement, NORM_PLACEMENTS)
        _check_choice("position", self.position, POSITION_KINDS)
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"ModelConfig.n_head={self.n_head} must divide d_model={self.d_model} "
                f"(each head gets d_model / n_head dimensions)")
        if self.n_kv_head < 0:
            raise ValueError(f"ModelConfig.n_kv_head must be >= 0 (0 = n_head), got {self.n_kv_head}")
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(
                f"ModelConfig.n_kv_head={self.n_kv_head} must divide n_head={self.n_head} "
                f"(each key/value head serves an equal group of query heads)")
        if self.position == "rope" and self.head_dim % 2 != 0:
            raise ValueError(
                f"ModelConfig.position='rope' needs an even head dim (d_model / n_head), got "
                f"{self.head_dim}: rotary embeddings rotate pairs of dimensions")
        if self.d_ff < 0:
            raise ValueError(f"ModelConfig.d_ff must be >= 0 (0 = default), got {self.d_ff}")
        if self.d_ff == 0:
            self.d_ff = default_d_ff(self.d_model, self.mlp)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def from_preset(cls, name: str, *, depth: int | None = None, **overrides) -> "ModelConfig":
        """A preset, with any field replaced: `ModelConfig.from_preset('tiny', n_layer=2)`.
        depth resizes it first (see shape_for_depth): `from_preset('llama-tiny', depth=8)`."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
        preset = PRESETS[name]
        resized = shape_for_depth(depth, preset) if depth is not None else {}
        return cls.from_dict({**preset, **resized, **overrides})


def _check_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"ModelConfig.{field} must be one of {allowed}, got {value!r}")


def default_d_ff(d_model: int, mlp: str) -> int:
    """4x width for GELU (GPT-2). SwiGLU has three matrices instead of two, so LLaMA shrinks the
    hidden width to 2/3 of 4x to keep the parameter count, rounded up to a multiple of 64."""
    if mlp == "gelu":
        return 4 * d_model
    return 64 * math.ceil(8 * d_model / 3 / 64)


# --- presets ------------------------------------------------------------------------------------

def shape_for_depth(depth: int, preset: dict) -> dict:
    """One dial for the model's size, as in nanochat: `depth` layers, 64 * depth wide, in heads
    of 64 dimensions, the MLP at its default width. Width grows with depth so the model keeps
    the aspect ratio of GPT-2 (depth 12 is GPT-2 124M's shape; the 'tiny' preset is depth 4).
    Grouped-query presets keep their heads-per-key/value-head ratio where it divides."""
    if not (isinstance(depth, int) and depth >= 1):
        raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
    group = preset["n_head"] // (preset.get("n_kv_head") or preset["n_head"])
    return {"n_layer": depth, "d_model": 64 * depth, "n_head": depth,
            "n_kv_head": depth // group if depth % group == 0 else depth, "d_ff": 0}


_GPT2 = dict(mlp="gelu", norm="layernorm", position="learned", qkv_bias=True, bias=True,
             tie_embeddings=True, vocab_size=50257, context_length=1024)
_LLAMA = dict(mlp="swiglu", norm="rmsnorm", position="rope", qkv_bias=False, bias=False)

PRESETS: dict[str, dict] = {
    # The CPU default: trains on 2 cores in minutes. GPT-2 style so it exports to GPT2LMHeadModel.
    "tiny": dict(vocab_size=8192, context_length=256, n_layer=4, n_head=4, n_kv_head=4, d_model=256,
                 mlp="gelu", norm="layernorm", position="learned", qkv_bias=True, bias=True,
                 tie_embeddings=True),
    # The LLaMA recipe at the same size, with grouped-query attention (2 key/value heads for 4).
    "llama-tiny": dict(_LLAMA, vocab_size=8192, context_length=256, n_layer=4, n_head=4, n_kv_head=2,
                       d_model=256, tie_embeddings=True),
    # The GPT-2 paper's sizes (124M counts the tied embedding once).
    "gpt2-124m": dict(_GPT2, n_layer=12, n_head=12, d_model=768),
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, d_model=1024),
    "gpt2-large": dict(_GPT2, n_layer=36, n_head=20, d_model=1280),
    "gpt2-xl": dict(_GPT2, n_layer=48, n_head=25, d_model=1600),
    # A ~100M LLaMA-style model: 12 layers, width 768, 12 query heads sharing 4 key/value heads.
    "llama-100m": dict(_LLAMA, vocab_size=32000, context_length=1024, n_layer=12, n_head=12,
                       n_kv_head=4, d_model=768, d_ff=2048, tie_embeddings=True),
}


# --- building blocks ----------------------------------------------------------------------------

def make_norm(config: ModelConfig) -> nn.Module:
    # RMSNorm drops LayerNorm's mean subtraction and bias: cheaper, and trains as well.
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


def rope_tables(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every (position, frequency) angle, each (context_length, D).

    Pair i of a head's dimensions turns at frequency theta^(-2i/D). We pair dimension i with
    dimension i + D/2 (the 'rotate half' layout Hugging Face's LLaMA uses), so LLaMA weights
    convert by plain copy, with no permutation of the query/key rows.
    """
    half = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, half, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(config.context_length, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # the same angle for dimension i and i + D/2
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x[i], x[i + D/2]) pair by its position's angle. x: (B, H, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated_half = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated_half * sin


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """F.dropout, skipped outright at p = 0 (inference, or a model without dropout): identical
    output, no random numbers drawn either way, and no call in the decoding loop."""
    return F.dropout(x, p=p) if p > 0 else x


def attention_with_probs(q, k, v, mask, dropout_p: float = 0.0):
    """The explicit attention computation, returning the probabilities too.

    q: (B, H, T, D); k, v: (B, H, S, D); mask: (B or 1, 1, T, S) booleans, True = may attend.
    Numerically the same as F.scaled_dot_product_attention; slower, and it materialises the
    (T, S) matrix that the fused kernel never builds.
    """
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    y = F.dropout(probs, p=dropout_p) @ v
    return y, probs


# From this many rows decoding one token each, plain matmuls beat the fused kernel even without a
# mask on CPU (a server's full batch; bench/decode.py --batch-sizes 1,8,32 shows the step time).
MANY_ROWS = 16


def attend(q, k, v, mask, dropout_p: float = 0.0):
    """softmax(q k^T / sqrt(D)) v, each query over the keys `mask` allows (None: causal, or every
    key for a single query), with the heads side by side. q: (B, H, T, D); k, v: (B, Hkv, S, D),
    Hkv dividing H. Returns (B, T, H * D).

    The math is attention_with_probs'; this picks the kernel. A single query per row (decoding
    one token) is the common case of generation: the G query heads that share a key/value head
    become G query rows against it, so grouped-query attention never repeats keys; with a
    mask, or with many rows, three plain ops beat the fused kernel on CPU (bench/decode.py).
    """
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if T == 1 and dropout_p == 0.0:
        if Hkv != H:
            q = q.reshape(B, Hkv, H // Hkv, D)
        if mask is None and B < MANY_ROWS:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            scores = (q @ k.transpose(-2, -1)) * D ** -0.5
            if mask is not None:
                scores = torch.where(mask, scores, float("-inf"))  # one op: masked_fill_ needs ~mask first
            y = scores.softmax(dim=-1) @ v
        return y.reshape(B, 1, H * D)  # (B, Hkv, G, D) holds each row's heads side by side
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                       dropout_p=dropout_p, enable_gqa=Hkv != H)
    return y.transpose(1, 2).reshape(B, T, H * D)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer  # which of the cache's layers holds this block's keys and values
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # One matrix computes queries, keys and values: one matmul instead of three.
        qkv_width = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.qkv = nn.Linear(config.d_model, qkv_width, bias=config.qkv_bias)
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps)
        self.qk_norm = config.qk_norm
        self.proj = nn.Linear(config.n_head * config.head_dim, config.d_model, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x, rope, mask, return_attention: bool, cache: KVCache | None = None):
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split_with_sizes([self.n_head, self.n_kv_head, self.n_kv_head], dim=1)  # (B, H or Hkv, T, D)
        if self.qk_norm:  # each head's queries and keys at unit RMS: logits cannot grow without bound
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # positions enter as a rotation of queries and keys, not as an added vector
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # keep this step's keys and values; attend over all the row holds
            k, v = cache.update(self.layer, k, v)
        dropout_p = self.dropout if self.training else 0.0
        probs = None
        if return_attention:
            # Grouped-query attention: query head h reads key/value head h // (H / Hkv).
            group = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            if mask is None:  # causal: the T queries are the last T of the S keys
                S = k.size(2)
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            y, probs = attention_with_probs(q, k, v, mask, dropout_p)
            y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        else:
            y = attend(q, k, v, mask, dropout_p)  # the fused kernel (flash attention on GPU)
        return dropout(self.proj(y), dropout_p), probs


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.mlp
        # SwiGLU's gate and up projections share one matrix (one matmul), split after.
        fc_width = 2 * config.d_ff if config.mlp == "swiglu" else config.d_ff
        self.fc = nn.Linear(config.d_model, fc_width, bias=config.bias)
        self.proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x):
        h = self.fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "gelu":
            h = F.gelu(h, approximate="tanh")  # GPT-2's GELU is the tanh approximation
        # (kind "gelu in fc": a decoding copy whose fc applies this same GELU inside its matmul)
        return dropout(self.proj(h), self.dropout if self.training else 0.0)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.pre_norm = config.norm_placement == "pre"
        self.norm1 = make_norm(config)
        self.attn = Attention(config, layer)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope, mask, return_attention: bool, cache: KVCache | None = None):
        if self.pre_norm:
            # Pre-norm: the residual stream is never normalised, so gradients flow straight
            # through deep stacks; this is what lets GPT-2 and later train without warm-up tricks.
            a, probs = self.attn(self.norm1(x), rope, mask, return_attention, cache)
            x = x + a
            x = x + self.mlp(self.norm2(x))
        else:
            # Post-norm (Attention Is All You Need): normalise after each residual addition.
            a, probs = self.attn(x, rope, mask, return_attention, cache)
            x = self.norm1(x + a)
            x = self.norm2(x + self.mlp(x))
        return x, probs


# --- packed documents ---------------------------------------------------------------------------

def document_positions_and_mask(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows packed with several documents: per-document positions and the attention mask.

    doc_ids: (B, T) ints; a new document starts wherever the id changes from the previous token
    (so ids need only differ between neighbours). Returns positions (B, T) restarting at 0 in
    each document, and a (B, 1, T, T) boolean mask, True where a token may attend: earlier or
    same tokens of its own document. A boolean mask of this shape keeps SDPA's fused kernel on CPU.
    """
    B, T = doc_ids.shape
    t = torch.arange(T, device=doc_ids.device)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    segment = starts.cumsum(dim=1)                                            # (B, T) 1, 1, 2, 2, 2, ...
    start_index = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values
    positions = t - start_index
    same_doc = segment[:, :, None] == segment[:, None, :]
    causal = t[:, None] >= t[None, :]
    return positions, (same_doc & causal).unsqueeze(1)


# --- the key/value cache -------------------------------------------------------------------------

class KVCache:
    """The keys and values of every layer for a batch of rows, so generation feeds each new token
    once instead of the whole sequence again. GPT.forward(idx, cache=cache) writes the T new
    tokens' keys and values after each row's `lengths`, lets them attend to everything the row
    holds, and advances `lengths` by T.

    kv: (layer, key/value, row, kv head, slot, D). Row b's token t lives in slot t, so a slot is
    a position and rows may be at different lengths (a server's requests join at any step).
    lengths is a plain list: the Python side reads it every step to choose the cheap path, one
    slice for all rows when they are level. A `rows(i, j)` view shares kv and the list, and its
    rows are lengths[i:j].
    """

    def __init__(self, config: ModelConfig, batch_size: int, slots: int, *, device=None, dtype=None):
        self.kv = torch.zeros(config.n_layer, 2, batch_size, config.n_kv_head, slots, config.head_dim,
                              device=device, dtype=dtype)
        self.lengths = [0] * batch_size    # tokens each row holds; rows(i, j) views share the list
        self._rows = slice(0, batch_size)  # which of `lengths` are this cache's rows
        self.slot_ids = torch.arange(slots, device=device)  # slot i's position is i
        self.row_ids = torch.arange(batch_size, device=device)  # one id per row of this cache (or view)
        self._by_layer = self.kv.flatten(0, 1)  # (2 * layer, ...): layer i's keys at 2i, its values at 2i + 1
        # This forward's state, set by positions_and_mask:
        self._start: int | None = None     # its first slot when every row has the same length
        self._ends: list[int] = []          # each row's length after it
        self._held: tuple[torch.Tensor, ...] = ()   # per layer, keys then values: the slots it reads (B, Hkv, S, D)
        self._new: tuple[torch.Tensor, ...] = ()    # the same for the slots it writes, when the rows are level
        self._write_at: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, slots) of one new token per row
        self._views: dict[tuple[int, int], KVCache] = {}

    @property
    def slots(self) -> int:
        return self.kv.size(4)

    def rows(self, first: int, stop: int) -> KVCache:
        """A cache over rows first..stop-1 of this one: writes to either show in both. Kept for
        the next call with the same rows (a server's step asks for the running rows each time)."""
        view = self._views.get((first, stop))
        if view is None:
            view = KVCache.__new__(KVCache)
            view.kv, view.lengths, view.slot_ids = self.kv[:, :, first:stop], self.lengths, self.slot_ids
            view.row_ids = self.row_ids[:stop - first]
            view._rows = slice(self._rows.start + first, self._rows.start + stop)
            view._by_layer = view.kv.flatten(0, 1)
            view._start, view._ends, view._held, view._new, view._write_at, view._views = None, [], (), (), None, {}
            self._views[(first, stop)] = view
        return view

    def positions_and_mask(self, T: int):
        """Positions of the T new tokens, (T,) or (B, T), and the mask (B or 1, 1, T, S) of the
        slots each may attend to (None: plain causal, or every slot held for a single token).
        Called once per forward, before the layers write."""
        starts = self.lengths[self._rows]
        end = max(starts) + T
        if end > self.slots:
            raise ValueError(f"the cache holds {self.slots} tokens per row; {max(starts)} + {T} new ones do not fit")
        self._ends = [s + T for s in starts]
        # Every layer's keys and values up to the longest row (and, for level rows, the slots
        # written), viewed here once for all layers: two calls instead of several per layer.
        self._held = self._by_layer.narrow(3, 0, end).unbind(0)
        self._start = starts[0] if min(starts) == max(starts) else None
        if self._start is not None:
            self._new = self._by_layer.narrow(3, self._start, T).unbind(0)
            positions = self.slot_ids.narrow(0, self._start, T)
            if T == 1 or self._start == 0:
                return positions, None
            slots = self.slot_ids.narrow(0, 0, end)
            return positions, (slots[None, :] <= positions[:, None])[None, None]
        starts = torch.tensor(starts, device=self.kv.device)
        positions = starts[:, None] + self.slot_ids.narrow(0, 0, T)
        # One token per row (a server's step): every layer writes it at the same (row, slot) pairs.
        self._write_at = (self.row_ids, starts) if T == 1 else None
        slots = self.slot_ids.narrow(0, 0, end)
        return positions, (slots[None, None, :] <= positions[:, :, None]).unsqueeze(1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys and values (B, Hkv, T, D) of `layer`; return all the rows hold
        (B, Hkv, S, D), S the longest row's length: views, no copy."""
        keys, values = self._held[2 * layer], self._held[2 * layer + 1]
        if self._start is not None:                           # level rows: the same new slots in each
            self._new[2 * layer].copy_(k)
            self._new[2 * layer + 1].copy_(v)
        elif self._write_at is not None:                      # one token per row, each at its slot
            rows, slots = self._write_at
            keys[rows, :, slots] = k[:, :, 0]
            values[rows, :, slots] = v[:, :, 0]
        else:
            T = k.size(2)
            for b, row_end in enumerate(self._ends):
                keys[b, :, row_end - T:row_end] = k[b]
                values[b, :, row_end - T:row_end] = v[b]
        return keys, values

    def advance(self, T: int) -> None:
        self.lengths[self._rows] = self._ends


# --- the model ----------------------------------------------------------------------------------

@dataclass
class GPTOutput:
    logits: torch.Tensor                              # (B, T, vocab_size)
    loss: torch.Tensor | None = None                  # mean cross-entropy, when targets were given
    attentions: tuple[torch.Tensor, ...] | None = None     # per layer (B, H, T, T), if asked for
    hidden_states: tuple[torch.Tensor, ...] | None = None  # residual stream (B, T, C): embeddings, then after each layer


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        if config.position == "learned":
            self.pos_emb = nn.Embedding(config.context_length, config.d_model)
        else:
            # Tables, not parameters: not saved in checkpoints, recomputed from the config.
            cos, sin = rope_tables(config)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        # Post-norm blocks already end in a norm; pre-norm needs one before the output layer.
        self.final_norm = make_norm(config) if config.norm_placement == "pre" else nn.Identity()
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self):
        """Normal(0, init_std) weights, zero biases, unit norms. The projections that write into
        the residual stream get std / sqrt(2 * n_layer) (GPT-2): the stream is a sum of 2 * n_layer
        such writes, and this keeps its variance from growing with depth."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))

    def forward(self, idx, targets=None, doc_ids=None, *, cache: KVCache | None = None,
                logits_at: torch.Tensor | None = None, return_attention=False, return_hidden=False):
        """idx: (B, T) token ids. targets: (B, T) next-token ids, IGNORE_INDEX (-100) to skip one.
        doc_ids: (B, T) document ids of packed rows: attention stays within a document and
        positions restart at 0 in each. cache: the keys and values of the tokens before idx
        (generation feeds each token once; see KVCache). logits_at: (B,) one position per row
        whose logits alone are computed, (B, 1, V) (generation needs only the next token's).
        return_attention / return_hidden add the per-layer attention probabilities / residual
        streams to the output (they cost nothing if not asked)."""
        B, T = idx.shape
        if T > self.config.context_length:
            raise ValueError(f"sequence of {T} tokens is longer than context_length={self.config.context_length}")
        if cache is not None:
            if doc_ids is not None:
                raise ValueError("doc_ids and a cache do not combine: a cached row is one document")
            positions, mask = cache.positions_and_mask(T)
        elif doc_ids is None:
            positions, mask = torch.arange(T, device=idx.device), None  # None: plain causal attention
        else:
            if doc_ids.shape != idx.shape:
                raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} must equal idx shape {tuple(idx.shape)}")
            positions, mask = document_positions_and_mask(doc_ids)

        x = self.tok_emb(idx)                            # (B, T, C)
        rope = None
        if self.config.position == "learned":
            x = x + self.pos_emb(positions)
        else:
            # (T, D) or (B, T, D) -> broadcastable over heads as (B or 1, 1, T, D)
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
            rope = (cos.view(-1, 1, T, cos.size(-1)).to(x.dtype), sin.view(-1, 1, T, sin.size(-1)).to(x.dtype))
        x = self.drop(x)

        hidden_states = [x] if return_hidden else None
        attentions = [] if return_attention else None
        for block in self.blocks:
            x, probs = block(x, rope, mask, return_attention, cache)
            if return_hidden:
                hidden_states.append(x)
            if return_attention:
                attentions.append(probs)
        if cache is not None:
            cache.advance(T)

        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at].unsqueeze(1)   # (B, 1, C)
        logits = self.lm_head(self.final_norm(x))       # (B, T, vocab_size)
        loss = None
        if targets is not None:
            # float32 for the softmax even under bf16 autocast: the loss is a small difference of large numbers.
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        return GPTOutput(
            logits=logits, loss=loss,
            attentions=tuple(attentions) if return_attention else None,
            hidden_states=tuple(hidden_states) if return_hidden else None)


# --- parameters and FLOPs -----------------------------------------------------------------------

def num_params(config_or_model: ModelConfig | GPT, non_embedding: bool = False) -> int:
    """Parameter count, from a config (no model built) or a model (counted; tied weights once).

    non_embedding=True leaves out the token and position embeddings and an untied output layer:
    the count that scaling laws and 6N FLOP estimates use (lookups cost no FLOPs).
    """
    if isinstance(config_or_model, GPT):
        model = config_or_model
        total = sum(p.numel() for p in model.parameters())  # .parameters() yields a tied weight once
        if non_embedding:
            total -= model.tok_emb.weight.numel()
            if model.config.position == "learned":
                total -= model.pos_emb.weight.numel()
            if not model.config.tie_embeddings:
                total -= model.lm_head.weight.numel()
        return total

    c = config_or_model
    C, D = c.d_model, c.head_dim
    norm = C * (2 if c.norm == "layernorm" and c.bias else 1)
    qkv_out = (c.n_head + 2 * c.n_kv_head) * D
    attn = C * qkv_out + (qkv_out if c.qkv_bias else 0) + c.n_head * D * C + (C if c.bias else 0)
    attn += 2 * D if c.qk_norm else 0
    fc_out = 2 * c.d_ff if c.mlp == "swiglu" else c.d_ff
    mlp = C * fc_out + c.d_ff * C + ((fc_out + C) if c.bias else 0)
    blocks = c.n_layer * (2 * norm + attn + mlp)
    final_norm = norm if c.norm_placement == "pre" else 0
    if non_embedding:
        return blocks + final_norm
    embeddings = c.vocab_size * C * (1 if c.tie_embeddings else 2)
    if c.position == "learned":
        embeddings += c.context_length * C
    return blocks + final_norm + embeddings


def flops_per_token(config: ModelConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token (forward + backward), for MFU.

        6 * (N + V*C)  +  12 * L * H * D * T

    N = non-embedding parameters, V*C = the output layer (a matmul even when tied; the input
    embedding is a lookup and costs nothing). Each weight costs 2 FLOPs per token forward (a
    multiply and an add) and 4 backward: 6. Attention adds, per layer and token, the query-key
    scores and the weighted sum of values, 2 * 2 * H * D * T forward, times 3 with backward.
    T = seq_len (default context_length). Like PaLM and nanoGPT, this counts the full T x T
    attention although causal masking lets kernels skip about half.
    """
    T = config.context_length if seq_len is None else seq_len
    matmul_params = num_params(config, non_embedding=True) + config.vocab_size * config.d_model
    attention = 12 * config.n_layer * config.n_head * config.head_dim * T
    return 6 * matmul_params + attention


def parts_of(model: GPT, seq_len: int | None = None) -> list[dict]:
    """Parameters and training FLOPs per token of each part, in the order data flows through them:

        tok_emb, pos_emb (learned positions only), then per block blocks.i.norm1, blocks.i.attn,
        blocks.i.norm2, blocks.i.mlp, then final_norm (pre-norm only) and lm_head

    as [{"name", "params", "flops"}]. Parameters are counted from the modules themselves (a tied
    output layer owns none: its matrix is the token embedding's); FLOPs follow flops_per_token:
    6 per weight used in a matmul or norm, 0 for the embedding lookups, the output matmul even
    when tied, and the attention scores and weighted sum in each attention part. So the parts
    sum to num_params(model) and flops_per_token(model.config, seq_len)."""
    config = model.config
    T = config.context_length if seq_len is None else seq_len
    counted: set[int] = set()

    def params(module: nn.Module) -> int:
        fresh = [p for p in module.parameters() if id(p) not in counted]
        counted.update(id(p) for p in fresh)
        return sum(p.numel() for p in fresh)

    parts = [{"name": "tok_emb", "params": params(model.tok_emb), "flops": 0}]
    if config.position == "learned":
        parts.append({"name": "pos_emb", "params": params(model.pos_emb), "flops": 0})
    for i, block in enumerate(model.blocks):
        for name in ("norm1", "attn", "norm2", "mlp"):
            n = params(getattr(block, name))
            attention = 12 * config.n_head * config.head_dim * T if name == "attn" else 0
            parts.append({"name": f"blocks.{i}.{name}", "params": n, "flops": 6 * n + attention})
    if config.norm_placement == "pre":
        n = params(model.final_norm)
        parts.append({"name": "final_norm", "params": n, "flops": 6 * n})
    parts.append({"name": "lm_head", "params": params(model.lm_head),
                  "flops": 6 * config.vocab_size * config.d_model})
    return parts
