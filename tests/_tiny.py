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


def random_lora(
    model: torch.nn.Module,
    *,
    rank: int,
    alpha: float | None = None,
    use_rslora: bool = False,
    seed: int = 0,
    std: float = 0.05,
    target_modules: tuple[str, ...] | None = None,
):
    """A PEFT-format LoRA with random A and B (a freshly initialised one has B = 0 and changes nothing)."""
    from fleet.lora import DEFAULT_TARGET_MODULES, AdapterWeights

    fresh = AdapterWeights.fresh(
        model,
        rank=rank,
        alpha=float(alpha if alpha is not None else 2 * rank),
        target_modules=target_modules or DEFAULT_TARGET_MODULES,
        use_rslora=use_rslora,
        seed=seed,
    )
    g = torch.Generator().manual_seed(10_000 + seed)
    tensors = {k: torch.randn(v.shape, generator=g) * std for k, v in fresh.tensors.items()}
    return AdapterWeights(rank, fresh.alpha, use_rslora, fresh.target_modules, tensors)


class CharTokenizer:
    """A byte-per-token stand-in tokenizer (ids 3.. map to printable characters), enough for stop strings."""

    eos_token_id = 2

    def encode(self, text: str) -> list[int]:
        return [3 + (ord(c) - 32) % 90 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(32 + (int(i) - 3) % 90) if int(i) >= 3 else "" for i in ids)


def one_thread():
    """Generator for an autouse fixture: tiny-model tests run single-threaded, then restore the setting.

    Tiny matmuls gain nothing from a second thread, and on a shared machine a 2-thread OpenMP
    region stalls whenever another process holds the other core (milliseconds per op).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
