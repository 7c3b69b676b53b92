"""A tiny real checkpoint directory (random init from a small config, saved by transformers) with the embedded
SmolLM2 tokenizer beside it, for tests that need a model given by path: it loads, quantizes and exports in seconds."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def tiny_checkpoint(d: Path, tokenizer_dir: Path, model_type: str = "llama") -> Path:
    """A `model_type` model (hidden 64, 2 layers) at d, whose vocabulary covers the SmolLM2 tokenizer copied there."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, vocab_size=49152, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    for f in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / f).exists():
            shutil.copy(Path(tokenizer_dir) / f, d / f)
    return d
