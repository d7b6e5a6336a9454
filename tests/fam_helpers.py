"""Shared by tests/test_train.py and tests/test_passkey.py: a tiny model folder with a real
(byte-level) tokenizer, built offline, so PassKey text and ``--fam`` checkpoints run end to end."""

from __future__ import annotations

from pathlib import Path


def byte_tokenizer():
    """A byte-level tokenizer of 256 tokens (one per byte) plus <eos>, as transformers' fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def tiny_folder(path: Path, *, seed: int = 0) -> Path:
    """A saved tiny Llama (vocab 257, context 1024) with the byte tokenizer next to it."""
    from endless.models.tiny import tiny_model

    # initializer_range 0.2: with the default 0.02 the LM head is too small for LoRA to move the logits
    model = tiny_model("llama", seed=seed, vocab_size=257, max_position_embeddings=1024, initializer_range=0.2)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return Path(path)
