"""Greedy decoding, one loop for the PyTorch reference (``SamfVLM.generate``) and the runtime
(``LlamaCppLLM.generate``): the fidelity contract says both stop on the same tokens at the same place."""

from __future__ import annotations


def greedy_decode(logits, advance, stop, max_new_tokens: int, keep_logits: bool = False) -> tuple:
    """From ``logits`` (scores for the next token, numpy or torch), take the argmax until it is in ``stop`` or
    ``max_new_tokens`` are taken; ``advance(token)`` feeds a token to the model and returns the next scores. It
    is not called after the last token, whose logits nothing reads. Returns (ids, every step's logits when
    ``keep_logits``)."""
    ids, kept = [], []
    for _ in range(max_new_tokens):
        if keep_logits:
            kept.append(logits)
        nxt = int(logits.argmax())
        if nxt in stop:
            break
        ids.append(nxt)
        if len(ids) == max_new_tokens:
            break
        logits = advance(nxt)
    return ids, kept
