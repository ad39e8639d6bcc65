"""A Phi-3 LLM folder laid out as the hub ships Phi-3-mini-4k-instruct, with its real vocabulary and random
weights: for tests, and for benchmarking the stack at full size before a user has the real weights.

The vocabulary comes from llama.cpp's ``models/ggml-vocab-phi-3.gguf`` (MIT, shipped in
``train/data/phi3_vocab`` with its licence): 32064 tokens, scores and types, BOS 1 / EOS 32000, the added tokens
32000-32010 and the chat template. The SentencePiece model rebuilt from its first 32000 pieces (BPE, byte
fallback, dummy prefix, no whitespace folding) reproduces llama.cpp's tokenizer test vectors.

Weights stream to safetensors shards one tensor at a time, initialised as transformers initialises Phi-3
(normal with ``initializer_range``, norms at one, the padding row zero), so a 3.8B bf16 folder is written in
about the memory of one shard rather than of the model.
"""

from __future__ import annotations

import functools
import json
import os

from .run_files import TOKENIZER_MODEL

VOCAB_GGUF = os.path.join(os.path.dirname(__file__), "data", "phi3_vocab", "ggml-vocab-phi-3.gguf")
ADDED = {32000: "<|endoftext|>", 32001: "<|assistant|>", 32002: "<|placeholder1|>", 32003: "<|placeholder2|>",
         32004: "<|placeholder3|>", 32005: "<|placeholder4|>", 32006: "<|system|>", 32007: "<|end|>",
         32008: "<|placeholder5|>", 32009: "<|placeholder6|>", 32010: "<|user|>"}
#: Phi-3-mini-4k-instruct's shape (3.8B parameters).
PHI3_MINI = dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=32, num_hidden_layers=32)
SHARD_BYTES = 1 << 30


@functools.lru_cache(maxsize=1)
def _vocab_fields() -> tuple:
    """Tokens, scores, types and chat template of the shipped vocabulary (gguf-py reads them in about 3 s)."""
    import gguf

    f = gguf.GGUFReader(VOCAB_GGUF).fields
    tokens = [bytes(f["tokenizer.ggml.tokens"].parts[i]).decode("utf-8") for i in f["tokenizer.ggml.tokens"].data]
    scores = [float(f["tokenizer.ggml.scores"].parts[i][0]) for i in f["tokenizer.ggml.scores"].data]
    types = [int(f["tokenizer.ggml.token_type"].parts[i][0]) for i in f["tokenizer.ggml.token_type"].data]
    return tokens, scores, types, f["tokenizer.chat_template"].contents()


def write_tokenizer(out: str) -> None:
    """tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json, added_tokens.json."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers import AutoTokenizer

    tokens, scores, types, template = _vocab_fields()
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = 32000
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 0, 1, 2, -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    P = pb.ModelProto.SentencePiece
    kind = {1: P.NORMAL, 2: P.UNKNOWN, 3: P.CONTROL, 4: P.USER_DEFINED, 6: P.BYTE}
    for t, s, ty in zip(tokens[:32000], scores[:32000], types[:32000]):
        p = m.pieces.add()
        p.piece, p.score, p.type = t, s, kind[ty]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, TOKENIZER_MODEL), "wb") as f:
        f.write(m.SerializeToString())
    special = {0: "<unk>", 1: "<s>", 2: "</s>", **ADDED}
    decoder = {str(i): dict(content=c, lstrip=False, normalized=False, rstrip=i >= 32001, single_word=False,
                            special=True) for i, c in special.items()}
    config = dict(add_bos_token=True, add_eos_token=False, added_tokens_decoder=decoder, bos_token="<s>",
                  chat_template=template, clean_up_tokenization_spaces=False, eos_token="<|endoftext|>",
                  legacy=False, model_max_length=4096, pad_token="<|endoftext|>", padding_side="left",
                  sp_model_kwargs={}, tokenizer_class="LlamaTokenizer", unk_token="<unk>",
                  use_default_system_prompt=False)
    _dump(os.path.join(out, "tokenizer_config.json"), config)
    _dump(os.path.join(out, "special_tokens_map.json"),
          dict(bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>"))
    _dump(os.path.join(out, "added_tokens.json"), {c: i for i, c in ADDED.items()})
    tmp = os.path.join(out, ".tokenizer-json")
    AutoTokenizer.from_pretrained(out, local_files_only=True).save_pretrained(tmp)
    os.replace(os.path.join(tmp, "tokenizer.json"), os.path.join(out, "tokenizer.json"))
    for name in os.listdir(tmp):
        os.remove(os.path.join(tmp, name))
    os.rmdir(tmp)


def phi3_tensor_shapes(config) -> list:
    """``[(name, shape)]`` of ``Phi3ForCausalLM(config).state_dict()``, in its order, without importing
    transformers' modeling code (1.7 s on this machine; tests/test_synthetic_bundle.py checks it against the
    model)."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    head = getattr(config, "head_dim", None) or h // config.num_attention_heads
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * head
    shapes = [("model.embed_tokens.weight", (v, h))]
    for n in range(config.num_hidden_layers):
        layer = f"model.layers.{n}."
        shapes += [(layer + "self_attn.o_proj.weight", (h, config.num_attention_heads * head)),
                   (layer + "self_attn.qkv_proj.weight", (qkv, h)), (layer + "mlp.gate_up_proj.weight", (2 * i, h)),
                   (layer + "mlp.down_proj.weight", (h, i)), (layer + "input_layernorm.weight", (h,)),
                   (layer + "post_attention_layernorm.weight", (h,))]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def write_random_weights(out: str, config, dtype: str, seed: int = 0, shard_bytes: int = SHARD_BYTES) -> list:
    """The weights of ``Phi3ForCausalLM(config)`` drawn one tensor at a time into safetensors shards (with the
    hub's index file when there is more than one); returns the shard names."""
    import torch
    from safetensors.torch import save_file

    names = phi3_tensor_shapes(config)
    torch_dtype = getattr(torch, dtype)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    shards, size = [[]], 0
    for name, shape in names:
        n = itemsize * int(torch.Size(shape).numel())
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for fname, shard in zip(files, shards):
        tensors = {}
        for name, shape in shard:
            if len(shape) == 1:
                t = torch.ones(shape, dtype=torch_dtype)
            else:
                t = torch.empty(shape, dtype=torch_dtype).normal_(0.0, config.initializer_range, generator=gen)
                if name.endswith("embed_tokens.weight") and config.pad_token_id is not None:
                    t[config.pad_token_id] = 0
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * itemsize
        save_file(tensors, os.path.join(out, fname), metadata={"format": "pt"})
        del tensors
    if len(files) > 1:
        _dump(os.path.join(out, "model.safetensors.index.json"),
              dict(metadata=dict(total_size=total), weight_map=weight_map))
    return files


def write_phi3_folder(out: str, hidden_size: int = 128, intermediate_size: int = 256, num_hidden_layers: int = 2,
                      num_attention_heads: int = 4, dtype: str = "bfloat16", seed: int = 0,
                      shard_bytes: int = SHARD_BYTES, **config) -> str:
    """A Phi-3 LLM folder with the real vocabulary and random weights saved in ``dtype``: config.json,
    generation_config.json, safetensors and the tokenizer files, as the hub ships Phi-3-mini-4k-instruct."""
    from transformers import GenerationConfig, Phi3Config

    write_tokenizer(out)
    cfg = Phi3Config(vocab_size=32064, hidden_size=hidden_size, intermediate_size=intermediate_size,
                     num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                     num_key_value_heads=num_attention_heads, max_position_embeddings=4096,
                     original_max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=32000,
                     pad_token_id=32000, sliding_window=2047, tie_word_embeddings=False, **config)
    cfg.architectures = ["Phi3ForCausalLM"]
    cfg.dtype = dtype
    write_random_weights(out, cfg, dtype, seed, shard_bytes)
    cfg.save_pretrained(out)
    GenerationConfig(bos_token_id=1, eos_token_id=[32000, 32001, 32007], pad_token_id=32000).save_pretrained(out)
    return out


def _dump(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
