"""A tiny random Llama for tests and benchmarks: built from a config, no downloads.

Shared by every test that needs a causal LM; the default shape is the one the issues
measure (vocab 512, hidden 256, 4 layers). Deterministic for a given seed.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(
    vocab: int = 512,
    hidden: int = 256,
    layers: int = 4,
    heads: int = 4,
    intermediate: int = 688,
    *,
    kv_heads: int | None = None,
    max_positions: int = 2048,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` in eval mode (eager attention, no dropout)."""
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()
