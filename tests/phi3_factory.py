"""Small random Phi-3 checkpoints saved as Hugging Face folders, in the dtype a test asks for."""

import os


def small_phi3(out_dir, dtype: str = "float32", hidden: int = 128, intermediate: int = 256, layers: int = 2,
               vocab: int = 512, seed: int = 0) -> str:
    """A random ``Phi3ForCausalLM`` saved in ``dtype`` (safetensors + config.json) with a SentencePiece
    tokenizer beside it as a Hugging Face tokenizer folder, as the GGUF converter and ``load_phi3`` expect."""
    import numpy as np
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    from samf.runtime.tools.phantom import sample_findings, write_report
    from samf.train.llm_folder import save_sentencepiece_folder
    from samf.train.run_files import TOKENIZER_MODEL
    from samf.train.tokenizer import BOS, EOS, PAD, train_tokenizer

    torch.manual_seed(seed)
    cfg = Phi3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                     original_max_position_embeddings=512, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                     tie_word_embeddings=False, sliding_window=None)
    Phi3ForCausalLM(cfg).to(getattr(torch, dtype)).save_pretrained(str(out_dir))
    rng = np.random.default_rng(seed)
    train_tokenizer([write_report(sample_findings(rng), rng) for _ in range(100)],
                    os.path.join(str(out_dir), TOKENIZER_MODEL), 400)
    save_sentencepiece_folder(os.path.join(str(out_dir), TOKENIZER_MODEL), str(out_dir))
    return str(out_dir)
