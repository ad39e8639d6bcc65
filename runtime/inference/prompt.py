"""The sequence the LLM sees, written once and shared by training and the runtime.

In token ids, in training and in production alike::

    [BOS] before_image  [image embeddings × N]  ids(prompt text) after_prompt | ids(answer) answer_end

For Phi-3-mini (chat template ``<|user|>\\n…<|end|>\\n<|assistant|>\\n``) the image rows open the user turn:
``before_image`` is ``<|user|>``, the prompt text is the request itself, ``after_prompt`` is
``<|end|><|assistant|>`` and training teaches ``<|end|>`` after every answer, the token generation stops on.
An LLM without a chat template (the tiny test model) gets the plain layout: ``Question: … Answer:`` with no
scaffolding and EOS after the answer.

The scaffolding is stored as ids (:class:`PromptLayout`, from the LLM folder's own tokenizer at training time,
carried to the runtime in the bundle's manifest), so llama.cpp never has to re-tokenize special tokens the way
the Hugging Face tokenizer did. Only plain text (the request, the answer) is tokenized on both sides; a test
checks that both tokenizers agree on it. The loss covers the answer and ``answer_end`` only.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

#: Report requests; training samples among them, the runtime uses the first unless told otherwise.
REPORT_REQUESTS = (
    "Write the findings of this chest CT.",
    "Describe the findings in this chest CT scan.",
    "Generate a radiology report for this CT volume.",
    "What are the findings of this scan?",
)

LETTERS = "ABCD"

#: The prompt text of an LLM without a chat template.
PLAIN_FORMAT = "Question: {request} Answer:"


@dataclass(frozen=True)
class PromptLayout:
    """Where every part of a request sits, in the LLM's token ids (see the module docstring)."""

    answer_end: int                       # appended to every training answer; generation ends on it
    stop: tuple = ()                      # every id that ends generation (answer_end, EOS, other end tokens)
    bos: int | None = None                # the tokenizer's BOS, when it adds one
    before_image: tuple = ()              # ids between BOS and the image rows
    after_prompt: tuple = ()              # ids between the prompt text and the answer
    prompt_format: str = PLAIN_FORMAT     # the prompt text around a request
    pad: int = 0                          # padding id for batched training
    chat_template: bool = False           # whether the scaffolding came from the LLM's chat template
    notes: dict = field(default_factory=dict)  # the scaffolding as text, for people reading a manifest

    def prompt_text(self, request: str) -> str:
        return self.prompt_format.replace("{request}", request.strip())

    def head(self) -> list:
        """Ids before the image rows."""
        return ([self.bos] if self.bos is not None else []) + list(self.before_image)

    def tail(self, prompt_ids) -> list:
        """Ids after the image rows, up to where the answer starts."""
        return list(prompt_ids) + list(self.after_prompt)

    def stop_ids(self) -> set:
        return {self.answer_end, *self.stop}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PromptLayout":
        d = dict(d)
        for k in ("stop", "before_image", "after_prompt"):
            d[k] = tuple(int(i) for i in d.get(k, ()))
        return cls(**d)


def format_prompt(request: str) -> str:
    """The plain layout's prompt text (an LLM without a chat template)."""
    return PLAIN_FORMAT.replace("{request}", request.strip())


def mcq_request(question: str, choices) -> str:
    """A multiple-choice request: the question, then ``Choices: A. … B. … C. … D. …``."""
    opts = " ".join(f"{LETTERS[i]}. {c}." for i, c in enumerate(choices))
    return f"{question.strip()} Choices: {opts}"


def mcq_answer(letter: str, choices) -> str:
    """The training target for a multiple-choice question, M3D style: ``"C. answer text."``."""
    return f"{letter}. {choices[LETTERS.index(letter)]}."


def mcq_choice_of(generated: str) -> str | None:
    """The letter a generated answer picked (M3D scores ``"X."`` in the output), or None."""
    m = re.search(r"\b([ABCD])\.", generated)
    return m.group(1) if m else None
