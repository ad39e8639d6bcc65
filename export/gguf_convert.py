"""Merged Phi-3 checkpoint -> GGUF (arch ``phi3``, SentencePiece tokenizer inside) -> llama.cpp quantization.

Writing uses gguf-py (llama.cpp's own writer and tensor-name map); quantizing uses llama.cpp's
``llama_model_quantize`` through llama-cpp-python, which knows every quant type (K-quants included).
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

#: llama.cpp file types by name (``llama_ftype`` in llama.h).
FTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}


def _read_state(ckpt_dir: str) -> dict:
    """All tensors of the HF checkpoint as float32 numpy (bf16 goes through torch, numpy has no bf16)."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(ckpt_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {ckpt_dir}")
    out = {}
    for fn in files:
        with safe_open(fn, framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k).float().numpy()
    return out


def _vocab(ckpt_dir: str, vocab_size: int):
    """Tokens, scores and llama.cpp token types from ``tokenizer.model`` (+ ``added_tokens.json``), padded to
    the model's vocab size with unused pieces as llama.cpp's converter does for Phi-3 (32000 -> 32064)."""
    import gguf
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=os.path.join(ckpt_dir, "tokenizer.model"))
    T = gguf.TokenType
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        types.append(T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i)
                     else T.BYTE if sp.is_byte(i) else T.UNUSED if sp.is_unused(i) else T.NORMAL)
    added = os.path.join(ckpt_dir, "added_tokens.json")
    if os.path.exists(added):
        with open(added) as f:
            for piece, idx in sorted(json.load(f).items(), key=lambda kv: kv[1]):
                while len(tokens) <= idx:
                    tokens.append(f"[PAD{len(tokens)}]".encode()), scores.append(-1000.0), types.append(T.UNUSED)
                tokens[idx], scores[idx], types[idx] = piece.encode(), -1000.0, T.USER_DEFINED
    while len(tokens) < vocab_size:
        tokens.append(f"[PAD{len(tokens)}]".encode()), scores.append(-1000.0), types.append(T.UNUSED)
    return tokens, scores, types


def convert_to_gguf(ckpt_dir: str, out_path: str, outtype: str = "F32") -> str:
    """Write ``ckpt_dir`` (a merged HF Phi-3) as a GGUF file of type F32 or F16, atomically."""
    import gguf

    if outtype not in ("F32", "F16"):
        raise ValueError("convert writes F32 or F16; quantize the result for other types")
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        cfg = json.load(f)
    rope = cfg.get("rope_parameters") or {}
    if (cfg.get("rope_scaling") or {}).get("type") in ("longrope", "su") or rope.get("rope_type") == "longrope":
        raise NotImplementedError("LongRoPE (Phi-3 128k) checkpoints are not supported yet; use a 4k model")
    n_layer, n_embd = cfg["num_hidden_layers"], cfg["hidden_size"]
    n_head = cfg["num_attention_heads"]
    head_dim = n_embd // n_head
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))

    tmp = out_path + ".tmp"
    w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.PHI3])
    w.add_name(os.path.basename(os.path.normpath(ckpt_dir)))
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(n_layer)
    w.add_head_count(n_head)
    w.add_head_count_kv(cfg.get("num_key_value_heads", n_head))
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-5))
    w.add_rope_dimension_count(int(head_dim * partial))
    w.add_rope_freq_base(float(theta))
    if cfg.get("sliding_window"):
        w.add_sliding_window(cfg["sliding_window"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if outtype == "F32" else gguf.LlamaFileType.MOSTLY_F16)

    tokens, scores, types = _vocab(ckpt_dir, cfg["vocab_size"])
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    for key, fn in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                    ("pad_token_id", w.add_pad_token_id)):
        if isinstance(cfg.get(key), int):
            fn(cfg[key])
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI3, n_layer)
    state = _read_state(ckpt_dir)
    if "lm_head.weight" not in state:  # tied embeddings
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    for hf_name, arr in state.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise KeyError(f"no GGUF name for tensor {hf_name}")
        if outtype == "F16" and arr.ndim == 2:
            arr = arr.astype(np.float16)
        w.add_tensor(name, np.ascontiguousarray(arr.astype(arr.dtype, copy=False)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out_path)
    return out_path


def quantize_gguf(src: str, dst: str, qtype: str = "Q8_0", threads: int = 0) -> str:
    """Quantize with llama.cpp (``llama_model_quantize``), atomically."""
    import llama_cpp

    if qtype not in FTYPES:
        raise ValueError(f"unknown quant type {qtype}; one of {', '.join(FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[qtype]
    params.nthread = threads
    tmp = dst + ".tmp"
    rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), params)
    if rc != 0:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise RuntimeError(f"llama_model_quantize({qtype}) failed with code {rc}")
    os.replace(tmp, dst)
    return dst
