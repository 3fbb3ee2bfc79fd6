"""Drift metrics, pure torch: how far a batch of models is from the base and from its parent.

**Weight space** (cheap screen, every version). Inputs map a module path (as in
``model.named_modules()``) to that module's :class:`LoraBatch` for N models, or to a stack of
levels (company + team + individual) whose deltas add up::

    deltas = {"model.layers.0.self_attn.q_proj": LoraBatch.of(A_NRI, B_NOR, scale_N), ...}
    wm = weight_metrics(deltas, base_norms)       # per module [N, M] + per model [N]
    rm = relative_metrics(child, parent, base_norms)
    for wm in weight_metrics_chunks(chunks, base_norms, workers=2): ...   # a whole fleet

Per module: ‖ΔW‖_F, σ_max, stable rank, ‖ΔW‖_F/‖W₀‖_F; against the parent: inner product, cosine,
distance. Per model they aggregate as the norm of all modules' deltas taken as one vector (root of
the sum of squares), so ``rel_fro`` is ``‖ΔW‖_F / ‖W₀‖_F`` over every adapted module, the quantity
``DriftCaps.max_rel_weight_norm`` caps. The formulas and their cost are in ``_weights.py``.

**Function space** (the decision metric): KL(ref ‖ model), total variation, top-1 agreement and
NLL/ΔNLL from log-probs, exact against a full reference or bounded through the base's
:class:`TopKCache` (the bound is derived in ``_logits.py``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from fleet.divergence._logits import (
    Bounds,
    FunctionMetrics,
    TopKCache,
    forward_kl,
    forward_kl_topk,
    function_metrics,
    log_probs,
    masked_mean,
    nll_shift,
    token_nll,
    top1_agreement,
    top1_agreement_topk,
    total_variation,
    total_variation_topk,
)
from fleet.divergence._weights import (
    SPECTRAL_RTOL,
    Delta,
    LoraBatch,
    ModuleStats,
    PairStats,
    base_module_norms,
    cached_base_norms,
    check_uniform_n,
    module_stats,
    pair_stats,
    rss,
    safe_div,
    spectrum,
    stack_grams,
)
from fleet.errors import ValidationError

__all__ = [
    "SPECTRAL_RTOL", "Bounds", "Delta", "FunctionMetrics", "LoraBatch", "ModuleStats", "PairStats",
    "RelativeMetrics", "TopKCache", "WeightMetrics", "base_module_norms", "cached_base_norms",
    "forward_kl", "forward_kl_topk", "function_metrics", "log_probs", "lora_batches", "masked_mean",
    "module_stats", "nll_shift", "pair_stats", "relative_metrics", "spectrum", "stack_grams",
    "token_nll", "top1_agreement", "top1_agreement_topk", "total_variation", "total_variation_topk",
    "weight_metrics", "weight_metrics_chunks",
]  # fmt: skip


def _base_vector(
    modules: Sequence[str], base_norms: Mapping[str, float] | None, device: torch.device
) -> Tensor | None:
    if base_norms is None:
        return None
    missing = [m for m in modules if m not in base_norms]
    if missing:
        raise ValidationError(
            f"no base norm for module(s) {missing[:3]}; compute base_module_norms for every target"
        )
    return torch.tensor([float(base_norms[m]) for m in modules], dtype=torch.float64, device=device)


@dataclass(frozen=True)
class WeightMetrics:
    """Weight-space drift of N models from the base: per module ``[N, M]`` and per model ``[N]``."""

    modules: tuple[str, ...]
    fro_NM: Tensor
    """‖ΔW‖_F per module."""
    spectral_NM: Tensor
    """σ_max(ΔW) per module."""
    stable_rank_NM: Tensor
    """‖ΔW‖_F² / σ_max² per module (0 for a zero delta)."""
    base_fro_M: Tensor | None
    """‖W₀‖_F per module (None when no base norms were given)."""

    @property
    def rel_fro_NM(self) -> Tensor:
        return safe_div(self.fro_NM, self._base())

    @property
    def fro_N(self) -> Tensor:
        """‖ΔW‖_F over all adapted modules (root of the sum of squares)."""
        return rss(self.fro_NM)

    @property
    def rel_fro_N(self) -> Tensor:
        """‖ΔW‖_F / ‖W₀‖_F over all adapted modules: what ``max_rel_weight_norm`` caps."""
        return safe_div(self.fro_N, rss(self._base()[None, :]).expand_as(self.fro_N))

    @property
    def max_rel_fro_N(self) -> Tensor:
        """The largest per-module relative norm (which module moved most, relative to its size)."""
        return self.rel_fro_NM.amax(-1)

    @property
    def spectral_N(self) -> Tensor:
        """The largest σ_max over modules."""
        return self.spectral_NM.amax(-1)

    def _base(self) -> Tensor:
        if self.base_fro_M is None:
            raise ValidationError("relative norms need base norms: pass base_norms=base_module_norms(...)")
        return self.base_fro_M

    def summary(self, n: int) -> dict[str, float]:
        """Model ``n``'s aggregates as plain floats (what the registry records per version)."""
        out = {"fro": float(self.fro_N[n]), "spectral": float(self.spectral_N[n])}
        if self.base_fro_M is not None:
            out |= {"rel_fro": float(self.rel_fro_N[n]), "max_rel_fro": float(self.max_rel_fro_N[n])}
        return out


def weight_metrics(
    deltas: Mapping[str, Delta], base_norms: Mapping[str, float] | None = None
) -> WeightMetrics:
    """Weight-space metrics of N models' deltas (one :class:`LoraBatch` or a stack per module).

    The work is two batched Gram matmuls per module and level pair plus r×r float64 algebra; B·A is
    never formed. Feed large fleets in chunks of a few thousand models (memory: the factors only).
    """
    check_uniform_n(deltas)
    modules = tuple(deltas)
    stats = module_stats([deltas[m] for m in modules])
    device = stats[0].fro.device
    col = lambda f: torch.stack([getattr(s, f) for s in stats], -1)  # noqa: E731
    return WeightMetrics(
        modules=modules,
        fro_NM=col("fro"),
        spectral_NM=col("spectral"),
        stable_rank_NM=col("stable_rank"),
        base_fro_M=_base_vector(modules, base_norms, device),
    )


def weight_metrics_chunks(
    chunks: Iterable[Mapping[str, Delta]],
    base_norms: Mapping[str, float] | None = None,
    workers: int = 1,
) -> Iterator[WeightMetrics]:
    """:func:`weight_metrics` of every chunk of models, in order, ``workers`` chunks at a time.

    torch releases the GIL inside its kernels, so worker threads run on separate cores. Run them
    with ``torch.set_num_threads(1)``: on a shared machine, single-threaded kernels on separate
    threads keep going when a core is taken, where OpenMP-parallel kernels stall at every barrier.
    At most ``workers + 1`` chunks are held at once, so ``chunks`` may stream from the store.
    """
    if workers < 1:
        raise ValidationError(f"workers must be >= 1, got {workers}")
    if workers == 1:
        for chunk in chunks:
            yield weight_metrics(chunk, base_norms)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="fleet-drift") as pool:
        pending: deque[Future[WeightMetrics]] = deque()
        for chunk in chunks:
            pending.append(pool.submit(weight_metrics, chunk, base_norms))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@dataclass(frozen=True)
class RelativeMetrics:
    """N child stacks against their parent stacks: per module ``[N, M]`` and per model ``[N]``."""

    modules: tuple[str, ...]
    inner_NM: Tensor
    """⟨ΔW_child, ΔW_parent⟩_F per module."""
    distance_NM: Tensor
    """‖ΔW_child − ΔW_parent‖_F per module."""
    child_fro_NM: Tensor
    parent_fro_NM: Tensor
    base_fro_M: Tensor | None

    @property
    def cosine_NM(self) -> Tensor:
        """Cosine per module; 0 where either delta is zero (no direction to compare)."""
        return safe_div(self.inner_NM, self.child_fro_NM * self.parent_fro_NM).clamp(-1, 1)

    @property
    def distance_N(self) -> Tensor:
        return rss(self.distance_NM)

    @property
    def cosine_N(self) -> Tensor:
        """Cosine between the two models' deltas over all modules taken as one vector."""
        den = rss(self.child_fro_NM) * rss(self.parent_fro_NM)
        return safe_div(self.inner_NM.sum(-1), den).clamp(-1, 1)

    @property
    def rel_distance_N(self) -> Tensor:
        """‖ΔW_child − ΔW_parent‖_F / ‖W₀‖_F over all modules."""
        if self.base_fro_M is None:
            raise ValidationError(
                "relative distances need base norms: pass base_norms=base_module_norms(...)"
            )
        return safe_div(self.distance_N, rss(self.base_fro_M[None, :]).expand_as(self.distance_N))

    def summary(self, n: int) -> dict[str, float]:
        out = {"distance": float(self.distance_N[n]), "cosine": float(self.cosine_N[n])}
        if self.base_fro_M is not None:
            out["rel_distance"] = float(self.rel_distance_N[n])
        return out


def relative_metrics(
    child: Mapping[str, Delta],
    parent: Mapping[str, Delta] | None,
    base_norms: Mapping[str, float] | None = None,
) -> RelativeMetrics:
    """Inner products, cosines and distances of N child stacks to their parents' stacks.

    Stacks may have different ranks. A module the parent does not adapt (or ``parent=None``, a
    company model whose parent is the base) counts as a zero delta. Pass the parent's levels as the
    same :class:`LoraBatch` objects the child stack holds: shared levels then cancel exactly.
    """
    check_uniform_n(child)
    parent = parent or {}
    extra = sorted(set(parent) - set(child))
    if extra:
        raise ValidationError(
            f"parent adapts module(s) {extra[:3]} the child does not; stacks must share targets"
        )
    modules = tuple(child)
    stats = [pair_stats(child[m], parent.get(m)) for m in modules]
    device = stats[0].inner.device
    col = lambda f: torch.stack([getattr(s, f) for s in stats], -1)  # noqa: E731
    return RelativeMetrics(
        modules=modules,
        inner_NM=col("inner"),
        distance_NM=col("distance"),
        child_fro_NM=col("child_fro"),
        parent_fro_NM=col("parent_fro"),
        base_fro_M=_base_vector(modules, base_norms, device),
    )


def lora_batches(
    models: Sequence[Mapping[str, tuple[Tensor, Tensor]]], scales: Sequence[float]
) -> dict[str, LoraBatch]:
    """Batch per-model adapters (module path → ``(A [r, d_in], B [d_out, r])``, as
    ``AdapterWeights.modules()`` returns them) into one :class:`LoraBatch` per module.
    """
    if not models:
        raise ValidationError("lora_batches needs at least one adapter")
    if len(scales) != len(models):
        raise ValidationError(f"{len(models)} adapters but {len(scales)} scales")
    names = list(models[0])
    for i, m in enumerate(models[1:], 1):
        if set(m) != set(names):
            raise ValidationError(
                f"adapter {i} adapts other modules than adapter 0; batch adapters of one base and targets"
            )
    out = {}
    for name in names:
        try:
            A = torch.stack([m[name][0] for m in models])
            # r-major storage (a transposed view), so that BᵀB reads contiguous rows like A Aᵀ
            B = torch.stack([m[name][1].T for m in models]).mT
        except RuntimeError as exc:
            raise ValidationError(
                f"{name}: adapters have different shapes or ranks ({exc}); batch one rank at a time"
            ) from None
        out[name] = LoraBatch.of(A, B, torch.tensor(list(scales), dtype=torch.float64))
    return out
