"""llama.cpp's tokenizer test vectors for Phi-3's vocabulary (vendored in tests/data/phi3_vocab, MIT), and the
package's Phi-3-mini-shaped folder writer under the names the tests use."""

import os

from samf.train.synthetic_llm import ADDED, PHI3_MINI, write_phi3_folder  # noqa: F401

VECTORS = os.path.join(os.path.dirname(__file__), "data", "phi3_vocab", "ggml-vocab-phi-3.gguf")
#: Phi-3-mini's width; tests choose the depth.
MINI = {k: v for k, v in PHI3_MINI.items() if k != "num_hidden_layers"}


def tokenizer_vectors() -> list:
    """llama.cpp's (text, expected ids) pairs for this vocabulary."""
    with open(VECTORS + ".inp", encoding="utf-8") as f:
        texts = f.read().split("\n__ggml_vocab_test__\n")
    with open(VECTORS + ".out", encoding="utf-8") as f:
        ids = [[int(t) for t in line.split()] for line in f.read().split("\n")]
    return list(zip(texts, ids))
