"""Greedy decoding, one rule for the PyTorch reference (``SamfVLM.generate``) and the runtime
(``LlamaCppLLM.generate`` and ``generate_many``): the fidelity contract says they all stop on the same tokens at
the same place."""

from __future__ import annotations


class Greedy:
    """One sequence's greedy choice, step by step: :meth:`take` the scores for the next token, get the token to
    feed back, or None once the sequence has ended (a stop token, which is not kept, or ``max_new_tokens``)."""

    def __init__(self, stop, max_new_tokens: int):
        self.stop, self.max_new_tokens = stop, max_new_tokens
        self.ids: list = []
        self.done = max_new_tokens <= 0

    def take(self, logits):
        if self.done:
            return None
        nxt = int(logits.argmax())
        if nxt in self.stop:
            self.done = True
            return None
        self.ids.append(nxt)
        if len(self.ids) == self.max_new_tokens:
            self.done = True  # nothing reads the logits after the last token: it is not fed back
            return None
        return nxt


def greedy_decode(logits, advance, stop, max_new_tokens: int, keep_logits: bool = False) -> tuple:
    """From ``logits`` (scores for the next token, numpy or torch), take the argmax until it is in ``stop`` or
    ``max_new_tokens`` are taken; ``advance(token)`` feeds a token to the model and returns the next scores. It
    is not called after the last token, whose logits nothing reads. Returns (ids, every step's logits when
    ``keep_logits``)."""
    greedy, kept = Greedy(stop, max_new_tokens), []
    while not greedy.done:
        if keep_logits:
            kept.append(logits)
        token = greedy.take(logits)
        if token is None:
            break
        logits = advance(token)
    return greedy.ids, kept
