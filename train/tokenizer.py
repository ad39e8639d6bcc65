"""A SentencePiece BPE tokenizer trained on the report corpus, for the tiny Phi-3.

BPE (not unigram) because llama.cpp's SPM tokenizer reproduces BPE models exactly; identity
normalisation and digit splitting keep the two tokenizers in step (a test checks it over the corpus).
Ids: 0 <unk>, 1 <s>, 2 </s>, 3 <pad>.
"""

from __future__ import annotations

import io

import sentencepiece as spm

from samf.runtime.atomic import atomic_file

UNK, BOS, EOS, PAD = 0, 1, 2, 3


def train_tokenizer(texts, out_path: str, vocab_size: int = 512) -> spm.SentencePieceProcessor:
    """Train on ``texts`` and write the model file to ``out_path`` atomically."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=buf, model_type="bpe",
        vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=1.0,
        normalization_rule_name="identity", split_digits=True, byte_fallback=True,
        unk_id=UNK, bos_id=BOS, eos_id=EOS, pad_id=PAD, num_threads=1, minloglevel=2,
        max_sentence_length=8192,
    )
    with atomic_file(out_path, "wb") as f:
        f.write(buf.getvalue())
    return load_tokenizer(out_path)


def load_tokenizer(path: str) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=path)
