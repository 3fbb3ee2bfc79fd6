"""LoraEngine: many adapters resident in one base model, any mix of them per batch row.

The engine wraps every targeted ``nn.Linear`` of a Hugging Face model in place with a
``SlotLinear`` whose pools are allocated once, here, and never again: loading, swapping and
unloading adapters only copy into (or forget) a slot. A slot table maps keys such as
``"acme/search@v3"`` to slots. ``rows(slots_BL)`` says, for the next forwards, which slots each
batch row stacks (company, team, individual; -1 = none at that level).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from fleet.errors import CapacityError, NotFoundError, UnsupportedAdapterError, ValidationError
from fleet.lora._layer import Router, RowPlan, SlotLinear
from fleet.lora.adapter import DEFAULT_TARGET_MODULES, PEFT_PREFIX, AdapterWeights, check_fits, linear_modules


@dataclass
class _Entry:
    slot: int
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: list[str]
    modules: list[str]
    dtype: torch.dtype
    trainable: bool
    base_model_name_or_path: str | None


class LoraEngine:
    """Slot pools over a base model. See ``fleet.lora`` for the contract."""

    def __init__(
        self,
        model: nn.Module,
        *,
        target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
        max_slots: int,
        max_rank: int,
        dtype: torch.dtype | None = None,
    ) -> None:
        if max_slots < 1 or max_rank < 1:
            raise ValidationError(f"max_slots and max_rank must be ≥ 1 (got {max_slots}, {max_rank})")
        if any(isinstance(m, SlotLinear) for m in model.modules()):
            raise ValidationError(
                "this model is already wrapped by a LoraEngine; build the engine once per model"
            )
        targets = linear_modules(model, target_modules)
        if not targets:
            raise ValidationError(f"no nn.Linear module of the model is named one of {list(target_modules)}")
        self.model = model
        self.target_modules = sorted(set(target_modules))
        self.max_rank = max_rank
        self._max_slots = max_slots
        model.requires_grad_(False)  # the base is frozen; only pool slots ever train
        first = model.get_submodule(targets[0][0])
        device = first.weight.device
        # Adapters keep float32 slots (and so float32 gradients and optimizer state) under a
        # bfloat16/float16 base: a rank-r update is small next to W, and half precision would
        # round most of it away. A float32 or float64 base keeps its own dtype.
        half = first.weight.dtype in (torch.bfloat16, torch.float16)
        self.dtype = dtype or (torch.float32 if half else first.weight.dtype)
        n_pool = max_slots + 1  # pool index 0 is the all-zero adapter that "-1 = none" maps to
        self._scale_S = torch.zeros(n_pool, dtype=self.dtype, device=device)
        self._grad_mask_S11 = torch.zeros(n_pool, 1, 1, dtype=self.dtype, device=device)
        self._router = Router()
        self._layers: dict[str, SlotLinear] = {}
        for name, _, _ in targets:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            layer = SlotLinear(
                getattr(parent, attr),
                n_pool=n_pool,
                max_rank=max_rank,
                dtype=self.dtype,
                router=self._router,
                grad_mask_S11=self._grad_mask_S11,
            )
            setattr(parent, attr, layer)
            self._layers[name] = layer
        self._entries: dict[str, _Entry] = {}
        self._free: list[int] = list(range(max_slots - 1, -1, -1))  # pop() hands out the lowest slot
        self._occupied = torch.zeros(max_slots, dtype=torch.bool)
        # Bumped on every load/unload/trainability change; cached RowPlans compare it to know they are stale.
        self.version = 0

    # ------------------------------------------------------------------ slot table
    @property
    def capacity(self) -> int:
        return self._max_slots

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def device(self) -> torch.device:
        return self._scale_S.device

    @property
    def layers(self) -> dict[str, SlotLinear]:
        """Module path → wrapped layer (read-only view for optimisers and metrics)."""
        return dict(self._layers)

    def keys(self) -> list[str]:
        return list(self._entries)

    def slot(self, key: str) -> int | None:
        entry = self._entries.get(key)
        return None if entry is None else entry.slot

    def is_trainable(self, key: str) -> bool:
        return self._entry(key).trainable

    def rank(self, key: str) -> int:
        return self._entry(key).rank

    def adapted_modules(self, key: str) -> list[str]:
        """Module paths the adapter in ``key`` adapts (the other wrapped modules hold zeros for it)."""
        return list(self._entry(key).modules)

    def check(self, weights: AdapterWeights) -> None:
        """Raise what ``load`` would raise for this adapter (rank, modules, shapes), without loading it."""
        self._check(weights)

    def load(self, key: str, weights: AdapterWeights, *, trainable: bool = False) -> int:
        """Copy an adapter into a free slot (or over the slot ``key`` already holds) and return the slot."""
        if not isinstance(key, str) or not key:
            raise ValidationError("an adapter key must be a non-empty string such as 'acme/search@v3'")
        modules = self._check(weights)
        entry = self._entries.get(key)
        if entry is None:
            if not self._free:
                raise CapacityError(
                    f"all {self._max_slots} adapter slots are in use; unload one (or build the engine with "
                    f"a larger max_slots) before loading {key!r}"
                )
            slot = self._free.pop()
        else:
            slot = entry.slot
        pool_index = slot + 1
        with torch.no_grad():  # one context for all layers: entering it per layer costs as much as the copies
            for name, layer in self._layers.items():
                if name in modules:
                    layer.write(pool_index, *modules[name])
                else:
                    layer.clear(pool_index)
            self._scale_S[pool_index] = weights.scale
        first = next(iter(modules.values()))[0]
        self._entries[key] = _Entry(
            slot=slot,
            rank=weights.rank,
            alpha=weights.alpha,
            use_rslora=weights.use_rslora,
            target_modules=list(weights.target_modules),
            modules=sorted(modules),
            dtype=first.dtype,
            trainable=False,
            base_model_name_or_path=weights.base_model_name_or_path,
        )
        self._occupied[slot] = True
        self.set_trainable(key, trainable)
        return slot

    def unload(self, key: str) -> None:
        entry = self._entry(key)
        self.set_trainable(key, False)
        # A zero scale makes any stale reference to the slot compute the base output, never another
        # adapter's; the weights themselves are overwritten by the next load.
        self._scale_S[entry.slot + 1] = 0.0
        self._occupied[entry.slot] = False
        del self._entries[key]
        self._free.append(entry.slot)
        self.version += 1

    def set_trainable(self, key: str, trainable: bool) -> None:
        entry = self._entry(key)
        entry.trainable = bool(trainable)
        self._grad_mask_S11[entry.slot + 1] = 1.0 if trainable else 0.0
        any_trainable = any(e.trainable for e in self._entries.values())
        for layer in self._layers.values():
            layer.At_SDR.requires_grad_(any_trainable)
            layer.Bt_SRO.requires_grad_(any_trainable)
        self.version += 1

    def export(self, key: str) -> AdapterWeights:
        """The adapter in ``key``'s slot now (as loaded, or as trained since), in its own rank and dtype."""
        entry = self._entry(key)
        tensors: dict[str, torch.Tensor] = {}
        for name in entry.modules:
            A, B = self._layers[name].read(entry.slot + 1, entry.rank)
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.to("cpu", entry.dtype)
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.to("cpu", entry.dtype)
        return AdapterWeights(
            entry.rank,
            entry.alpha,
            entry.use_rslora,
            list(entry.target_modules),
            tensors,
            entry.base_model_name_or_path,
        )

    # ------------------------------------------------------------------ batches
    def plan(self, slots_BL: torch.Tensor | Sequence[Sequence[int]] | Sequence[int]) -> RowPlan:
        """Validate a ``[B, L]`` slot table and precompute what every layer needs for it."""
        pools_on = next(iter(self._layers.values())).At_SDR.device
        if pools_on != self.device:
            raise ValidationError(
                f"the model moved to {pools_on} after the engine was built on {self.device}; "
                "move the model first, then build the LoraEngine"
            )
        s_BL = torch.as_tensor(slots_BL, dtype=torch.long).to("cpu")
        if s_BL.dim() == 1:
            s_BL = s_BL[:, None]
        if s_BL.dim() != 2 or s_BL.shape[0] == 0:
            raise ValidationError(
                f"slots must be a [rows, levels] table of slot numbers, got shape {tuple(s_BL.shape)}"
            )
        bad = (s_BL < -1) | (s_BL >= self._max_slots)
        if bad.any():
            raise ValidationError(
                f"slot {int(s_BL[bad][0])} is out of range: slots are 0..{self._max_slots - 1}, or -1 for none"
            )
        used = s_BL[s_BL >= 0]
        empty = used[~self._occupied[used]]
        if empty.numel():
            raise ValidationError(
                f"slot {int(empty[0])} holds no adapter; load one before using it in a batch"
            )
        s_BL = s_BL[:, (s_BL >= 0).any(0)]
        idx = None if s_BL.shape[1] == 0 else (s_BL + 1).to(self.device)
        return RowPlan(len(s_BL) if idx is None else idx.shape[0], idx, self._scale_S, self.max_rank)

    @contextmanager
    def rows(self, slots_BL: torch.Tensor | Sequence | RowPlan) -> Iterator[RowPlan]:
        """Inside, every forward of ``model`` adds row b's stacked adapters to its base output.

        ``slots_BL``: ``[B, L]`` slots (L ≤ 3 levels, -1 = none), or a plan from ``plan()`` to reuse.
        Outside any ``rows()`` the model computes the base output. With gradient checkpointing, run
        ``backward()`` inside the context too: the recomputed forward needs the same rows.
        """
        plan = slots_BL if isinstance(slots_BL, RowPlan) else self.plan(slots_BL)
        previous = self._router.plan
        self._router.plan = plan
        try:
            yield plan
        finally:
            self._router.plan = previous

    # ------------------------------------------------------------------ internals
    def _entry(self, key: str) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            raise NotFoundError(f"adapter {key!r} is not loaded in this engine")
        return entry

    def _check(self, weights: AdapterWeights) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The adapter's (A, B) per wrapped module, after checking it fits this base and these pools."""
        if weights.rank > self.max_rank:
            raise CapacityError(
                f"adapter rank {weights.rank} exceeds this engine's max_rank {self.max_rank}; "
                "build the engine with a larger max_rank or use a lower-rank adapter"
            )
        shapes = {name: (layer.d_in, layer.d_out) for name, layer in self._layers.items()}
        return check_fits(weights, shapes, unknown=self._foreign_module)

    def _foreign_module(self, name: str) -> UnsupportedAdapterError:
        try:
            module = self.model.get_submodule(name)
        except AttributeError:
            return UnsupportedAdapterError(
                f"unsupported adapter: module {name} does not exist in the base model; "
                "the adapter belongs to a different base model"
            )
        if isinstance(module, nn.Linear):
            return UnsupportedAdapterError(
                f"unsupported adapter: it adapts {name}, which this engine does not wrap; add "
                f"{name.rsplit('.', 1)[-1]!r} to the engine's target_modules"
            )
        return UnsupportedAdapterError(
            f"unsupported adapter: target {name} is a {type(module).__name__}, not nn.Linear; "
            "fleet adapts nn.Linear modules only"
        )
