"""The vision-language model: image encoder + SAMF fusion feeding Phi-3 through its input embeddings.

This is also the PyTorch reference pipeline that the exported runtime is checked against: the sequence
layout is the LLM folder's :class:`samf.runtime.inference.prompt.PromptLayout`, generation is greedy with a KV cache and
stops on any of the model's end tokens.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from samf.engines.greedy import greedy_decode
from samf.runtime.atomic import atomic_file
from samf.runtime.inference.prompt import LETTERS, REPORT_REQUESTS, PromptLayout, mcq_answer, mcq_request
from samf.runtime.progress import progress_bar

from .models import SAMF, AggregatorConfig, FusionConfig, ImageEncoder, ViTConfig
from .run_files import MODULES_CONFIG, MODULES_FILE
from .tokenizer import BOS, EOS, PAD


@dataclass
class TinyLLMConfig:
    """Sizes for the in-process Phi-3 used by tests and the demo (Phi-3-mini: 3072/8192/32/32)."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 512


def build_phi3(vocab_size: int, cfg: TinyLLMConfig):
    """A randomly initialised ``Phi3ForCausalLM`` of the given size (the real one loads from a path)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, max_position_embeddings=cfg.max_position_embeddings,
        original_max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False,
        sliding_window=None, attn_implementation="eager",
    )
    return Phi3ForCausalLM(config)


def checkpoint_dtype(path: str) -> torch.dtype:
    """The dtype a Hugging Face checkpoint records in its config.json; float32 where it records none."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    dtype = getattr(torch, str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def load_phi3(path: str):
    """A Phi-3 checkpoint from a local directory (Phi-3-mini or a merged samf checkpoint), in the dtype it
    was saved in: Phi-3-mini's bf16 is 7.6 GB, widened to fp32 it would be 15.3 GB."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=checkpoint_dtype(path), attn_implementation="eager")


class _StageClock:
    """``with clock("stage"):`` adds the block's wall time to ``timings[stage]`` (nothing when None)."""

    def __init__(self, timings: dict | None):
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t = time.perf_counter()
        yield
        if self.timings is not None:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t


@dataclass
class ImageConfig:
    """The image side of the model; saved beside the LLM as JSON."""

    vit: ViTConfig = field(default_factory=ViTConfig)
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ImageConfig":
        # A run or checkpoint written before the aggregator's slice mix has none (it then was the paper's).
        agg = {"slice_mix": False, **d["aggregator"]}
        return cls(ViTConfig(**d["vit"]), AggregatorConfig(**agg), FusionConfig(**d["fusion"]))


class FindingHead(nn.Module):
    """The auxiliary loss of fine-tuning: a linear read-out of the scan's abnormality labels (CT-RATE's 18,
    which the phantoms share) from the fused rows averaged over the N image tokens.

    Why: the LLM's loss reaches the aggregator and the fusion only through a few report tokens, and on 320
    phantoms the LLM learned the reports by heart sooner than the image modules learned to carry the findings
    (probes: the ViT's slices 1.00, the fused rows 0.76-0.89). A direct loss on the rows teaches them to carry
    the labels. Used in training only: it is not saved with the image modules, exported or run."""

    def __init__(self, d_llm: int, n_labels: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_llm)
        self.out = nn.Linear(d_llm, n_labels)

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(fused.float().mean(dim=1)))

    def loss(self, fused, labels, mask):
        """Binary cross-entropy per known label, averaged over the known labels of the batch."""
        per = nn.functional.binary_cross_entropy_with_logits(self(fused), labels.float(), reduction="none")
        return (per * mask).sum() / mask.sum().clamp(min=1.0)


class SamfVLM(nn.Module):
    def __init__(self, image_cfg: ImageConfig, llm: nn.Module, layout: PromptLayout):
        super().__init__()
        self.image_cfg = image_cfg
        self.encoder = ImageEncoder(image_cfg.vit, image_cfg.aggregator)
        self.fusion = SAMF(image_cfg.fusion, n_rows=image_cfg.aggregator.n_tokens)
        self.llm = llm
        self.layout = layout
        self.finding_head: FindingHead | None = None  # fine-tuning's auxiliary loss adds one (--aux-weight)

    # ------------------------------------------------------------------ pieces shared with export
    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(ids)

    def image_prefix(self, slices: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                     clock: "_StageClock | None" = None):
        """``[B, K, C, H, W]`` slices + prompt -> ``[B, N, d_llm]`` fused embeddings for the LLM.

        The image modules stay fp32 while the LLM may be bf16, so each side gets its own dtype; for an fp32 LLM,
        and under autocast, where the fusion's output is already 16-bit, these casts change nothing."""
        clock = clock or _StageClock(None)
        with clock("encoder"):
            z2d, z3d = self.encoder(slices)
        with clock("fusion"):
            text = self.token_embeddings(prompt_ids)
            fused = self.fusion(z2d, z3d, text.to(self.fusion_dtype), prompt_mask)
            return fused.to(text.dtype) if fused.dtype == torch.float32 else fused

    @property
    def fusion_dtype(self) -> torch.dtype:
        return next(self.fusion.parameters()).dtype

    # ------------------------------------------------------------------------------- training
    def forward(self, slices, prompts: list, answers: list, zero_image: bool = False, num_items: int | None = None,
                findings: "torch.Tensor | None" = None, findings_known: "torch.Tensor | None" = None):
        """Mean cross-entropy over answer tokens (+ the layout's answer end) for a batch of (prompt ids,
        answer ids); the sequence is ``head [image rows] prompt after_prompt answer answer_end``.

        ``num_items``: divide the token sum by this count instead (gradient accumulation: the step's tokens).
        ``findings`` ``[B, L]`` (0/1 labels, ``findings_known`` 1 where a label is known): also return the finding
        head's loss, ``(llm loss, finding loss)`` (:class:`FindingHead`, the auxiliary loss of fine-tuning)."""
        dev = slices.device
        lay = self.layout
        B = len(prompts)
        T = max(len(p) for p in prompts)
        pid = torch.full((B, T), lay.pad, dtype=torch.long, device=dev)
        pmask = torch.zeros((B, T), dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            pid[i, : len(p)] = torch.tensor(p, device=dev)
            pmask[i, : len(p)] = 1
        fused = self.image_prefix(slices, pid, pmask)
        if zero_image:
            fused = torch.zeros_like(fused)
        aux = None if findings is None else self.finding_head.loss(fused, findings, findings_known)
        N = fused.shape[1]
        head = self.token_embeddings(torch.tensor(lay.head(), dtype=torch.long, device=dev))
        seqs, labels = [], []
        for i in range(B):
            tail = lay.tail(prompts[i])
            answer = list(answers[i]) + [lay.answer_end]
            emb_tail = self.token_embeddings(torch.tensor(tail + answer, device=dev))
            seqs.append(torch.cat([head, fused[i], emb_tail]))
            labels.append([-100] * (len(head) + N + len(tail)) + answer)
        L = max(s.shape[0] for s in seqs)
        d = seqs[0].shape[1]
        emb = torch.zeros((B, L, d), dtype=fused.dtype, device=dev)
        att = torch.zeros((B, L), dtype=torch.long, device=dev)
        lab = torch.full((B, L), -100, dtype=torch.long, device=dev)
        for i, s in enumerate(seqs):
            emb[i, : s.shape[0]] = s
            att[i, : s.shape[0]] = 1
            lab[i, : s.shape[0]] = torch.tensor(labels[i], device=dev)
        extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items, device=dev)}
        loss = self.llm(inputs_embeds=emb, attention_mask=att, labels=lab, **extra).loss
        return loss if findings is None else (loss, aux)

    # ----------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, slices: torch.Tensor, prompt: list, max_new_tokens: int = 96,
                 zero_image: bool = False, return_logits: bool = False, stop_at_end: bool = True,
                 timings: dict | None = None):
        """Greedy decoding for one scan (``slices [K, C, H, W]``) until an end token; returns token ids (and
        step logits). ``prompt`` holds the ids of the prompt text (``layout.prompt_text(request)``).

        ``stop_at_end=False`` decodes exactly ``max_new_tokens`` (speed comparisons); ``timings``, when
        given, receives the seconds spent in the encoder, the fusion, the prefill and the decoding."""
        clock = _StageClock(timings)
        dev = slices.device
        pid = torch.tensor([prompt], device=dev)
        fused = self.image_prefix(slices[None], pid, torch.ones_like(pid), clock)
        if zero_image:
            fused = torch.zeros_like(fused)
        lay = self.layout
        with clock("prefill"):
            emb = torch.cat([self.token_embeddings(torch.tensor([lay.head()], dtype=torch.long, device=dev)),
                             fused, self.token_embeddings(torch.tensor([lay.tail(prompt)], device=dev))], dim=1)
            out = self.llm(inputs_embeds=emb, use_cache=True)

        def advance(token: int):
            nonlocal out
            out = self.llm(input_ids=torch.tensor([[token]], device=dev), past_key_values=out.past_key_values,
                           use_cache=True)
            return out.logits[0, -1].float()

        with clock("decode"):
            ids, logits = greedy_decode(out.logits[0, -1].float(), advance,
                                        lay.stop_ids() if stop_at_end else set(), max_new_tokens, return_logits)
        return (ids, torch.stack(logits)) if return_logits else ids

    # ---------------------------------------------------------------------------- persistence
    def save_image_modules(self, out_dir: str) -> None:
        """Encoder + fusion weights and their config beside an LLM checkpoint (atomic per file)."""
        state = {"encoder": self.encoder.state_dict(), "fusion": self.fusion.state_dict()}
        with atomic_file(os.path.join(out_dir, MODULES_FILE), "wb") as f:
            torch.save(state, f)
        with atomic_file(os.path.join(out_dir, MODULES_CONFIG)) as f:
            json.dump(self.image_cfg.to_dict(), f, indent=2)

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str, with_llm: bool = True) -> "SamfVLM":
        """Load a merged checkpoint: HF Phi-3 directory (with its tokenizer) + ``samf_modules.pt`` +
        ``samf_config.json``. Without ``with_llm`` only the image modules are loaded (``llm`` is None): what
        the ONNX export needs, without the LLM's gigabytes."""
        from .llm_folder import LLMTokenizer

        with open(os.path.join(ckpt_dir, MODULES_CONFIG)) as f:
            image_cfg = ImageConfig.from_dict(json.load(f))
        model = cls(image_cfg, load_phi3(ckpt_dir) if with_llm else None, LLMTokenizer(ckpt_dir).layout)
        state = torch.load(os.path.join(ckpt_dir, MODULES_FILE), map_location="cpu", weights_only=True)
        model.encoder.load_state_dict(state["encoder"])
        model.fusion.load_state_dict(state["fusion"])
        return model.eval()


# ------------------------------------------------------------------- generation (the reference pipeline)

def prompt_ids(tok, request: str) -> list:
    """The ids of a request's prompt text in the LLM's layout (what the fusion attends to)."""
    return tok.encode(tok.layout.prompt_text(request))


def mcq_sample(tok, q: dict) -> tuple:
    """(prompt ids, answer ids) of a multiple-choice question, as training teaches and evaluation asks it."""
    return prompt_ids(tok, mcq_request(q["question"], q["choices"])), tok.encode(mcq_answer(q["answer"], q["choices"]))


def generate_reports(vlm: SamfVLM, tok, examples: list, zero_image: bool = False,
                     progress: bool = True, max_new_tokens: int = 96) -> list:
    """Greedy reports from the PyTorch model (the reference pipeline) for each example."""
    prompt = prompt_ids(tok, REPORT_REQUESTS[0])
    out = []
    for ex in progress_bar(examples, desc="generate (torch)", disable=not progress):
        ids = vlm.generate(torch.from_numpy(ex.slices), prompt, max_new_tokens, zero_image=zero_image)
        out.append(tok.decode(ids))
    return out


@torch.no_grad()
def choose_mcq(vlm: SamfVLM, tok, examples: list, zero_image: bool = False) -> tuple:
    """The likeliest of each question's four answers by mean loss per token (how the runtime answers by default,
    ``ReportPipeline.answer``): ``(chosen answers as text, right letters)``."""
    answers, letters = [], []
    for ex in examples:
        x = torch.from_numpy(ex.slices)[None]
        for q in ex.questions:
            prompt = mcq_sample(tok, q)[0]
            options = [mcq_answer(letter, q["choices"]) for letter in LETTERS]
            nll = [float(vlm(x, [prompt], [tok.encode(o)], zero_image=zero_image)) for o in options]
            answers.append(options[int(np.argmin(nll))])
            letters.append(q["answer"])
    return answers, letters


def generate_mcq(vlm: SamfVLM, tok, examples: list, zero_image: bool = False) -> tuple:
    answers, letters = [], []
    for ex in examples:
        for q in ex.questions:
            ids = vlm.generate(torch.from_numpy(ex.slices), mcq_sample(tok, q)[0], 24, zero_image=zero_image)
            answers.append(tok.decode(ids))
            letters.append(q["answer"])
    return answers, letters
