"""Hugging Face interop: our GPT <-> transformers' GPT2LMHeadModel and LlamaForCausalLM.

Two uses: the tests prove our model computes what the reference implementations compute (same
weights, same logits), and a user with internet can start from published GPT-2 / LLaMA weights
(`import_hf`) or hand a trained model to the Hugging Face ecosystem (`export_hf`).

Which family a config belongs to is read off its switches:

    gpt2:   learned positions, LayerNorm, GELU, pre-norm, biases everywhere, multi-head attention
    llama:  RoPE, RMSNorm, SwiGLU, pre-norm, (optionally) grouped-query attention

An exported folder also carries the tokenizer (tokenizer.json, built from our SentencePiece
model with the `tokenizers` library, special tokens and the chat template of llm/chat.py) and a
model card (README.md), so `AutoTokenizer` and `pipeline("text-generation")` work on it offline.

Weight layout differences handled here:
  - GPT-2 stores its linear layers as Conv1D with the weight transposed, (in, out): transpose.
  - GPT-2's fused c_attn is [q; k; v] like our qkv; LLaMA has separate q/k/v_proj: concatenate.
  - LLaMA's gate_proj and up_proj are our fused mlp.fc, gate first: concatenate.
  - RoPE: our model uses the same 'rotate half' pairing as transformers' LLaMA, so q/k copy as is.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken, decoders, models, normalizers
from tokenizers import Tokenizer as FastTokenizer
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from llm.chat import CHAT_TEMPLATE, stop_token_ids
from llm.model import GPT, ModelConfig, num_params
from llm.tokenizer import ENDOFTEXT, PAD, SPECIAL_TOKENS, SentencePieceTokenizer, Tokenizer

# --- which family -------------------------------------------------------------------------------

def hf_family(config: ModelConfig) -> str:
    """'gpt2' or 'llama'; a ValueError saying which switch is off if the config is neither."""
    gpt2 = dict(position="learned", norm="layernorm", mlp="gelu", norm_placement="pre",
                qkv_bias=True, bias=True, n_kv_head=config.n_head, qk_norm=False)
    llama = dict(position="rope", norm="rmsnorm", mlp="swiglu", norm_placement="pre",
                 qkv_bias=config.bias,  # LLaMA's attention_bias covers q, k, v and o together
                 qk_norm=False)
    mismatches = {}
    for family, wanted in (("gpt2", gpt2), ("llama", llama)):
        off = [f"{k}={getattr(config, k)!r} (needs {v!r})" for k, v in wanted.items() if getattr(config, k) != v]
        if not off:
            return family
        mismatches[family] = off
    raise ValueError("config matches neither family transformers and GGUF hold: "
                     + "; ".join(f"{family}: {', '.join(off)}" for family, off in mismatches.items()))


# --- ours -> transformers -----------------------------------------------------------------------

def _token_ids(config: ModelConfig, default: int, bos, eos, pad) -> dict:
    """bos/eos/pad ids for the HF config. The families' defaults (GPT-2: 50256) lie outside a small
    vocabulary, which transformers warns about and generate() trips on: fall back to the last id."""
    if default >= config.vocab_size:
        default = config.vocab_size - 1
    return dict(bos_token_id=default if bos is None else bos,
                eos_token_id=default if eos is None else eos,
                pad_token_id=pad)


def to_hf_config(config: ModelConfig, *, bos_token_id=None, eos_token_id=None, pad_token_id=None):
    family = hf_family(config)
    if family == "gpt2":
        return GPT2Config(
            vocab_size=config.vocab_size, n_positions=config.context_length, n_embd=config.d_model,
            n_layer=config.n_layer, n_head=config.n_head, n_inner=config.d_ff,
            activation_function="gelu_new",  # the tanh approximation, like ours
            resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
            layer_norm_epsilon=config.norm_eps, initializer_range=config.init_std,
            tie_word_embeddings=config.tie_embeddings,
            **_token_ids(config, 50256, bos_token_id, eos_token_id, pad_token_id))
    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head, head_dim=config.head_dim, hidden_act="silu",
        max_position_embeddings=config.context_length, rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
        attention_bias=config.bias, mlp_bias=config.bias, attention_dropout=config.dropout,
        initializer_range=config.init_std, tie_word_embeddings=config.tie_embeddings,
        **_token_ids(config, 2, bos_token_id, eos_token_id, pad_token_id))


def _renames(config: ModelConfig) -> list[tuple[str, str, bool]]:
    """(our name, transformers' name, transposed) of every tensor that maps one to one; both
    directions read this one table. LLaMA's fused qkv and gate/up tensors are split apart below."""
    kinds = ("weight", "bias") if config.bias else ("weight",)
    if hf_family(config) == "gpt2":
        table = [("tok_emb.weight", "transformer.wte.weight", False),
                 ("pos_emb.weight", "transformer.wpe.weight", False)]
        for i in range(config.n_layer):
            ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
            for a, b in (("norm1", "ln_1"), ("norm2", "ln_2")):
                table += [(f"{ours}{a}.{k}", f"{theirs}{b}.{k}", False) for k in ("weight", "bias")]
            for a, b in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                         ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                table += [(f"{ours}{a}.weight", f"{theirs}{b}.weight", True),  # Conv1D keeps (in, out)
                          (f"{ours}{a}.bias", f"{theirs}{b}.bias", False)]
        return table + [("final_norm.weight", "transformer.ln_f.weight", False),
                        ("final_norm.bias", "transformer.ln_f.bias", False)]
    table = [("tok_emb.weight", "model.embed_tokens.weight", False)]
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        table += [(f"{ours}norm1.weight", f"{theirs}input_layernorm.weight", False),
                  (f"{ours}norm2.weight", f"{theirs}post_attention_layernorm.weight", False)]
        for k in kinds:
            table += [(f"{ours}attn.proj.{k}", f"{theirs}self_attn.o_proj.{k}", False),
                      (f"{ours}mlp.proj.{k}", f"{theirs}mlp.down_proj.{k}", False)]
    return table + [("final_norm.weight", "model.norm.weight", False)]


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our state dict renamed (and transposed / split where needed) to transformers' names."""
    config, ours = model.config, model.state_dict()
    out = {theirs: ours[name].t() if transposed else ours[name] for name, theirs, transposed in _renames(config)}
    if hf_family(config) == "llama":
        q_rows, kv_rows = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        for i in range(config.n_layer):
            src, dst = f"blocks.{i}.", f"model.layers.{i}."
            for kind in (("weight", "bias") if config.bias else ("weight",)):
                q, k, v = ours[src + "attn.qkv." + kind].split([q_rows, kv_rows, kv_rows])
                out[dst + "self_attn.q_proj." + kind] = q
                out[dst + "self_attn.k_proj." + kind] = k
                out[dst + "self_attn.v_proj." + kind] = v
                gate, up = ours[src + "mlp.fc." + kind].chunk(2)
                out[dst + "mlp.gate_proj." + kind] = gate
                out[dst + "mlp.up_proj." + kind] = up
    out["lm_head.weight"] = ours["lm_head.weight"]  # with tied weights this is the embedding again
    return {name: tensor.contiguous() for name, tensor in out.items()}


# --- the tokenizer --------------------------------------------------------------------------------

# SentencePiece's piece types (SentencePieceTokenizer.pieces); GGUF numbers them the same way.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
SPACE = "\u2581"  # how SentencePiece writes a space inside its pieces


def sentencepiece_of(tokenizer: Tokenizer, model_types: tuple[str, ...], target: str) -> SentencePieceTokenizer:
    """The tokenizer, if `target` can express it; else a ValueError naming tokenizer.kind."""
    kind = getattr(tokenizer, "model_type", tokenizer.kind)
    if not isinstance(tokenizer, SentencePieceTokenizer) or kind not in model_types:
        raise ValueError(f"tokenizer.kind={kind!r}: {target} export needs a SentencePiece tokenizer of kind "
                         f"{' or '.join(repr(k) for k in model_types)} (set tokenizer.kind in params.yaml and retrain)")
    return tokenizer


def check_exportable(config: ModelConfig, tokenizer: Tokenizer, target: str = "Hugging Face") -> str:
    """The family ('gpt2' or 'llama') if `target` (Hugging Face, GGUF: both hold the same two
    families and SentencePiece BPE) can express this model and tokenizer; else a ValueError
    naming the field to change."""
    family = hf_family(config)
    sentencepiece_of(tokenizer, ("bpe",), target)
    return family


def fast_tokenizer(tokenizer: Tokenizer) -> FastTokenizer:
    """Our SentencePiece BPE model as a `tokenizers` Tokenizer that encodes text to the same ids.

    What llm.tokenizer.train_sentencepiece chose, rebuilt: spaces become '\u2581' with no prefix
    space added, '\n' is one user-defined piece, unknown characters are spelled as <0xNN> byte
    pieces, the special tokens are control pieces. The merges are read off the vocabulary: a piece
    is the merge of any two pieces it splits into, ranked by its score, as SentencePiece merges the
    best-scored piece first. (A unigram model is refused: transformers' Unigram breaks ties between
    equally likely segmentations differently, measured on runs of spaces.)

    Two differences remain, both about text that looks like markup: a special token's string
    typed in the text becomes that token here (ours keeps it text; pass split_special_tokens=True
    to transformers' tokenizer for ours), and a literal '\u2581' becomes a space.
    """
    pieces = sentencepiece_of(tokenizer, ("bpe",), "Hugging Face").pieces()
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    unknown = next(piece for piece, _, kind in pieces if kind == UNKNOWN)
    fast = FastTokenizer(models.BPE(vocab, _bpe_merges(pieces), unk_token=unknown, fuse_unk=True, byte_fallback=True))
    fast.normalizer = normalizers.Replace(" ", SPACE)
    fast.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    fast.add_tokens([AddedToken(piece, normalized=False) for piece, _, kind in pieces if kind == USER_DEFINED])
    fast.add_special_tokens([AddedToken(piece, special=True, normalized=False)
                             for piece, _, kind in pieces if kind in (CONTROL, UNKNOWN)])
    return fast


def _bpe_merges(pieces: list[tuple[str, float, int]]) -> list[tuple[str, str]]:
    ids = {piece: i for i, (piece, _, kind) in enumerate(pieces) if kind == NORMAL}
    merges = [(-score, ids[piece[:cut]], ids[piece[cut:]], piece[:cut], piece[cut:])
              for piece, score, kind in pieces if kind == NORMAL
              for cut in range(1, len(piece)) if piece[:cut] in ids and piece[cut:] in ids]
    return [(left, right) for *_, left, right in sorted(merges)]


def to_hf_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """The tokenizer as transformers' fast tokenizer, with our special tokens and chat template.
    Nothing is added around a text (no BOS): a prompt encodes to the ids ours gives."""
    fast = fast_tokenizer(tokenizer)
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=fast, unk_token=fast.id_to_token(0), bos_token=ENDOFTEXT, eos_token=ENDOFTEXT,
        pad_token=PAD, additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (ENDOFTEXT, PAD)])
    hf_tokenizer.chat_template = CHAT_TEMPLATE
    return hf_tokenizer


def to_hf_model(model: GPT, **token_ids) -> PreTrainedModel:
    """A transformers model holding a copy of our weights (fp32, eval mode)."""
    hf_config = to_hf_config(model.config, **token_ids)
    hf_class = GPT2LMHeadModel if isinstance(hf_config, GPT2Config) else LlamaForCausalLM
    hf_model = hf_class(hf_config)
    hf_model.load_state_dict(to_hf_state_dict(model), strict=True)
    return hf_model.eval()


def export_hf(model: GPT, directory: str | Path, tokenizer: Tokenizer | None = None, *, card: str | None = None,
              **token_ids) -> Path:
    """Write a folder that `AutoModelForCausalLM.from_pretrained(directory)` loads (config.json,
    generation_config.json, model.safetensors). With the tokenizer, `AutoTokenizer` loads it too
    (tokenizer.json, tokenizer_config.json, chat_template.jinja) and generation stops where ours
    does (end of turn, end of document). card: the README.md to write (model_card).
    token_ids: bos_token_id, eos_token_id, pad_token_id, overriding the tokenizer's."""
    directory = Path(directory)
    hf_tokenizer = None
    if tokenizer is not None:
        hf_tokenizer = to_hf_tokenizer(tokenizer)  # refuses a tokenizer it cannot express, before writing anything
        token_ids = {"bos_token_id": tokenizer.special_tokens[ENDOFTEXT], "eos_token_id": stop_token_ids(tokenizer),
                     "pad_token_id": tokenizer.special_tokens[PAD], **token_ids}
    to_hf_model(model, **token_ids).save_pretrained(directory)
    if hf_tokenizer is not None:
        hf_tokenizer.save_pretrained(directory)
    if card is not None:
        (directory / "README.md").write_text(card)
    return directory


def logit_difference(directory: str | Path, model: GPT, ids: list[int]) -> float:
    """The largest |logit| difference between an exported folder, run by transformers, and our
    model on the tokens `ids`: how faithful the export is (fp32: about 1e-6)."""
    hf_model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    idx = torch.tensor([ids], device=next(model.parameters()).device)
    with torch.no_grad():
        return (hf_model.to(idx.device)(idx).logits - model(idx).logits).abs().max().item()


def model_card(model: GPT, tokenizer: Tokenizer, *, name: str, data: list[str] = (), params: dict | None = None,
               metrics: dict | None = None) -> str:
    """README.md of an exported folder: what the model is, how to run it, what made it.
    data: one line per training source; params, metrics: flat name -> value, of the run that made it."""
    family = hf_family(model.config)
    rows = lambda values: "\n".join(f"| `{k}` | {v} |" for k, v in values.items())
    sections = [
        f"---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags: [llm-from-scratch, {family}]\n---\n",
        f"# {name}\n\nA {num_params(model) / 1e6:.1f} M-parameter {family}-family language model trained from "
        "scratch by the llm-from-scratch pipeline. Small: it writes English-looking text, not reliable facts.\n",
        "## Use\n\n```python\nfrom transformers import pipeline\n"
        "generate = pipeline(\"text-generation\", model=\"path/to/this/folder\")\n"
        "messages = [{\"role\": \"user\", \"content\": \"Name a colour.\"}]\n"
        "print(generate(messages, max_new_tokens=64, do_sample=False)[0][\"generated_text\"][-1][\"content\"])\n```\n\n"
        f"Chat format (chat_template.jinja): `{CHAT_TEMPLATE_EXAMPLE}`; generation stops at `<|end|>` or "
        "`<|endoftext|>`. The tokenizer adds no BOS token.\n",
        "## Architecture\n\n| field | value |\n|---|---|\n" + rows(model.config.to_dict()) + "\n",
        f"## Tokenizer\n\nSentencePiece BPE with byte fallback, {tokenizer.vocab_size} ids; special tokens "
        + ", ".join(f"`{t}`" for t in tokenizer.special_tokens) + ".\n",
    ]
    if data:
        sections.append("## Data\n\n" + "\n".join(f"- {line}" for line in data) + "\n")
    if params:
        sections.append("## Training parameters\n\n| parameter | value |\n|---|---|\n" + rows(params) + "\n")
    if metrics:
        sections.append("## Metrics\n\n| metric | value |\n|---|---|\n" + rows(metrics) + "\n")
    return "\n".join(sections)


CHAT_TEMPLATE_EXAMPLE = "<|system|>You are helpful.<|end|><|user|>Name a colour.<|end|><|assistant|>Blue.<|end|>"


def push_to_hub(folder: str | Path, repo_id: str, files: list[Path] = ()) -> str:
    """Upload an exported folder (and extra files, e.g. GGUF) to a model repository on the hub;
    needs the network and a token (`hf auth login`). Returns the repository's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.constants import HF_HUB_OFFLINE

    if HF_HUB_OFFLINE:
        raise ValueError("--push needs the network: set HF_HUB_OFFLINE=0 (the project defaults it to 1) and log in "
                         "with `hf auth login`")
    api = HfApi()
    url = api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder))
    for path in files:
        api.upload_file(repo_id=repo_id, path_or_fileobj=str(path), path_in_repo=Path(path).name)
    return str(url)


# --- transformers -> ours -----------------------------------------------------------------------

def from_hf_config(hf_config) -> ModelConfig:
    if hf_config.model_type == "gpt2":
        if hf_config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"GPT-2 activation {hf_config.activation_function!r} is not supported (tanh GELU only)")
        if hf_config.scale_attn_by_inverse_layer_idx or not hf_config.scale_attn_weights:
            raise ValueError("GPT-2 attention scaling options other than 1/sqrt(head_dim) are not supported")
        return ModelConfig(
            vocab_size=hf_config.vocab_size, context_length=hf_config.n_positions,
            n_layer=hf_config.n_layer, n_head=hf_config.n_head, n_kv_head=hf_config.n_head,
            d_model=hf_config.n_embd, mlp="gelu", d_ff=hf_config.n_inner or 4 * hf_config.n_embd,
            norm="layernorm", norm_placement="pre", position="learned", qkv_bias=True, bias=True,
            dropout=float(hf_config.resid_pdrop), tie_embeddings=bool(hf_config.tie_word_embeddings),
            norm_eps=hf_config.layer_norm_epsilon, init_std=hf_config.initializer_range)
    if hf_config.model_type == "llama":
        rope = hf_config.rope_parameters or {}
        if rope.get("rope_type", "default") != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"LLaMA RoPE scaling {rope} is not supported (plain RoPE only)")
        if hf_config.hidden_act != "silu":
            raise ValueError(f"LLaMA activation {hf_config.hidden_act!r} is not supported (silu only)")
        if hf_config.head_dim != hf_config.hidden_size // hf_config.num_attention_heads:
            raise ValueError("LLaMA head_dim other than hidden_size / num_attention_heads is not supported")
        if hf_config.attention_bias != hf_config.mlp_bias:
            raise ValueError("LLaMA with attention_bias != mlp_bias is not supported (one `bias` switch)")
        return ModelConfig(
            vocab_size=hf_config.vocab_size, context_length=hf_config.max_position_embeddings,
            n_layer=hf_config.num_hidden_layers, n_head=hf_config.num_attention_heads,
            n_kv_head=hf_config.num_key_value_heads, d_model=hf_config.hidden_size, mlp="swiglu",
            d_ff=hf_config.intermediate_size, norm="rmsnorm", norm_placement="pre", position="rope",
            rope_theta=float(rope.get("rope_theta", 10000.0)), qkv_bias=bool(hf_config.attention_bias),
            bias=bool(hf_config.attention_bias), dropout=float(hf_config.attention_dropout),
            tie_embeddings=bool(hf_config.tie_word_embeddings), norm_eps=hf_config.rms_norm_eps,
            init_std=hf_config.initializer_range)
    raise ValueError(f"model_type {hf_config.model_type!r} is not supported (gpt2 or llama)")


def from_hf_state_dict(config: ModelConfig, theirs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of to_hf_state_dict."""
    out = {name: theirs[hf].t() if transposed else theirs[hf] for name, hf, transposed in _renames(config)}
    if hf_family(config) == "llama":
        for i in range(config.n_layer):
            src, dst = f"model.layers.{i}.", f"blocks.{i}."
            for kind in (("weight", "bias") if config.bias else ("weight",)):
                out[dst + "attn.qkv." + kind] = torch.cat(
                    [theirs[src + f"self_attn.{p}_proj." + kind] for p in ("q", "k", "v")])
                out[dst + "mlp.fc." + kind] = torch.cat(
                    [theirs[src + "mlp.gate_proj." + kind], theirs[src + "mlp.up_proj." + kind]])
    out["lm_head.weight"] = theirs["lm_head.weight"] if "lm_head.weight" in theirs else out["tok_emb.weight"]
    return {name: tensor.contiguous() for name, tensor in out.items()}


def from_hf_model(hf_model: PreTrainedModel) -> GPT:
    config = from_hf_config(hf_model.config)
    model = GPT(config)
    model.load_state_dict(from_hf_state_dict(config, hf_model.state_dict()), strict=True)
    return model


def import_hf(directory: str | Path, map_location: str | torch.device = "cpu") -> GPT:
    """Read a transformers GPT-2 or LLaMA folder (or, with internet, a hub name) into our GPT."""
    hf_model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    return from_hf_model(hf_model).to(map_location)

