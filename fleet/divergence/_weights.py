"""Weight-space drift of LoRA adapters, computed from r×r Gram matrices, never from B·A.

One adapted module of N models is a :class:`LoraBatch`: ``ΔW_n = s_n · B_n A_n`` with
``A [N, r, d_in]``, ``B [N, d_out, r]``. A *stack* (company + team + individual) is a sequence of
levels whose deltas add up; it is the same as one LoRA of rank ``Σ rᵢ`` with concatenated A's and
scale-folded B's, and that is how it is treated here, one r×r block at a time.

Everything follows from two Gram matrices per module, ``G_A = A Aᵀ`` and ``G_B = D Bᵀ B D``
(``D`` the per-rank-component scale), which are cheap (one batched matmul each, O(r²·d)):

- ``‖ΔW‖_F² = tr(G_B G_A)``;
- ``⟨ΔW₁, ΔW₂⟩_F = tr((D₁B₁ᵀB₂D₂)(A₂A₁ᵀ))``, hence cosines and distances between stacks;
- the squared singular values of ΔW are the eigenvalues of ``G_B G_A``: with ``B D = Q_B R_B`` and
  ``Aᵀ = Q_A R_A``, ``G_B G_A = R_Bᵀ R_B R_Aᵀ R_A`` is similar to ``C Cᵀ`` for the QR core
  ``C = R_B R_Aᵀ``, so the spectral norm needs only r×r work.

The big contractions run in the factors' dtype (at least float32); the r×r algebra runs in float64.

The spectral norm comes from repeated squaring of ``P = G_B G_A`` with a certified bracket (see
:func:`_top_eigenvalue`): a few large batched matmuls, where LAPACK solves one 8×8 matrix per call
(slower; ``bench/divergence.py`` measures both). :func:`spectrum` gives every singular value
exactly (QR of B and Aᵀ, SVD of the r×r core) for the few models a report looks at.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fleet.errors import ValidationError

# Relative width of the bracket on σ_max² at which the squaring stops; 30 squarings (m = 2³⁰)
# guarantee it for any total rank up to 256, so the loop always ends converged.
SPECTRAL_RTOL = 1e-7
_MAX_SQUARINGS = 30
_NEGLIGIBLE = 1e-75
_BLOCK_ELEMENTS = 1 << 17  # r×r work per block: 2048 8×8 float64 matrices, 1 MiB a tensor
_FIRST_CHECK_M = 64  # first convergence check at m = 64: checking earlier rarely pays for itself


@dataclass(frozen=True, eq=False)
class LoraBatch:
    """One adapted module of N models: ``ΔW_n = scale_n · B_n · A_n``.

    ``eq=False``: levels are compared by identity, so that a level shared by two stacks (the same
    object) cancels exactly in their difference.
    """

    A_NRI: Tensor
    """Down-projections ``[N, r, d_in]`` (PEFT's ``lora_A.weight`` per model)."""
    B_NOR: Tensor
    """Up-projections ``[N, d_out, r]`` (PEFT's ``lora_B.weight`` per model). Best stored r-major, as
    the transposed view of a contiguous ``[N, r, d_out]`` tensor (:func:`metrics.lora_batches` does):
    ``BᵀB`` then runs on contiguous rows, about twice as fast as on PEFT's own layout."""
    scale_N: Tensor
    """``alpha / r`` (or ``alpha / sqrt(r)`` with rslora) per model, float64 ``[N]``."""

    @classmethod
    def of(cls, A_NRI: Tensor, B_NOR: Tensor, scale: float | Sequence[float] | Tensor) -> LoraBatch:
        """Validate shapes and broadcast ``scale`` (a number or one per model) to ``[N]``."""
        if A_NRI.dim() != 3 or B_NOR.dim() != 3:
            raise ValidationError(
                f"LoraBatch needs A [N, r, d_in] and B [N, d_out, r]; got {tuple(A_NRI.shape)} and {tuple(B_NOR.shape)}"
            )
        n, r, _ = A_NRI.shape
        if B_NOR.shape[0] != n or B_NOR.shape[2] != r:
            raise ValidationError(
                f"LoraBatch: A {tuple(A_NRI.shape)} and B {tuple(B_NOR.shape)} disagree on N or r"
            )
        s = torch.as_tensor(scale, dtype=torch.float64, device=A_NRI.device)
        if s.dim() == 0:
            s = s.expand(n)
        if s.shape != (n,):
            raise ValidationError(
                f"LoraBatch: scale must be a number or have shape [{n}], got {tuple(s.shape)}"
            )
        return cls(A_NRI, B_NOR, s)

    @property
    def n(self) -> int:
        return self.A_NRI.shape[0]

    @property
    def rank(self) -> int:
        return self.A_NRI.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)`` of the adapted module."""
        return self.B_NOR.shape[1], self.A_NRI.shape[2]

    def materialize(self) -> Tensor:
        """``ΔW [N, d_out, d_in]`` in float64 (tests and tiny batches only)."""
        return self.scale_N[:, None, None] * (self.B_NOR.double() @ self.A_NRI.double())


Delta = LoraBatch | Sequence[LoraBatch]
"""One module's delta for a batch of models: a single level, or a stack of levels that add up."""


def levels_of(delta: Delta) -> tuple[LoraBatch, ...]:
    levels = (delta,) if isinstance(delta, LoraBatch) else tuple(delta)
    if not levels:
        raise ValidationError("a stack needs at least one level")
    n, shape = levels[0].n, levels[0].shape
    for lv in levels[1:]:
        if lv.n != n or lv.shape != shape:
            raise ValidationError(
                f"stack levels disagree: N={lv.n}, shape {lv.shape} vs N={n}, shape {shape}; "
                "every level must cover the same models and the same base module"
            )
    return levels


def _compute_dtype(t: Tensor) -> torch.dtype:
    # bf16/fp16 factors are contracted in float32; float64 factors stay exact.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _block_grams(a: LoraBatch, b: LoraBatch) -> tuple[Tensor, Tensor]:
    """``(A_a A_bᵀ, s_a s_b B_aᵀ B_b)`` as float64 ``[N, r_a, r_b]``."""
    dt = _compute_dtype(a.A_NRI)
    Aa, Ab = a.A_NRI.to(dt), b.A_NRI.to(dt)
    Ba, Bb = a.B_NOR.to(dt), b.B_NOR.to(dt)
    GA = torch.matmul(Aa, Ab.mT).double()
    GB = torch.matmul(Ba.mT, Bb).double() * (a.scale_N * b.scale_N)[:, None, None]
    return GA, GB


def stack_grams(delta: Delta) -> tuple[Tensor, Tensor]:
    """Gram matrices ``(G_A, G_B)`` ``[N, R, R]`` (float64) of a stack of total rank R.

    Blocks between levels are computed once per unordered pair; the concatenation of the factors
    is never formed.
    """
    levels = levels_of(delta)
    if len(levels) == 1:
        return _block_grams(levels[0], levels[0])
    offsets = [0]
    for lv in levels:
        offsets.append(offsets[-1] + lv.rank)
    n, R = levels[0].n, offsets[-1]
    dev = levels[0].A_NRI.device
    GA = torch.empty(n, R, R, dtype=torch.float64, device=dev)
    GB = torch.empty_like(GA)
    for i, a in enumerate(levels):
        for j in range(i, len(levels)):
            ga, gb = _block_grams(a, levels[j])
            si, sj = slice(offsets[i], offsets[i + 1]), slice(offsets[j], offsets[j + 1])
            GA[:, si, sj], GB[:, si, sj] = ga, gb
            if j != i:
                GA[:, sj, si], GB[:, sj, si] = ga.mT, gb.mT
    return GA, GB


def _trace(M: Tensor) -> Tensor:
    return M.diagonal(dim1=-2, dim2=-1).sum(-1)


def _top_eigenvalue(GA: Tensor, GB: Tensor) -> tuple[Tensor, Tensor]:
    """Bracket ``lo ≤ λ_max(G_B G_A) ≤ hi`` (= σ_max(ΔW)²), float64 ``[N]`` each.

    ``P = G_B G_A`` is similar to a symmetric PSD matrix with eigenvalues μ₁ ≥ … ≥ μ_R ≥ 0. With
    ``m = 2^j`` (j squarings of P, renormalised to trace 1 after every second one):

    - ``lo = tr(P^{m+1}) / tr(P^m) = Σμᵢ^{m+1} / Σμᵢ^m`` is a weighted mean of the μᵢ, so ``lo ≤ μ₁``,
      and ``μ₁ - lo ≤ μ₁ · (R-1) / (e·m)`` (each term ``x^m (1-x) ≤ 1/(e·m)`` for ``x = μᵢ/μ₁``);
    - ``hi = tr(P^m)^{1/m}`` satisfies ``μ₁ ≤ hi ≤ μ₁ · R^{1/m}``.

    A model leaves the loop once ``hi ≤ lo · (1 + SPECTRAL_RTOL)``: with a spectral gap that takes
    6–12 squarings; only near-ties at the top need more, and those few go on alone. After the
    last (30th) squaring the bracket is at most ``(R-1)/(e·2³⁰) + ln R / 2³⁰`` wide relative to μ₁,
    below SPECTRAL_RTOL for any R ≤ 256. Traces of powers are the same for the non-symmetric P, so
    no factorisation is needed and rank-deficient factors are fine.
    """
    P = GB @ GA
    t = _trace(P)  # = ‖ΔW‖_F² ≥ 0
    lo_out, hi_out = torch.zeros_like(t), torch.zeros_like(t)
    idx = torch.nonzero(t > 0).squeeze(1)  # a zero delta keeps σ = 0
    if idx.numel() == 0:
        return lo_out, hi_out
    P, t = P[idx], t[idx]
    Q = P / t[:, None, None]  # trace 1
    log_tr = torch.log(t)  # log tr(P^m) for the current m
    m = 1
    for step in range(1, _MAX_SQUARINGS // 2 + 1):
        # Two squarings per renormalisation: the top eigenvalue of a trace-1 Q is ≥ 1/R, so Q⁴
        # stays far from underflow, and half the elementwise passes are saved.
        Q = Q @ Q
        Q = Q @ Q
        c = _trace(Q).clamp_min(torch.finfo(torch.float64).tiny)
        Q.div_(c[:, None, None])
        # Directions other than the top decay like (μᵢ/μ₁)^m and would sink into subnormal floats,
        # which x86 computes ~100× slower. Entries kept (≥ 1e-75 of the trace) cannot underflow in
        # the next two squarings, and those dropped cannot move σ_max at SPECTRAL_RTOL.
        Q.masked_fill_(Q.abs() < _NEGLIGIBLE, 0.0)
        log_tr = 4 * log_tr + torch.log(c)
        m *= 4
        if m < _FIRST_CHECK_M:
            continue
        lo = (P * Q.mT).sum((-2, -1))  # tr(P Q) with tr Q = 1
        hi = torch.exp(log_tr / m)
        done = hi <= lo * (1 + SPECTRAL_RTOL)
        if step == _MAX_SQUARINGS // 2:
            done = torch.ones_like(done)
        if bool(done.any()):
            lo_out[idx[done]], hi_out[idx[done]] = lo[done], hi[done]
            keep = ~done
            idx, P, Q, log_tr = idx[keep], P[keep], Q[keep], log_tr[keep]
        if idx.numel() == 0:
            break
    return lo_out, hi_out


@dataclass(frozen=True)
class ModuleStats:
    """Weight-space statistics of one module's delta for N models (float64 ``[N]`` each)."""

    fro: Tensor
    """``‖ΔW‖_F``."""
    spectral: Tensor
    """``σ_max(ΔW)`` (relative error ≤ SPECTRAL_RTOL)."""
    stable_rank: Tensor
    """``‖ΔW‖_F² / σ_max²`` in [1, R]; 0 for a zero delta."""


def _blocks(grams: Sequence[tuple[Tensor, Tensor]]) -> list[list[tuple[int, slice]]]:
    """Cut the modules' r×r problems into blocks of about ``_BLOCK_ELEMENTS`` entries of one rank.

    Blocks stay in cache, their temporaries are reused by the allocator instead of faulting in fresh
    pages on every elementwise pass, and small batches of models still make few, large operations.
    """
    blocks: list[list[tuple[int, slice]]] = []
    open_: dict[int, tuple[list[tuple[int, slice]], int]] = {}  # rank -> (block being filled, its size)
    for i, (GA, _) in enumerate(grams):
        n, R = GA.shape[0], GA.shape[-1]
        cap = max(1, _BLOCK_ELEMENTS // (R * R))
        start = 0
        while start < n:
            block, size = open_.get(R, ([], 0))
            take = min(cap - size, n - start)
            block.append((i, slice(start, start + take)))
            start, size = start + take, size + take
            if size == cap:
                blocks.append(block)
                open_.pop(R, None)
            else:
                open_[R] = (block, size)
    blocks.extend(block for block, _ in open_.values())
    return blocks


def _gather(pieces: list[Tensor]) -> Tensor:
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def module_stats(deltas: Sequence[Delta]) -> list[ModuleStats]:
    """Frobenius norm, spectral norm and stable rank of several modules' deltas, never forming B·A.

    The Gram matrices are formed module by module (large matmuls); the r×r work then runs in blocks
    of equal rank that span modules (:func:`_blocks`), so that 28 modules of a few models still
    cost a handful of large tensor operations rather than hundreds of small ones.
    """
    grams = [stack_grams(d) for d in deltas]
    parts: list[list[Tensor]] = [[] for _ in grams]
    for block in _blocks(grams):
        GA, GB = (_gather([grams[i][k][sl] for i, sl in block]) for k in (0, 1))
        lo, hi = _top_eigenvalue(GA, GB)
        sizes = [sl.stop - sl.start for _, sl in block]
        for (i, _), mid in zip(block, (0.5 * (lo + hi)).split(sizes), strict=True):
            parts[i].append(mid)
    top = [torch.cat(p) for p in parts]
    out = []
    for (GA, GB), t in zip(grams, top, strict=True):
        sq = (GA * GB).sum((-2, -1)).clamp_min(0)  # tr(G_B G_A); both symmetric
        out.append(ModuleStats(fro=sq.sqrt(), spectral=t.sqrt(), stable_rank=safe_div(sq, t)))
    return out


def spectrum(delta: Delta) -> Tensor:
    """All singular values of ΔW, descending, float64 ``[N, min(R, d_out, d_in)]`` (exact, slower).

    ``B D = Q_B R_B`` and ``Aᵀ = Q_A R_A`` give ``ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ`` with orthonormal Q's, so
    the singular values of ΔW are those of the small core ``R_B R_Aᵀ``. Costs two batched QRs per
    model; use :func:`module_stats` for whole fleets.
    """
    levels = levels_of(delta)
    A = torch.cat([lv.A_NRI.double() for lv in levels], 1)  # [N, R, d_in]
    B = torch.cat([lv.B_NOR.double() * lv.scale_N[:, None, None] for lv in levels], 2)  # [N, d_out, R]
    R_B = torch.linalg.qr(B, mode="r").R  # [N, min(d_out, R), R]
    R_A = torch.linalg.qr(A.mT, mode="r").R  # [N, min(d_in, R), R]
    return torch.linalg.svdvals(R_B @ R_A.mT)


def inner_products(levels: Sequence[LoraBatch]) -> Tensor:
    """``K[n, i, j] = ⟨ΔW_i, ΔW_j⟩_F`` between levels (float64 ``[N, L, L]``)."""
    L = len(levels)
    K = torch.empty(levels[0].n, L, L, dtype=torch.float64, device=levels[0].A_NRI.device)
    for i in range(L):
        for j in range(i, L):
            ga, gb = _block_grams(levels[i], levels[j])
            # tr((s_i s_j B_iᵀB_j)(A_j A_iᵀ)) = Σ (B-block) ∘ (A-block)
            K[:, i, j] = K[:, j, i] = (gb * ga).sum((-2, -1))
    return K


@dataclass(frozen=True)
class PairStats:
    """Child delta against parent delta for one module (float64 ``[N]`` each)."""

    inner: Tensor
    """``⟨ΔW_child, ΔW_parent⟩_F``."""
    distance: Tensor
    """``‖ΔW_child − ΔW_parent‖_F``."""
    child_fro: Tensor
    parent_fro: Tensor


def pair_stats(child: Delta, parent: Delta | None) -> PairStats:
    """Inner product and distance of two stacks (possibly of different ranks) for one module.

    Levels present in both stacks (the same :class:`LoraBatch` object) cancel exactly in the
    difference: for the usual lineage ``child = parent + own level`` the distance is ``‖own‖_F`` to
    float64 precision, with no cancellation between large norms. ``parent=None`` is the base (zero).
    """
    c_levels = levels_of(child)
    p_levels = levels_of(parent) if parent is not None else ()
    if p_levels and (p_levels[0].n, p_levels[0].shape) != (c_levels[0].n, c_levels[0].shape):
        raise ValidationError(
            f"child and parent deltas disagree: N={c_levels[0].n}, shape {c_levels[0].shape} vs "
            f"N={p_levels[0].n}, shape {p_levels[0].shape}"
        )
    unique: list[LoraBatch] = []
    for lv in (*c_levels, *p_levels):
        if not any(lv is u for u in unique):
            unique.append(lv)
    K = inner_products(unique)
    dt = dict(dtype=torch.float64, device=K.device)
    a_c = torch.tensor([float(any(u is lv for lv in c_levels)) for u in unique], **dt)
    a_p = torch.tensor([float(any(u is lv for lv in p_levels)) for u in unique], **dt)
    d = a_c - a_p  # shared levels get 0 here, so they never enter the distance
    quad = lambda x, y: torch.einsum("i,nij,j->n", x, K, y)  # noqa: E731
    return PairStats(
        inner=quad(a_c, a_p),
        distance=quad(d, d).clamp_min(0).sqrt(),
        child_fro=quad(a_c, a_c).clamp_min(0).sqrt(),
        parent_fro=quad(a_p, a_p).clamp_min(0).sqrt(),
    )


def base_module_norms(state_dict: Mapping[str, Tensor], module_names: Sequence[str]) -> dict[str, float]:
    """``‖W₀‖_F`` of every named module of a base model's state dict (``<module>.weight``).

    Compute once per base and keep the result (see :func:`cached_base_norms`); the relative
    metrics divide by these.
    """
    out: dict[str, float] = {}
    for name in module_names:
        w = state_dict.get(f"{name}.weight")
        if w is None:
            raise ValidationError(
                f"base model has no weight {name}.weight; adapters and base disagree on module names"
            )
        out[name] = float(torch.linalg.vector_norm(w, dtype=torch.float64))
    return out


_BASE_NORMS: dict[str, dict[str, float]] = {}


def cached_base_norms(
    base_key: str, state_dict: Mapping[str, Tensor], module_names: Sequence[str]
) -> dict[str, float]:
    """:func:`base_module_norms`, computed once per ``base_key`` (e.g. base name + revision) per process."""
    have = _BASE_NORMS.setdefault(base_key, {})
    missing = [m for m in module_names if m not in have]
    if missing:
        have.update(base_module_norms(state_dict, missing))
    return {m: have[m] for m in module_names}


def rss(values_NM: Tensor) -> Tensor:
    """Root of the sum of squares over modules: the norm of all modules' deltas as one vector."""
    return values_NM.square().sum(-1).sqrt()


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0 where ``den == 0`` (a zero delta has no direction and no relative size)."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def check_uniform_n(deltas: Mapping[str, Delta]) -> int:
    if not deltas:
        raise ValidationError("no adapted modules given")
    ns = {name: levels_of(d)[0].n for name, d in deltas.items()}
    if len(set(ns.values())) != 1:
        raise ValidationError(f"every module must cover the same models; got batch sizes {ns}")
    return next(iter(ns.values()))
