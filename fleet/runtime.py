"""An engine with stacks from the registry in it: shared by ``fleet generate``, drift scoring
and evaluation (serving keeps its own LRU cache on top of the same pieces)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fleet.config import FleetConfig
from fleet.registry import Stack, StackEntry


def load_engine(cfg: FleetConfig, *, max_slots: int, max_rank: int | None = None, device: str | None = None):
    """The base model (built if it is the default and missing) wrapped by a LoRA engine."""
    from fleet.base import ensure_base, load_base, resolve_device, resolve_dtype
    from fleet.lora import LoraEngine

    dev = resolve_device(device or cfg.base.device)
    model, tokenizer = load_base(ensure_base(cfg), device=dev, dtype=resolve_dtype(cfg.base.dtype, dev))
    engine = LoraEngine(
        model,
        target_modules=cfg.lora.target_modules,
        max_slots=max(1, max_slots),
        max_rank=max_rank or max(64, cfg.lora.rank),
    )
    return engine, tokenizer


class StackSlots:
    """Loads the adapters of registry stacks into an engine, each version once, sha256-verified."""

    def __init__(self, engine, store) -> None:
        self.engine = engine
        self.store = store

    def load(self, entry: StackEntry) -> int:
        from fleet.lora import AdapterWeights

        slot = self.engine.slot(entry.key)
        if slot is None:
            files = self.store.read_version(entry.uri, entry.sha256)
            slot = self.engine.load(entry.key, AdapterWeights.from_bytes(files.config, files.weights))
        return slot

    def row(self, stack: Stack) -> list[int]:
        """The ``[company, team, individual]`` slot row of a stack (-1 where a level has none)."""
        slots = [self.load(e) for e in stack.entries]
        return slots + [-1] * (3 - len(slots))

    def rows(self, stacks: Sequence[Stack]) -> torch.Tensor:
        return torch.tensor([self.row(s) for s in stacks], dtype=torch.long)
