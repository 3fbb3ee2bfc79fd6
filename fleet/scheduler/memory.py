"""The memory model that sizes packs: how many members fit on a slice next to one base.

A pack is one training process on one slice. It holds the frozen base once and, per
member, the member's trainable adapter with its gradient and AdamW state, the frozen
adapters of its ancestors (a team model trains on top of its company's adapter, an
individual on top of both), and the activations of the rows it contributes to each step.

    bytes(pack) = PROCESS_OVERHEAD + params·BASE_BYTES_PER_PARAM
                + Σ_members [ rank·P_r·(TRAINED_ADAPTER_BYTES_PER_PARAM
                                        + ancestors·FROZEN_ADAPTER_BYTES_PER_PARAM)
                              + rows·ctx·(hidden·layers·ACTIVATION_BYTES + vocab·LOGIT_BYTES) ]
                ≤ slice memory · (1 − MEMORY_HEADROOM)

with P_r = Σ over adapted linear layers of (d_in + d_out): the adapter parameters per unit
of rank. Every constant is a deliberate, documented estimate; a pack sized by it leaves
the allocator its headroom.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fleet.errors import ConfigError

BASE_BYTES_PER_PARAM = 2
"""The base is frozen and held in bf16/fp16."""
TRAINED_ADAPTER_BYTES_PER_PARAM = 16
"""fp32 weight (4) + fp32 gradient (4) + AdamW first and second moments (2 × 4)."""
FROZEN_ADAPTER_BYTES_PER_PARAM = 4
"""An ancestor's adapter is frozen in the forward pass: fp32 weights only."""
ACTIVATION_BYTES_PER_TOKEN_HIDDEN_LAYER = 34
"""Stored activations per token, per hidden unit, per layer in 16-bit training without
recomputation (Korthikanti et al., 2022, "Reducing Activation Recomputation in Large
Transformer Models": 34·s·b·h per layer; the 5·a·s²·b attention-score term is dropped
because fused attention does not store the score matrix). The backward pass runs through
the frozen base too, so LoRA training keeps these."""
LOGIT_BYTES_PER_TOKEN_VOCAB = 8
"""fp32 logits and their gradient for the loss (4 + 4 bytes per vocabulary entry)."""
PROCESS_OVERHEAD_BYTES = 768 * 2**20
"""CUDA context, cuBLAS workspace and allocator bookkeeping of one training process."""
MEMORY_HEADROOM = 0.10
"""Fraction of a slice's memory left unplanned against fragmentation."""

ANCESTORS_BY_TIER = np.array([0, 1, 2], dtype=np.int64)
"""Frozen ancestor adapters loaded with a member: company 0, team 1, individual 2."""

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class BaseSpec:
    """The footprint of one base model, as the memory model needs it."""

    name: str
    params: float
    """Parameter count of the base."""
    hidden: int
    layers: int
    vocab: int
    lora_params_per_rank: int
    """Σ over adapted linear layers of (d_in + d_out): adapter parameters per unit of rank."""

    def __post_init__(self) -> None:
        if min(self.params, self.hidden, self.layers, self.vocab, self.lora_params_per_rank) <= 0:
            raise ConfigError(
                f"base {self.name!r}: params, hidden, layers, vocab and adapter size must be positive"
            )

    @property
    def base_bytes(self) -> float:
        return self.params * BASE_BYTES_PER_PARAM

    @classmethod
    def llama(
        cls,
        name: str,
        *,
        hidden: int,
        intermediate: int,
        layers: int,
        heads: int,
        kv_heads: int,
        vocab: int,
        tied_embeddings: bool = False,
        targets: Sequence[str] = DEFAULT_TARGETS,
    ) -> BaseSpec:
        """The footprint of a Llama-architecture decoder."""
        kv = hidden // heads * kv_heads
        shapes = {
            "q_proj": (hidden, hidden),
            "k_proj": (hidden, kv),
            "v_proj": (hidden, kv),
            "o_proj": (hidden, hidden),
            "gate_proj": (hidden, intermediate),
            "up_proj": (hidden, intermediate),
            "down_proj": (intermediate, hidden),
        }
        unknown = sorted(set(targets) - set(shapes))
        if unknown:
            raise ConfigError(
                f"base {name!r}: unknown adapter target module(s) {unknown}; known: {sorted(shapes)}"
            )
        per_layer = sum(a * b for a, b in shapes.values()) + 2 * hidden
        params = layers * per_layer + vocab * hidden * (1 if tied_embeddings else 2) + hidden
        per_rank = layers * sum(sum(shapes[t]) for t in targets)
        return cls(name, float(params), hidden, layers, vocab, int(per_rank))

    @classmethod
    def from_hf_config(
        cls, name: str, config: Mapping[str, object], targets: Sequence[str] = DEFAULT_TARGETS
    ) -> BaseSpec:
        """From a Hugging Face ``config.json`` of a Llama-family model."""
        try:
            hidden = int(config["hidden_size"])  # type: ignore[arg-type]
            heads = int(config["num_attention_heads"])  # type: ignore[arg-type]
            return cls.llama(
                name,
                hidden=hidden,
                intermediate=int(config["intermediate_size"]),  # type: ignore[arg-type]
                layers=int(config["num_hidden_layers"]),  # type: ignore[arg-type]
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads", heads)),  # type: ignore[arg-type]
                vocab=int(config["vocab_size"]),  # type: ignore[arg-type]
                tied_embeddings=bool(config.get("tie_word_embeddings", False)),
                targets=targets,
            )
        except KeyError as exc:
            raise ConfigError(
                f"base {name!r}: config.json lacks {exc.args[0]!r}; is it a Llama-family model?"
            ) from None

    @classmethod
    def preset(cls, kind: str, name: str | None = None) -> BaseSpec:
        """Known shapes: ``tiny`` (fleet's offline base), ``1b`` (Llama-3.2-1B), ``8b`` (Llama-3.1-8B)."""
        shapes = {
            "tiny": dict(
                hidden=256, intermediate=688, layers=4, heads=4, kv_heads=4, vocab=260, tied_embeddings=False
            ),
            "1b": dict(
                hidden=2048,
                intermediate=8192,
                layers=16,
                heads=32,
                kv_heads=8,
                vocab=128256,
                tied_embeddings=True,
            ),
            "8b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256),
        }
        if kind not in shapes:
            raise ConfigError(f"unknown base preset {kind!r}; presets: {sorted(shapes)}")
        return cls.llama(name or kind, **shapes[kind])  # type: ignore[arg-type]


def member_bytes(
    spec: BaseSpec, rank: np.ndarray, tier: np.ndarray, rows: int, context_length: int
) -> np.ndarray:
    """Bytes one pack member needs next to the base (vectorized over members)."""
    adapter = rank.astype(np.float64) * spec.lora_params_per_rank
    states = TRAINED_ADAPTER_BYTES_PER_PARAM + ANCESTORS_BY_TIER[tier] * FROZEN_ADAPTER_BYTES_PER_PARAM
    tokens = rows * context_length
    activations = tokens * (
        spec.hidden * spec.layers * ACTIVATION_BYTES_PER_TOKEN_HIDDEN_LAYER
        + spec.vocab * LOGIT_BYTES_PER_TOKEN_VOCAB
    )
    return adapter * states + activations


def usable_bytes(memory_gb: np.ndarray) -> np.ndarray:
    """Memory a pack may plan on a slice of ``memory_gb`` (vendor GB)."""
    return np.asarray(memory_gb, dtype=np.float64) * 1e9 * (1.0 - MEMORY_HEADROOM) - PROCESS_OVERHEAD_BYTES


def members_fit(
    memory_gb: np.ndarray, spec: BaseSpec, bytes_per_member: float, max_members: int
) -> np.ndarray:
    """How many members of ``bytes_per_member`` fit next to ``spec`` on each slice (0: the base does not fit)."""
    room = usable_bytes(memory_gb) - spec.base_bytes
    fit = np.floor(np.maximum(room, 0.0) / max(bytes_per_member, 1.0))
    return np.minimum(fit, max_members).astype(np.int64)
