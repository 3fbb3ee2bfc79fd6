"""Sample adapters for trying the serving path without training: random LoRAs, published like trained ones.

``fleet serve`` answers with whatever the registry holds; before any training run has published
a version, every model is served by the bare base. These helpers publish adapters whose A is
PEFT's fresh initialisation and whose B is random (a fresh adapter has B = 0 and would change
nothing), so that each model answers differently. Used by the serving tests and benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fleet.lora import AdapterWeights
from fleet.registry import PublishRequest, Registry, VersionRecord
from fleet.store import AdapterStore
from fleet.types import AdapterState


def random_adapter(
    model: torch.nn.Module,
    *,
    rank: int,
    alpha: float,
    target_modules: Sequence[str],
    seed: int,
    std: float = 0.05,
) -> AdapterWeights:
    """PEFT's initial A with a random B (``std``), deterministic for a seed."""
    fresh = AdapterWeights.fresh(model, rank=rank, alpha=alpha, target_modules=target_modules, seed=seed)
    g = torch.Generator().manual_seed(1_000_003 + seed)
    tensors = {
        k: (torch.randn(v.shape, generator=g) * std if ".lora_B." in k else v)
        for k, v in fresh.tensors.items()
    }
    return AdapterWeights(rank, alpha, False, list(target_modules), tensors)


def publish_adapters(
    registry: Registry,
    store: AdapterStore,
    adapters: dict[str, AdapterWeights],
    *,
    base_model: str,
    state: AdapterState = AdapterState.ACTIVE,
) -> list[VersionRecord]:
    """Stage every adapter and publish them as new versions in one registry transaction."""
    requests: list[PublishRequest] = []
    for model_id, weights in adapters.items():
        config, data = weights.to_bytes(base_model)
        staged = store.stage(model_id, config, data)
        requests.append(
            PublishRequest(
                model_id=model_id,
                staged=staged,
                rank=weights.rank,
                alpha=weights.alpha,
                base_model=base_model,
                state=state,
                reason="sample adapter",
            )
        )
    return registry.publish_versions(store, requests)


def publish_random(
    registry: Registry,
    store: AdapterStore,
    model: torch.nn.Module,
    model_ids: Sequence[str],
    *,
    base_model: str,
    rank: int,
    alpha: float,
    target_modules: Sequence[str],
    seed: int = 0,
    std: float = 0.05,
    state: AdapterState = AdapterState.ACTIVE,
) -> dict[str, Any]:
    """Publish one random adapter per model (seeded by position); returns model id → weights."""
    adapters = {
        m: random_adapter(
            model, rank=rank, alpha=alpha, target_modules=target_modules, seed=seed + i, std=std
        )
        for i, m in enumerate(model_ids)
    }
    publish_adapters(registry, store, adapters, base_model=base_model, state=state)
    return adapters
