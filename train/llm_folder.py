"""The LLM of a run is a folder laid out the way the hub ships Phi-3-mini: config.json, safetensors weights and
its own tokenizer (tokenizer.model for the GGUF, tokenizer_config.json / tokenizer.json for transformers).

Everything about tokens is read from that folder once, here: BOS, the end tokens (config.json and
generation_config.json), padding and the chat template, turned into the :class:`PromptLayout` that training,
merge, the GGUF and (through the bundle's manifest) the runtime all use. The tiny test model takes the same
path: its SentencePiece tokenizer is saved as an ordinary Hugging Face tokenizer folder beside its config.
"""

from __future__ import annotations

import json
import os
import shutil

from samf.errors import SamfError
from samf.runtime.inference.prompt import PromptLayout

from .run_files import TOKENIZER_MODEL

#: What the GGUF converter and the runtime know how to run.
ARCHITECTURES = ("Phi3ForCausalLM",)
#: The hub's tokenizer files (tokenizer.model is what the GGUF's SentencePiece vocabulary is built from).
TOKENIZER_FILES = (TOKENIZER_MODEL, "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")
_IMAGE, _ANSWER = "\x01samf-image\x01", "\x01samf-answer\x01"


class LLMFolderError(SamfError):
    """An LLM folder that training or conversion cannot use; the message says which file and why."""


def _json(path: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise LLMFolderError(f"{path}: unreadable ({e})") from None
    if not isinstance(d, dict):
        raise LLMFolderError(f"{path}: not a JSON object")
    return d


def read_llm_config(folder: str) -> dict:
    """config.json of an LLM folder, refused in one line when the stack cannot run that model."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise LLMFolderError(f"{folder} is not an LLM folder (no config.json)")
    cfg = _json(path)
    arch = cfg.get("architectures") or [cfg.get("model_type")]
    if not any(a in ARCHITECTURES or a == "phi3" for a in arch):
        raise LLMFolderError(f"{folder}: architecture {', '.join(map(str, arch))} is not supported "
                             f"(samf runs {', '.join(ARCHITECTURES)})")
    rope = {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}
    if rope.get("type") in ("longrope", "su") or rope.get("rope_type") in ("longrope", "su"):
        raise LLMFolderError(f"{folder}: LongRoPE (Phi-3 128k) is not supported by the GGUF converter; "
                             "use Phi-3-mini-4k-instruct")
    return cfg


def _end_ids(folder: str, cfg: dict) -> set:
    """Every id the model's own files name as an end of generation (config and generation_config)."""
    ids = set()
    gen = os.path.join(folder, "generation_config.json")
    for d in (cfg, _json(gen) if os.path.isfile(gen) else {}):
        v = d.get("eos_token_id")
        ids.update(int(i) for i in (v if isinstance(v, list) else [v]) if isinstance(i, int))
    return ids


class LLMTokenizer:
    """The LLM folder's own tokenizer (transformers) and the prompt layout read from it."""

    def __init__(self, folder: str, config: dict | None = None):
        """``config``: the model's config.json as a dict, for a tokenizer folder that has none yet (the tiny
        LM base before pretrain-lm writes it)."""
        cfg = read_llm_config(folder) if config is None else config
        self.hf = self.hf_tokenizer(folder)
        self.folder = folder
        self.vocab_size = int(cfg["vocab_size"])
        if len(self.hf) > self.vocab_size:
            raise LLMFolderError(f"{folder}: the tokenizer has {len(self.hf)} tokens but config.json's vocab_size "
                                 f"is {self.vocab_size}")
        self.layout = self._layout(_end_ids(folder, cfg))

    @staticmethod
    def hf_tokenizer(folder: str):
        """The folder's tokenizer through transformers, or a one-line refusal."""
        if not any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", TOKENIZER_MODEL)):
            raise LLMFolderError(f"{folder} has no tokenizer (tokenizer.json or tokenizer.model)")
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as e:  # transformers raises many kinds here; the user needs the folder and the reason
            raise LLMFolderError(f"{folder}: its tokenizer does not load ({str(e).splitlines()[0]})") from None

    def encode(self, text: str) -> list:
        """Plain text -> ids, without BOS or any other special token."""
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True).strip()

    def _layout(self, ends: set) -> PromptLayout:
        hf = self.hf
        eos = hf.eos_token_id if hf.eos_token_id is not None else min(ends, default=None)
        if eos is None:
            raise LLMFolderError(f"{self.folder}: neither the tokenizer nor config.json names an EOS token")
        adds = hf.encode("a", add_special_tokens=True)  # whether this tokenizer puts BOS first, as it says it does
        bos = hf.bos_token_id if hf.bos_token_id is not None and adds[:1] == [hf.bos_token_id] else None
        pad = hf.pad_token_id if hf.pad_token_id is not None else eos
        ends = ends | {eos}
        if not hf.chat_template:
            return PromptLayout(answer_end=eos, stop=tuple(sorted(ends)), bos=bos, pad=pad)
        user = [{"role": "user", "content": _IMAGE + "{request}"}]
        text = self._strip_bos(hf.apply_chat_template(user, tokenize=False, add_generation_prompt=True))
        whole = hf.apply_chat_template(user + [{"role": "assistant", "content": _ANSWER}], tokenize=False)
        if text.count(_IMAGE) != 1 or whole.count(_ANSWER) != 1:
            raise LLMFolderError(f"{self.folder}: its chat template does not place one user message and one "
                                 "answer; samf cannot lay out a prompt with it")
        before, after = text.split(_IMAGE)
        head, tail = after.split("{request}", 1)
        answer_tail = whole.split(_ANSWER, 1)[1]
        answer_end = (self.encode(answer_tail) or [eos])[0]
        return PromptLayout(answer_end=answer_end, stop=tuple(sorted(ends | {answer_end})), bos=bos,
                            before_image=tuple(self.encode(before)), after_prompt=tuple(self.encode(tail)),
                            prompt_format=head + "{request}", pad=pad, chat_template=True,
                            notes=dict(before_image=before, after_prompt=tail, answer_end=answer_tail))

    def _strip_bos(self, text: str) -> str:
        b = self.hf.bos_token
        return text[len(b):] if b and text.startswith(b) else text

    def save_to(self, out_dir: str) -> None:
        """Put this tokenizer's files (the hub's own, tokenizer.model included) into ``out_dir``."""
        for name in TOKENIZER_FILES:
            src = os.path.join(self.folder, name)
            if os.path.isfile(src):
                shutil.copy(src, os.path.join(out_dir, name))


def save_sentencepiece_folder(model_file: str, out_dir: str, max_length: int = 512) -> None:
    """A SentencePiece model (ids 0 <unk>, 1 <s>, 2 </s>, 3 <pad>) as a Hugging Face tokenizer folder:
    tokenizer.model, tokenizer_config.json and the tokenizer.json transformers converts it to."""
    from transformers import AutoTokenizer

    os.makedirs(out_dir, exist_ok=True)
    dst = os.path.join(out_dir, TOKENIZER_MODEL)
    if os.path.abspath(model_file) != os.path.abspath(dst):
        shutil.copy(model_file, dst)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(dict(tokenizer_class="LlamaTokenizer", legacy=False, add_bos_token=True, add_eos_token=False,
                       bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                       clean_up_tokenization_spaces=False, model_max_length=max_length), f, indent=2)
    AutoTokenizer.from_pretrained(out_dir, local_files_only=True).save_pretrained(out_dir)
