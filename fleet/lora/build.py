"""One way to build a LoRA engine over the configured base, and to fill it from registry stacks.

Serving replicas, training workers, drift scoring, ``fleet eval``, ``fleet generate`` and the
demo all call ``build_engine``; its pools hold ranks up to ``engine_rank(cfg, ranks)``: the
largest rank the config can produce (``lora.rank``, every tier's ``schedule.rank``) or the
largest of the adapters the caller is about to load, whichever is larger.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from fleet.config import FleetConfig
from fleet.registry import Stack, StackEntry


def engine_rank(cfg: FleetConfig, ranks: Iterable[int] = ()) -> int:
    """The rank an engine's pools are sized to (the one rule; zero padding keeps it exact)."""
    configured = [cfg.lora.rank] + [t.schedule.rank for t in cfg.tiers.values() if t.schedule.rank]
    return max([*configured, *(int(r) for r in ranks)])


def build_engine(
    cfg: FleetConfig,
    *,
    slots: int,
    ranks: Iterable[int] = (),
    device: str | torch.device | None = None,
    path: str | Path | None = None,
) -> tuple[Any, Any]:
    """``(engine, tokenizer)``: the base at ``path`` (default: ``base.path``, built first when it
    is fleet's tiny default and missing), frozen on ``device`` (default ``base.device``) in the
    configured dtype, wrapped by a ``LoraEngine`` with ``slots`` adapter slots."""
    from fleet.base import ensure_base, load_base, resolve_device, resolve_dtype
    from fleet.lora.engine import LoraEngine

    dev = resolve_device(device or cfg.base.device) if not isinstance(device, torch.device) else device
    model, tokenizer = load_base(
        ensure_base(cfg) if path is None else path, device=dev, dtype=resolve_dtype(cfg.base.dtype, dev)
    )
    engine = LoraEngine(
        model,
        target_modules=cfg.lora.target_modules,
        max_slots=max(1, slots),
        max_rank=engine_rank(cfg, ranks),
    )
    return engine, tokenizer


class StackSlots:
    """Loads the adapters of registry stacks into an engine, each version once, sha256-verified."""

    def __init__(self, engine, store) -> None:
        self.engine = engine
        self.store = store

    def load(self, entry: StackEntry) -> int:
        from fleet.lora.adapter import AdapterWeights

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
