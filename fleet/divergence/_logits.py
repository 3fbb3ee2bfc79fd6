"""Function-space drift: per-token divergences between a model's next-token distribution and a reference.

The reference is the base model (KL(base ‖ model), the decision metric) or the parent stack. Shapes:
the model's log-probs are ``[..., B, T, V]`` (any leading model dims, e.g. ``[M, B, T, V]`` for M
models scored on the same B probe prompts); a reference is ``[B, T, V]`` (broadcast over the
models) or a :class:`TopKCache`. ``targets[b, t]`` is the token that position ``t`` predicts; masks
are boolean ``[B, T]`` (or ``[..., B, T]``), False on padding.

**The top-k cache bound.** The base log-probs of a probe set are cached once as the top-k tokens per
position plus the tail mass ``p_T = Σ_{v∉K} p_v``. Merging the tail into one bucket for both
distributions gives

    KL_k = Σ_{v∈K} p_v log(p_v/q_v) + p_T log(p_T/q_T)  ≤  KL(p ‖ q),

a LOWER bound: by the log-sum inequality, ``Σ_{v∈T} p_v log(p_v/q_v) ≥ p_T log(p_T/q_T)`` (this is
the data-processing inequality for the map ``v ↦ bucket(v)``). By the chain rule the gap is exactly

    KL(p ‖ q) − KL_k = p_T · KL(p(·|T) ‖ q(·|T)),

the tail mass times the divergence of the two distributions conditioned on the tail. Every tail
token has ``p_v ≤ p_(k)`` (the smallest cached probability), so ``p(v|T) ≤ min(1, p_(k)/p_T)``, and
``q(v|T) ≥ min_{v∈T} q_v / q_T``; a KL is at most the log of the largest likelihood ratio, hence the
certified upper bound

    KL(p ‖ q) ≤ KL_k + p_T · [log min(1, p_(k)/p_T) + log q_T − min_{v∈T} log q_v].

The gap vanishes as ``p_T → 0``: the cache is tight when the top-k hold almost all the base's mass.
Total variation gets the bracket ``½(Σ_K|p−q| + |p_T−q_T|) ≤ TV ≤ ½(Σ_K|p−q| + p_T + q_T)``
(triangle inequality), of width ``min(p_T, q_T)``.

All reductions run in float32 at least; masked positions contribute 0 and are never divided by.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fleet.errors import ValidationError


def log_probs(logits: Tensor) -> Tensor:
    """Log-softmax over the vocabulary, upcast to float32 (bf16 logits lose the small KLs)."""
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return torch.log_softmax(x, dim=-1)


def _xlogratio(logp: Tensor, logq: Tensor) -> Tensor:
    """``p · (log p − log q)`` with the convention ``0 · log(0/q) = 0``."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))


def forward_kl(ref_logp: Tensor, logp: Tensor) -> Tensor:
    """Exact per-token ``KL(ref ‖ model) = Σ_v p_ref(v) (log p_ref(v) − log p(v))``, ``[..., B, T]``."""
    return _xlogratio(ref_logp, logp).sum(-1).clamp_min(0)


def total_variation(ref_logp: Tensor, logp: Tensor) -> Tensor:
    """Exact per-token ``½ Σ_v |p_ref(v) − p(v)|`` in [0, 1]."""
    return 0.5 * (ref_logp.exp() - logp.exp()).abs().sum(-1)


def top1_agreement(ref_logp: Tensor, logp: Tensor) -> Tensor:
    """1.0 where the model's argmax token is a most likely token of the reference, else 0.0.

    Comparing probabilities rather than indices keeps ties in the reference from counting as
    disagreement.
    """
    pick = logp.argmax(-1, keepdim=True)
    ref = ref_logp.expand(*logp.shape[:-1], ref_logp.shape[-1])
    return (ref.gather(-1, pick).squeeze(-1) >= ref.amax(-1)).to(logp.dtype)


def token_nll(logp: Tensor, targets: Tensor) -> Tensor:
    """Per-token ``−log p(target)``, ``[..., B, T]``.

    Negative ids (e.g. the usual −100 on padding) read token 0; mask those positions out.
    """
    t = targets.clamp_min(0).expand(logp.shape[:-1]).unsqueeze(-1)
    return -logp.gather(-1, t).squeeze(-1)


@dataclass(frozen=True)
class TopKCache:
    """A reference's next-token distributions on a probe set, kept as top-k plus the tail mass."""

    idx_BTK: Tensor
    """Top-k token ids per position, most likely first (int64)."""
    logp_BTK: Tensor
    """Their log-probabilities (float32)."""
    tail_logp_BT: Tensor
    """``log p_T``, the log of the mass outside the top-k (−inf when the top-k hold it all)."""
    target_logp_BT: Tensor | None = None
    """``log p(target)`` at each position, for ΔNLL on general text (None: no targets cached)."""

    @classmethod
    def from_logits(cls, logits_BTV: Tensor, k: int, targets_BT: Tensor | None = None) -> TopKCache:
        """Cache the reference's top-k log-probs; the tail mass is computed exactly, not as 1 − Σ."""
        logp = log_probs(logits_BTV)
        V = logp.shape[-1]
        if not 1 <= k <= V:
            raise ValidationError(f"top_k must be in [1, {V}] (the vocabulary size), got {k}")
        top = logp.topk(k, dim=-1, sorted=True)
        tail = logp.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
        target = token_nll(logp, targets_BT).neg() if targets_BT is not None else None
        return cls(top.indices, top.values, tail, target)

    @property
    def k(self) -> int:
        return self.idx_BTK.shape[-1]

    def to(self, device: torch.device | str) -> TopKCache:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TopKCache(
            move(self.idx_BTK), move(self.logp_BTK), move(self.tail_logp_BT), move(self.target_logp_BT)
        )


@dataclass(frozen=True)
class Bounds:
    """``lower ≤ true value ≤ upper`` per token (equal for exact references)."""

    lower: Tensor
    upper: Tensor


def _split(cache: TopKCache, logp: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The model's log-probs on the cached top-k, ``log q_T``, and ``min_{v∈T} log q_v``."""
    lead = logp.shape[:-1]
    idx = cache.idx_BTK.expand(*lead, cache.k)
    q_K = logp.gather(-1, idx)
    in_K = torch.zeros(cache.idx_BTK.shape[:-1] + logp.shape[-1:], dtype=torch.bool, device=logp.device)
    in_K.scatter_(-1, cache.idx_BTK, True)
    tail = logp.masked_fill(in_K, float("-inf"))  # one copy of the model's log-probs, reused
    tail_logq = tail.logsumexp(-1)
    tail_min = tail.masked_fill_(in_K, float("inf")).amin(-1)
    return q_K, tail_logq, tail_min, in_K


def forward_kl_topk(cache: TopKCache, logp: Tensor) -> Bounds:
    """``KL(ref ‖ model)`` from a top-k cache: the lower bound ``KL_k`` and the certified upper bound.

    See the module docstring for the derivation; the gap is at most
    ``p_T · [log min(1, p_(k)/p_T) + log q_T − min_{v∈T} log q_v]``.
    """
    q_K, tail_logq, tail_min, _ = _split(cache, logp)
    p_tail = cache.tail_logp_BT.exp()
    lower = (_xlogratio(cache.logp_BTK, q_K).sum(-1) + _xlogratio(cache.tail_logp_BT, tail_logq)).clamp_min(0)
    # log max_{v∈T} p(v|T) / q(v|T), bounded through the smallest cached probability p_(k)
    log_ratio = (cache.logp_BTK[..., -1] - cache.tail_logp_BT).clamp_max(0) + tail_logq - tail_min
    gap = torch.where(p_tail > 0, p_tail * log_ratio.clamp_min(0), torch.zeros_like(p_tail))
    return Bounds(lower, lower + gap)


def total_variation_topk(cache: TopKCache, logp: Tensor) -> Bounds:
    """Total variation from a top-k cache: ``½(Σ_K|p−q| + |p_T−q_T|) ≤ TV ≤ ½(Σ_K|p−q| + p_T + q_T)``."""
    q_K, tail_logq, _, _ = _split(cache, logp)
    head = (cache.logp_BTK.exp() - q_K.exp()).abs().sum(-1)
    p_T, q_T = cache.tail_logp_BT.exp(), tail_logq.exp()
    return Bounds(0.5 * (head + (p_T - q_T).abs()), 0.5 * (head + p_T + q_T))


def top1_agreement_topk(cache: TopKCache, logp: Tensor) -> Tensor:
    """Exact top-1 agreement from the cache (the reference's best token is always cached)."""
    pick = logp.argmax(-1, keepdim=True)
    idx = cache.idx_BTK.expand(*logp.shape[:-1], cache.k)
    hit = idx == pick  # [..., B, T, K]
    ref_of_pick = torch.where(
        hit, cache.logp_BTK.expand_as(hit), torch.full_like(hit, float("-inf"), dtype=logp.dtype)
    )
    return (ref_of_pick.amax(-1) >= cache.logp_BTK[..., 0]).to(logp.dtype)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over the last two dims ``[B, T]`` of the positions where ``mask`` is True."""
    m = mask.expand(values.shape)
    count = m.sum((-2, -1))
    if bool((count == 0).any()):
        raise ValidationError(
            "the probe set has no scored tokens (the mask is all False); check the padding mask"
        )
    total = torch.where(m, values, torch.zeros_like(values)).sum((-2, -1))
    return total / count


@dataclass(frozen=True)
class FunctionMetrics:
    """Per-model means over the masked tokens (shape = the model dims of the input, e.g. ``[M]``)."""

    kl: Tensor
    """Mean per-token KL(ref ‖ model); with a top-k cache, its lower bound ``KL_k``."""
    kl_upper: Tensor
    """Certified upper bound on the mean KL (equal to ``kl`` for an exact reference)."""
    tv: Tensor
    """Mean per-token total variation (lower bound with a cache)."""
    tv_upper: Tensor
    top1_agreement: Tensor
    """Share of tokens where the model's argmax is a most likely token of the reference."""
    tokens: Tensor
    """Number of tokens averaged over."""


def function_metrics(logp: Tensor, ref: Tensor | TopKCache, mask: Tensor) -> FunctionMetrics:
    """KL, total variation and top-1 agreement of models against a reference on a probe set.

    ``logp`` ``[..., B, T, V]`` (from :func:`log_probs`); ``ref`` either full log-probs ``[B, T, V]``
    (exact, e.g. the parent stack scored in the same pass) or the base's :class:`TopKCache`.
    """
    if isinstance(ref, TopKCache):
        kl, tv = forward_kl_topk(ref, logp), total_variation_topk(ref, logp)
        top1 = top1_agreement_topk(ref, logp)
    else:
        k = forward_kl(ref, logp)
        t = total_variation(ref, logp)
        kl, tv = Bounds(k, k), Bounds(t, t)
        top1 = top1_agreement(ref, logp)
    mean = lambda x: masked_mean(x, mask)  # noqa: E731
    return FunctionMetrics(
        kl=mean(kl.lower),
        kl_upper=mean(kl.upper),
        tv=mean(tv.lower),
        tv_upper=mean(tv.upper),
        top1_agreement=mean(top1),
        tokens=mask.expand(logp.shape[:-1]).sum((-2, -1)),
    )


def nll_shift(logp: Tensor, targets: Tensor, mask: Tensor, ref: Tensor | TopKCache) -> tuple[Tensor, Tensor]:
    """``(NLL, ΔNLL)`` per model on general text: mean ``−log p(target)`` and its rise over the reference.

    A positive ΔNLL is forgetting: the model explains general text worse than the reference does.
    """
    nll = masked_mean(token_nll(logp, targets), mask)
    if isinstance(ref, TopKCache):
        if ref.target_logp_BT is None:
            raise ValidationError("this cache holds no target log-probs; build it with targets to score ΔNLL")
        ref_nll = masked_mean(-ref.target_logp_BT, mask)
    else:
        ref_nll = masked_mean(token_nll(ref, targets), mask)
    return nll, nll - ref_nll
