"""A process's handles on one fleet: config, registry, store, tokenizer — opened lazily."""

from __future__ import annotations

from functools import cached_property

from fleet.config import FleetConfig
from fleet.data.ingest import Ingestor, tokenizer_counter
from fleet.registry import Registry
from fleet.store import AdapterStore, open_store


class Fleet:
    """What commands and workers share: built from a (picklable) config, opened on first use."""

    def __init__(self, cfg: FleetConfig) -> None:
        self.cfg = cfg

    @cached_property
    def registry(self) -> Registry:
        self.cfg.data_path.mkdir(parents=True, exist_ok=True)
        return Registry.open(self.cfg)

    @cached_property
    def store(self) -> AdapterStore:
        return open_store(self.cfg)

    @cached_property
    def tokenizer(self):
        from fleet.base import ensure_base
        from fleet.base.tokenizer import load_tokenizer

        return load_tokenizer(ensure_base(self.cfg))

    @property
    def base_name(self) -> str:
        return self.cfg.base.name

    def ingestor(self) -> Ingestor:
        from fleet.base.tokenizer import chat_text

        return Ingestor(
            self.registry,
            tokenizer_counter(self.tokenizer),
            max_chars=self.cfg.data.max_text_chars,
            repeated_min=self.cfg.data.repeated_query_min_members,
            render_chat=lambda messages: chat_text(self.tokenizer, messages),
        )

    def add_tenant(self, tenant_id: str, shares: float = 1.0, budget: float | None = None):
        tier = self.cfg.tier(_tier_of(tenant_id))
        rank = tier.schedule.rank or self.cfg.lora.rank
        return self.registry.add_tenant(
            tenant_id,
            base_model=self.base_name,
            rank=rank,
            alpha=self.cfg.lora.alpha,
            shares=shares,
            budget_gpu_s_per_day=budget,
        )

    def close(self) -> None:
        if "registry" in self.__dict__:
            self.registry.close()


def _tier_of(tenant_id: str) -> str:
    from fleet.types import level_of

    return level_of(tenant_id).value
