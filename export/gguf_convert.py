"""Merged Phi-3 checkpoint -> GGUF (arch ``phi3``, SentencePiece tokenizer inside) -> llama.cpp quantization.

Writing uses gguf-py (llama.cpp's own writer and tensor-name map); quantizing uses llama.cpp's
``llama_model_quantize`` through llama-cpp-python, which knows every quant type (K-quants included).
"""

from __future__ import annotations

import glob
import os

import numpy as np

from samf.engines.llama_cpp_engine import gguf_tensor_infos
from samf.errors import ExportCheckFailed, SamfError
from samf.train.llm_folder import LLMFolderError, LLMTokenizer, read_llm_config
from samf.train.run_files import TOKENIZER_MODEL

from .configs import GgufConfig

#: llama.cpp file types by name (``llama_ftype`` in llama.h).
FTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}


#: Output types: llama.cpp file type and the numpy dtype a 2-D tensor is written as (bf16 as its raw bits).
OUTTYPES = {"F32": ("ALL_F32", np.float32), "F16": ("MOSTLY_F16", np.float16), "BF16": ("MOSTLY_BF16", np.uint16)}
_SRC_DTYPES = ("F32", "F16", "BF16")


def _tensor_plan(ckpt_dir: str, names, outtype: str) -> list:
    """(GGUF name, file, key, shape, output type) per tensor, from the safetensors headers alone.

    Norms (1-D) stay F32 whatever the output type, as llama.cpp's converter keeps them."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(ckpt_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {ckpt_dir}")
    plan, seen = [], set()
    for fn in files:
        with safe_open(fn, framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                if sl.get_dtype() not in _SRC_DTYPES:
                    raise LLMFolderError(f"{fn}: tensor {k} is {sl.get_dtype()}, not a float type")
                plan.append((k, fn, k, tuple(sl.get_shape())))
                seen.add(k)
    if "lm_head.weight" not in seen:  # tied embeddings
        emb = next(p for p in plan if p[0] == "model.embed_tokens.weight")
        plan.append(("lm_head.weight",) + emb[1:])
    out = []
    for hf_name, fn, key, shape in plan:
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise KeyError(f"no GGUF name for tensor {hf_name}")
        out.append((name, fn, key, shape, outtype if len(shape) == 2 else "F32"))
    return out


def _read_tensor(fn: str, key: str, outtype: str) -> np.ndarray:
    """One tensor in the output type; the file's mapping is released before the next is read.

    bf16 goes out as its raw 16 bits (numpy has no bf16); sources are converted once, never via a
    float32 copy of the whole model."""
    import torch
    from safetensors import safe_open

    with safe_open(fn, framework="pt") as f:
        t = f.get_tensor(key)
    if outtype == "BF16":
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    return t.to(torch.float16 if outtype == "F16" else torch.float32).contiguous().numpy()


def _vocab(ckpt_dir: str, vocab_size: int, tok: LLMTokenizer):
    """Tokens, scores and llama.cpp token types from ``tokenizer.model`` plus the added tokens (special ones as
    CONTROL, so llama.cpp treats ``<|end|>`` and friends as the model's own), padded to the model's vocab size
    with unused pieces as llama.cpp's converter does for Phi-3 (32000 -> 32064). The added tokens are those the
    folder's tokenizer loaded (tokenizer_config.json's added_tokens_decoder or the hub's added_tokens.json)."""
    import gguf
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=os.path.join(ckpt_dir, TOKENIZER_MODEL))
    T = gguf.TokenType
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        types.append(T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i)
                     else T.BYTE if sp.is_byte(i) else T.UNUSED if sp.is_unused(i) else T.NORMAL)
    for idx, added in sorted(tok.hf.added_tokens_decoder.items()):
        piece, special = added.content, added.special
        if idx < len(tokens) and tokens[idx] == piece.encode():
            continue  # a SentencePiece piece (<s>, </s>) listed again
        while len(tokens) <= idx:
            tokens.append(f"[PAD{len(tokens)}]".encode()), scores.append(-1000.0), types.append(T.UNUSED)
        tokens[idx], scores[idx], types[idx] = piece.encode(), 0.0, T.CONTROL if special else T.USER_DEFINED
    while len(tokens) < vocab_size:
        tokens.append(f"[PAD{len(tokens)}]".encode()), scores.append(-1000.0), types.append(T.UNUSED)
    return tokens, scores, types


def convert_to_gguf(ckpt_dir: str, out_path: str, outtype: str = GgufConfig.outtype) -> str:
    """Write ``ckpt_dir`` (a merged HF Phi-3) as a GGUF file of type F32, F16 or BF16, atomically.

    Tensors stream one at a time from the safetensors files into the output, so memory stays near the
    largest tensor, not the model (a 3.8B bf16 checkpoint does not fit in float32 on a 24 GB machine)."""
    import gguf

    if outtype not in OUTTYPES:
        raise ValueError("convert writes F32, F16 or BF16; quantize the result for other types")
    cfg = read_llm_config(ckpt_dir)  # refuses, before anything is written, what llama.cpp's phi3 would run wrongly
    rope = cfg.get("rope_parameters") or {}
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
    w.add_file_type(getattr(gguf.LlamaFileType, OUTTYPES[outtype][0]))

    tok = LLMTokenizer(ckpt_dir)
    layout = tok.layout
    tokens, scores, types = _vocab(ckpt_dir, cfg["vocab_size"], tok)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    eos = cfg.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    if isinstance(cfg.get("bos_token_id"), int):
        w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(eos if isinstance(eos, int) else layout.answer_end)
    w.add_pad_token_id(layout.pad)
    if layout.answer_end != eos:  # the end-of-turn token training taught (Phi-3's <|end|>)
        w.add_eot_token_id(layout.answer_end)
    if tok.hf.chat_template:
        w.add_chat_template(tok.hf.chat_template)
    w.add_unk_token_id(0)
    w.add_add_bos_token(layout.bos is not None)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)

    plan = _tensor_plan(ckpt_dir, gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI3, n_layer), outtype)
    for name, _, _, shape, typ in plan:  # infos first: the data then streams in the same order
        dtype = np.dtype(OUTTYPES[typ][1])
        w.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize,
                          raw_dtype=getattr(gguf.GGMLQuantizationType, typ))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, fn, key, _, typ in plan:
            w.write_tensor_data(_read_tensor(fn, key, typ))
        w.close()
    except BaseException:
        w.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, out_path)
    return out_path


def quantize_gguf(src: str, dst: str, qtype: str = GgufConfig.qtype, threads: int = 0) -> str:
    """Quantize with llama.cpp (``llama_model_quantize``), atomically."""
    from samf.engines.llama_cpp_engine import _llama_cpp

    llama_cpp = _llama_cpp()  # with a portable build's backends registered

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
        raise SamfError(f"llama_model_quantize({qtype}) failed with code {rc}")
    os.replace(tmp, dst)
    return dst


# ------------------------------------------------------------------------------------------ validation

#: Largest relative RMS error of a dequantized tensor against the unquantized GGUF, per llama.cpp tensor type.
#: About 1.5x what each type gives on normally distributed weights (Q4_K about 0.09, Q6_K 0.02, Q8_0 0.004):
#: a wrong block layout, scale or row order lands far above.
QUANT_TOLERANCE = {"F32": 1e-6, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 0.01, "Q6_K": 0.035, "Q5_K": 0.07,
                   "Q5_0": 0.08, "Q5_1": 0.08, "Q4_K": 0.14, "Q4_0": 0.16, "Q4_1": 0.16, "Q3_K": 0.25,
                   "Q2_K": 0.45}


def _read_gguf_rows(path: str, info: tuple, rows: int | None = None) -> np.ndarray:
    """A tensor's first ``rows`` rows (all when None) as float32, read with plain file reads so that checking a
    many-GB file does not leave it resident in this process's memory."""
    import gguf

    typ, shape, offset, n_bytes = info
    qtype = getattr(gguf.GGMLQuantizationType, typ)
    n_rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    take = n_rows if rows is None else min(rows, n_rows)
    row_bytes = n_bytes // n_rows
    raw = np.fromfile(path, dtype=np.uint8, count=take * row_bytes, offset=offset).reshape(take, row_bytes)
    if typ == "F32":
        return raw.view(np.float32)
    if typ == "F16":
        return raw.view(np.float16).astype(np.float32)
    return gguf.quants.dequantize(raw, qtype).astype(np.float32).reshape(take, -1)


def check_gguf_against_checkpoint(ckpt_dir: str, gguf_path: str, outtype: str) -> int:
    """Every tensor of a converted GGUF equals its safetensors source cast to the output type, bit for bit;
    returns how many tensors were compared. Streams one tensor at a time, like the conversion."""
    import gguf

    cfg = read_llm_config(ckpt_dir)
    tensors = gguf_tensor_infos(gguf_path)
    plan = _tensor_plan(ckpt_dir, gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI3, cfg["num_hidden_layers"]), outtype)
    if sorted(tensors) != sorted(p[0] for p in plan):
        raise ExportCheckFailed(f"{gguf_path}: tensors {sorted(set(tensors) ^ {p[0] for p in plan})} differ from "
                           f"{ckpt_dir}")
    for name, fn, key, shape, typ in plan:
        want = _read_tensor(fn, key, typ)
        ttyp, tshape, offset, n_bytes = tensors[name]
        if ttyp != typ or tshape != tuple(shape) or n_bytes != want.nbytes:
            raise ExportCheckFailed(f"{gguf_path}: {name} is {ttyp}{list(tshape)}, expected {typ}{list(shape)}")
        got = np.fromfile(gguf_path, dtype=want.dtype, count=want.size, offset=offset).reshape(want.shape)
        if not np.array_equal(got.view(np.uint8), want.view(np.uint8)):
            raise ExportCheckFailed(f"{gguf_path}: {name} does not hold the checkpoint's {key}")
    return len(plan)


def check_quantized_gguf(base_path: str, quant_path: str, rows: int = 32) -> dict:
    """A quantized GGUF against the unquantized one it came from: the same tensors and shapes, and the first
    ``rows`` rows of each within its type's :data:`QUANT_TOLERANCE` (relative RMS error). Returns
    ``{tensor type: worst relative RMS error}``."""
    base, quant = gguf_tensor_infos(base_path), gguf_tensor_infos(quant_path)
    if sorted(base) != sorted(quant):
        raise ExportCheckFailed(f"{quant_path}: tensors {sorted(set(base) ^ set(quant))} differ from {base_path}")
    worst: dict = {}
    for name, info in quant.items():
        if info[1] != base[name][1]:
            raise ExportCheckFailed(f"{quant_path}: {name} has shape {list(info[1])}, "
                                    f"{base_path} {list(base[name][1])}")
        ref = _read_gguf_rows(base_path, base[name], rows)
        got = _read_gguf_rows(quant_path, info, rows).reshape(ref.shape)
        err = float(np.sqrt(np.mean((got - ref) ** 2)) / max(np.sqrt(np.mean(ref ** 2)), 1e-12))
        tol = QUANT_TOLERANCE.get(info[0])
        if tol is None or not err <= tol:
            raise ExportCheckFailed(f"{quant_path}: {name} ({info[0]}) is {err:.3g} off the unquantized model "
                               f"(relative RMS; allowed {tol})")
        worst[info[0]] = max(worst.get(info[0], 0.0), err)
    return worst
