"""GGUF export: one file that llama.cpp (and Ollama, LM Studio, llama-cpp-python) loads and runs,
with the tokenizer and the chat template inside.

Written with the `gguf` package (llama.cpp's own reader/writer) for the two families llm.hf knows:

    gpt2:   token_embd, position_embd, blk.N.{attn_norm, attn_qkv, attn_output, ffn_norm, ffn_up,
            ffn_down} with biases, output_norm, output (only when not tied)
    llama:  token_embd, blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate,
            ffn_up, ffn_down}, output_norm, output (only when not tied)

Our linear weights are (out, in) like PyTorch's nn.Linear, which is the layout GGUF stores, so
nothing is transposed. One permutation: our RoPE rotates dimension i with i + D/2 ("rotate half",
as Hugging Face's LLaMA), llama.cpp's LLaMA rotates neighbours (2i, 2i+1), so the query and key
rows of each head are reordered, as llama.cpp's own converter does for Hugging Face checkpoints.

The vocabulary is SentencePiece's (tokenizer.ggml.model "llama"): pieces, scores and piece types
as llm.tokenizer trained them, no BOS added, no prefix space. Types: f32 and f16 are written here;
the quantised ones (q8_0, q4_k_m) by llama.cpp's own quantizer from llama-cpp-python, from the f32 file.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import gguf
import numpy as np
import torch

from llm.chat import CHAT_TEMPLATE
from llm.hf import check_exportable, hf_family, sentencepiece_of
from llm.model import GPT, ModelConfig
from llm.tokenizer import END, ENDOFTEXT, PAD, Tokenizer

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_k_m")
_QUANTISED = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M}
T = gguf.MODEL_TENSOR


def export_gguf(model: GPT, tokenizer: Tokenizer, path: str | Path, dtype: str = "f32", *, name: str = "model",
                description: str = "") -> Path:
    """Write `path` as a GGUF file of type `dtype` (GGUF_TYPES)."""
    if dtype not in GGUF_TYPES:
        raise ValueError(f"GGUF type {dtype!r} is not one of {', '.join(GGUF_TYPES)}")
    family = check_exportable(model.config, tokenizer, "GGUF")
    path = Path(path)
    if dtype in _QUANTISED:
        unquantised = path.with_name(path.name + ".f32.tmp")
        try:
            export_gguf(model, tokenizer, unquantised, "f32", name=name, description=description)
            quantise(unquantised, path, dtype)
        finally:
            unquantised.unlink(missing_ok=True)
        return path
    writer = gguf.GGUFWriter(str(path), family)
    writer.add_name(name)
    if description:
        writer.add_description(description)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    _add_hyperparameters(writer, model.config, family)
    _add_tokenizer(writer, tokenizer, model.config.vocab_size)
    for tensor_name, tensor in gguf_tensors(model).items():
        array = tensor.detach().to(torch.float32).cpu().numpy()
        # As llama.cpp's converter: norms, biases (1-D) stay f32, matrices take the file's type.
        writer.add_tensor(tensor_name, array.astype(np.float16) if dtype == "f16" and array.ndim > 1 else array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def quantise(source: Path, target: Path, dtype: str) -> None:
    """llama.cpp's quantizer (llama_model_quantize, shipped in llama-cpp-python) on a GGUF file.
    Tensors whose rows do not divide into the type's blocks keep a wider type (llama.cpp decides)."""
    import llama_cpp  # loads the shared library: only quantised exports need it

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(_QUANTISED[dtype])
    # llama.cpp logs a line per tensor through this logger; keep its errors only.
    log = logging.getLogger("llama-cpp-python")
    level, _ = log.level, log.setLevel(logging.ERROR)
    try:
        failed = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    finally:
        log.setLevel(level)
    if failed:
        raise RuntimeError(f"llama.cpp could not quantise {source} to {dtype}")


def greedy_tokens(path: str | Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """What llama.cpp (through llama-cpp-python) decodes greedily from `prompt` with the file at
    `path`: the check that an export computes what our model does."""
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=len(prompt) + max_new_tokens, n_threads=1, verbose=False)
    try:
        return [token for _, token in zip(range(max_new_tokens), llm.generate(prompt, temp=0.0))]
    finally:
        llm.close()


# --- what the file holds ---------------------------------------------------------------------

def _add_hyperparameters(writer: gguf.GGUFWriter, config: ModelConfig, family: str) -> None:
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.d_ff)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_kv_head)
    writer.add_vocab_size(config.vocab_size)
    if family == "gpt2":
        writer.add_layer_norm_eps(config.norm_eps)
    else:
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_rope_dimension_count(config.head_dim)


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Tokenizer, vocab_size: int) -> None:
    pieces = sentencepiece_of(tokenizer, ("bpe",), "GGUF").pieces()
    # llama.cpp wants one token per embedding row; a model with more rows than the tokenizer has
    # ids (a vocabulary padded for speed) gets unused placeholders, which text never encodes to.
    pieces += [(f"<|unused{i}|>", 0.0, gguf.TokenType.UNUSED) for i in range(vocab_size - len(pieces))]
    specials = tokenizer.special_tokens
    writer.add_tokenizer_model("llama")   # llama.cpp's SentencePiece tokenizer: merges by piece score
    writer.add_tokenizer_pre("default")
    writer.add_token_list([piece for piece, _, _ in pieces])
    writer.add_token_scores([score for _, score, _ in pieces])
    writer.add_token_types([kind for _, _, kind in pieces])  # SentencePiece's numbering is GGUF's
    writer.add_add_space_prefix(False)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(specials[ENDOFTEXT])
    writer.add_eos_token_id(specials[ENDOFTEXT])  # end of a document; the end of a chat turn is EOT
    writer.add_eot_token_id(specials[END])
    writer.add_pad_token_id(specials[PAD])
    writer.add_chat_template(CHAT_TEMPLATE)


def _name(kind: gguf.MODEL_TENSOR, layer: int | None = None) -> str:
    return gguf.TENSOR_NAMES[kind].format(bid=layer)


def gguf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """Our state dict under llama.cpp's tensor names (q/k rows permuted for LLaMA's RoPE)."""
    config, ours, family = model.config, model.state_dict(), hf_family(model.config)
    kinds = ("weight", "bias") if config.bias else ("weight",)
    out = {_name(T.TOKEN_EMBD) + ".weight": ours["tok_emb.weight"]}
    if config.position == "learned":
        out[_name(T.POS_EMBD) + ".weight"] = ours["pos_emb.weight"]
    q_rows, kv_rows = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    for i in range(config.n_layer):
        block = f"blocks.{i}."
        pairs = [("norm1", T.ATTN_NORM), ("norm2", T.FFN_NORM), ("attn.proj", T.ATTN_OUT), ("mlp.proj", T.FFN_DOWN)]
        if family == "gpt2":
            pairs += [("attn.qkv", T.ATTN_QKV), ("mlp.fc", T.FFN_UP)]
        for ours_name, kind in pairs:
            for part in kinds:
                if block + f"{ours_name}.{part}" in ours:
                    out[f"{_name(kind, i)}.{part}"] = ours[block + f"{ours_name}.{part}"]
        if family == "llama":
            for part in ("weight", "bias") if config.qkv_bias else ("weight",):
                q, k, v = ours[block + f"attn.qkv.{part}"].split([q_rows, kv_rows, kv_rows])
                out[f"{_name(T.ATTN_Q, i)}.{part}"] = _rotate_half_to_pairs(q, config.n_head)
                out[f"{_name(T.ATTN_K, i)}.{part}"] = _rotate_half_to_pairs(k, config.n_kv_head)
                out[f"{_name(T.ATTN_V, i)}.{part}"] = v
            for part in kinds:
                gate, up = ours[block + f"mlp.fc.{part}"].chunk(2)
                out[f"{_name(T.FFN_GATE, i)}.{part}"] = gate
                out[f"{_name(T.FFN_UP, i)}.{part}"] = up
    for part in kinds if config.norm == "layernorm" else ("weight",):
        out[f"{_name(T.OUTPUT_NORM)}.{part}"] = ours[f"final_norm.{part}"]
    if not config.tie_embeddings:  # llama.cpp reuses token_embd when there is no output tensor
        out[_name(T.OUTPUT) + ".weight"] = ours["lm_head.weight"]
    return out


def _rotate_half_to_pairs(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from (0..D/2-1, D/2..D-1) pairing to (0, D/2, 1, D/2+1, ...):
    the rotation pair (i, i + D/2) of ours becomes llama.cpp's neighbours (2i, 2i+1)."""
    head_dim = rows.shape[0] // n_heads
    return rows.reshape(n_heads, 2, head_dim // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)
