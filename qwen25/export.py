"""`qwen25 export`: a checkpoint as a directory other runtimes load as it is, and optionally a GGUF file.

The directory is the HF layout (config.json, generation_config.json, safetensors, tokenizer files) with a chat
template in tokenizer_config.json, so transformers' apply_chat_template, vLLM and llama.cpp's converter need no
extra flags. The GGUF file is llama.cpp's `qwen2` architecture, written as llama.cpp's convert_hf_to_gguf.py
writes a Qwen2.5 checkpoint: the same tensor names, hyper-parameters, vocabulary and special-token ids.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import gguf
import numpy as np
import torch

from .config import ModelConfig
from .model import CausalLM, CheckpointError, load_model, save_model
from .model.rope import rope_kind, yarn_original_length
from .tokenizer import Tokenizer, TokenizerError, official_chat_template
from .tokenizer.bpe import bytes_to_tokens
from .tokenizer.files import QWEN_PATTERN

GGUF_TYPES = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
              "q4_0": gguf.GGMLQuantizationType.Q4_0}
_FILE_TYPES = {"bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
               "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
# q4_0: the output matrix (token_embd where tied) stays 8-bit, as `qwen25 serve --int4` keeps it (llama-quantize
# keeps it at 6 bits, Q6_K, which gguf's Python quantizer does not write)
_OUTPUT_NAMES = ("output.weight", "token_embd.weight")

# HF tensor names -> the names of llama.cpp's qwen2 architecture (gguf.MODEL_TENSORS[MODEL_ARCH.QWEN2]).
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_tensor_name(name: str) -> str:
    """llama.cpp's name of an HF tensor name, e.g. model.layers.3.mlp.up_proj.weight -> blk.3.ffn_up.weight."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    prefix, _, rest = name.partition(".layers.")
    layer, _, part = rest.partition(".")
    if prefix != "model" or not layer.isdigit() or part not in _LAYER_NAMES:
        raise CheckpointError(f"tensor {name} has no place in llama.cpp's qwen2 architecture")
    return f"blk.{layer}.{_LAYER_NAMES[part]}"


def resolve_chat_template(choice: str, tokenizer: Tokenizer) -> str | list[dict] | None:
    """--chat-template: 'qwen2.5' (the official template), 'keep' (the tokenizer's own), or a Jinja file."""
    if choice == "qwen2.5":
        return official_chat_template()
    if choice == "keep":
        return tokenizer.vocab.chat_template
    path = Path(choice)
    if not path.is_file():
        raise ValueError(f"--chat-template {choice!r}: not 'qwen2.5', 'keep' or an existing template file")
    return path.read_bytes().decode("utf-8")


def export_model(model_dir: str | Path, out: str | Path, dtype: str = "auto", gguf_type: str | None = None,
                 tokenizer_dir: str | Path | None = None, chat_template: str = "qwen2.5",
                 max_shard_size: int | str = "5GB") -> list[Path]:
    """Write `out` as a complete HF directory (and `out/model-TYPE.gguf` with gguf_type); returns the files."""
    model_dir, out = Path(model_dir), Path(out)
    if out.exists() and out.resolve() == model_dir.resolve():
        raise ValueError(f"--out {out} is the model directory itself: export into a new directory")
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else model_dir
    if not (tokenizer_dir / "tokenizer.json").is_file() and not (tokenizer_dir / "vocab.json").is_file():
        raise TokenizerError(f"{tokenizer_dir} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt): "
                             f"give the tokenizer the model was trained with as --tokenizer DIR")
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    cfg = ModelConfig.from_json(model_dir)
    if len(tokenizer) > cfg.vocab_size:
        raise TokenizerError(f"the tokenizer of {tokenizer_dir} has {len(tokenizer)} tokens but the model's "
                             f"embedding only {cfg.vocab_size} rows: wrong --tokenizer?")
    tokenizer.vocab.chat_template = resolve_chat_template(chat_template, tokenizer)
    if gguf_type is not None:
        check_gguf_support(cfg, tokenizer, gguf_type)

    model = load_model(model_dir, dtype=dtype, config=cfg)
    save_model(model, out, max_shard_size=max_shard_size,  # in the dtype it was loaded in
               generation_config=_generation_config(model_dir, cfg, tokenizer))
    tokenizer.save(out)
    if gguf_type is not None:
        write_gguf(model, tokenizer, out / f"model-{gguf_type}.gguf", gguf_type, name=model_dir.resolve().name)
    return sorted(p for p in out.iterdir() if p.is_file())


def _generation_config(model_dir: Path, cfg: ModelConfig, tokenizer: Tokenizer) -> dict:
    """The model directory's generation_config.json; without one, its bos/eos ids (with <|im_end|> for chat)."""
    path = model_dir / "generation_config.json"
    if path.is_file():
        return json.loads(path.read_text())
    eos = list(cfg.eos_token_ids)
    candidates = [tokenizer.vocab.eos_token] + (["<|im_end|>", "<|endoftext|>"] if tokenizer.vocab.is_chatml() else [])
    for token in candidates:
        if token in tokenizer.added_tokens and tokenizer.added_tokens[token] not in eos:
            eos.append(tokenizer.added_tokens[token])
    config = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos or None}
    return {k: v for k, v in config.items() if v is not None}


# ---- GGUF --------------------------------------------------------------------------------------------------------
def _tensor_type(tensor: torch.Tensor, gguf_type: str, name: str = "") -> gguf.GGMLQuantizationType:
    """F32 for norms and biases (as llama.cpp's converter), the chosen type for matrices (q4_0: Q8_0 for the output
    matrix, `name` in GGUF's naming); Q8_0 and Q4_0 need rows that are whole blocks of 32 values, else the matrix is
    written in BF16."""
    if tensor.ndim == 1:
        return gguf.GGMLQuantizationType.F32
    qtype = GGUF_TYPES["q8_0" if gguf_type == "q4_0" and name in _OUTPUT_NAMES else gguf_type]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if tensor.shape[-1] % block == 0 else gguf.GGMLQuantizationType.BF16


def _nbytes(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return tensor.numel() // block * type_size


def gguf_vocabulary(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) as llama.cpp's converter writes a Qwen2.5 vocabulary: one entry per embedding
    row, rows without a token as UNUSED "[PADn]"; added tokens CONTROL if special or spelt <|...|>, else
    USER_DEFINED (<tool_call>, </tool_call>)."""
    vocab = tokenizer.vocab
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    ordered = sorted(vocab.ranks.items(), key=lambda item: item[1])
    for token, (_, i) in zip(bytes_to_tokens([b for b, _ in ordered]), ordered):
        tokens[i], types[i] = token, int(gguf.TokenType.NORMAL)
    for added in vocab.added:
        control = added.special or (added.content.startswith("<|") and added.content.endswith("|>"))
        tokens[added.id] = added.content
        types[added.id] = int(gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED)
    merges = [f"{a} {b}" for a, b in zip(bytes_to_tokens([a for a, _ in vocab.merges]),
                                         bytes_to_tokens([b for _, b in vocab.merges]))]
    return tokens, types, merges


def _special_ids(tokenizer: Tokenizer, cfg: ModelConfig) -> dict[str, int]:
    """bos/eos/padding ids as llama.cpp's converter finds them: tokenizer_config.json's tokens first, then
    config.json's *_token_id (Qwen2.5: no bos token, so bos is config.json's 151643)."""
    ids = {}
    for kind, token in (("eos", tokenizer.vocab.eos_token), ("pad", tokenizer.vocab.pad_token)):
        if token in tokenizer.added_tokens:
            ids[kind] = tokenizer.added_tokens[token]
    for kind, value in (("bos", cfg.bos_token_id), ("eos", cfg.eos_token_id), ("pad", cfg.pad_token_id)):
        if isinstance(value, int):
            ids.setdefault(kind, value)
    return ids


def check_gguf_support(cfg: ModelConfig, tokenizer: Tokenizer, gguf_type: str) -> None:
    """Raise, naming the reason, where write_gguf cannot write a faithful file (checked before any export)."""
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"GGUF type {gguf_type!r} is not supported (choose {', '.join(GGUF_TYPES)})")
    if cfg.model_type != "qwen2":
        raise ValueError(f"GGUF export writes llama.cpp's dense qwen2 architecture; model_type {cfg.model_type!r} "
                         f"(mixture of experts) is not supported here")
    if tokenizer.vocab.pattern != QWEN_PATTERN or not tokenizer.vocab.nfc:
        raise TokenizerError("GGUF export names llama.cpp's 'qwen2' pre-tokenizer, but this tokenizer's "
                             "pre-tokenizer regex or normalizer is not Qwen's")
    if len(tokenizer) > cfg.vocab_size:
        raise TokenizerError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                             f"{cfg.vocab_size} rows")


def write_gguf(model: CausalLM, tokenizer: Tokenizer, path: str | Path, gguf_type: str = "bf16",
               name: str = "qwen2.5") -> Path:
    """Write a dense Qwen2.5 model with its tokenizer and chat template as a GGUF file for llama.cpp (`qwen2`)."""
    path = Path(path)
    check_gguf_support(model.config, tokenizer, gguf_type)
    if model.config.dual_chunk_attention_config:
        warnings.warn("llama.cpp has no dual chunk attention: the GGUF file runs with plain RoPE at every length",
                      stacklevel=2)
    tmp = path.with_name(path.name + ".tmp")  # renamed when complete: never a half-written file under the name
    try:
        _write_gguf(model, tokenizer, tmp, gguf_type, name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


def _write_gguf(model: CausalLM, tokenizer: Tokenizer, path: Path, gguf_type: str, name: str) -> None:
    cfg = model.config
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2])
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    if cfg.head_dim is not None and cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if rope_kind(cfg) == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(cfg.rope_scaling["factor"])
        writer.add_rope_scaling_orig_ctx_len(yarn_original_length(cfg))
    writer.add_file_type(_FILE_TYPES[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, types, merges = gguf_vocabulary(tokenizer, cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind, token_id in _special_ids(tokenizer, cfg).items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(False)  # Qwen adds neither a BOS nor an EOS token
    writer.add_add_eos_token(False)
    template = tokenizer.vocab.chat_template
    if template is None and tokenizer.vocab.is_chatml():
        template = official_chat_template()
    if template is not None:
        writer.add_chat_template(template)

    # Tensor infos first, then the data one tensor at a time: no second copy of the whole model in memory.
    tensors = [(gguf_tensor_name(n), t) for n, t in model.state_dict().items()
               if not (cfg.tie_word_embeddings and n == "lm_head.weight")]  # tied: llama.cpp reuses token_embd
    for gguf_name, tensor in tensors:
        qtype = _tensor_type(tensor, gguf_type, gguf_name)
        writer.add_tensor_info(gguf_name, tuple(tensor.shape), np.dtype(np.float32), _nbytes(tensor, qtype), qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for gguf_name, tensor in tensors:
            data = tensor.detach().to("cpu", torch.float32).numpy()
            writer.write_tensor_data(gguf.quants.quantize(data, _tensor_type(tensor, gguf_type, gguf_name)))
    finally:
        writer.close()
