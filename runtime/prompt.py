"""The conversation template, written once and shared by training and the runtime.

Sequence the LLM sees, in training and in production alike::

    [BOS] [image embeddings × N] tokens(prompt) | tokens(answer) [EOS]

The prompt is plain text (no special tokens inside it), so SentencePiece in training and llama.cpp's
tokenizer in the runtime cut it into the same ids. The loss covers the answer and EOS only.
"""

from __future__ import annotations

import re

#: Report requests; training samples among them, the runtime uses the first unless told otherwise.
REPORT_REQUESTS = (
    "Write the findings of this chest CT.",
    "Describe the findings in this chest CT scan.",
    "Generate a radiology report for this CT volume.",
    "What are the findings of this scan?",
)

LETTERS = "ABCD"


def format_prompt(request: str) -> str:
    """The text between the image prefix and the answer."""
    return f"Question: {request.strip()} Answer:"


def report_prompt(index: int = 0) -> str:
    return format_prompt(REPORT_REQUESTS[index])


def mcq_prompt(question: str, choices) -> str:
    """A multiple-choice prompt: the question, then ``A. … B. … C. … D. …``."""
    opts = " ".join(f"{LETTERS[i]}. {c}." for i, c in enumerate(choices))
    return format_prompt(f"{question.strip()} Choices: {opts}")


def mcq_answer(letter: str, choices) -> str:
    """The training target for a multiple-choice question, M3D style: ``"C. answer text."``."""
    return f"{letter}. {choices[LETTERS.index(letter)]}."


def mcq_choice_of(generated: str) -> str | None:
    """The letter a generated answer picked (M3D scores ``"X."`` in the output), or None."""
    m = re.search(r"\b([ABCD])\.", generated)
    return m.group(1) if m else None
