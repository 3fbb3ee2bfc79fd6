"""Scoring model versions on a probe set through the LoRA engine: many models per forward pass.

For each version the scorer measures, against the base (its cached top-k log-probs) and against
the parent stack (the same lineage without the model's own level, computed in full in the same
engine, so that comparison is exact):

- function space: mean per-token KL(ref ‖ model) (with the cache: the lower bound ``KL_k`` and the
  certified upper bound), total variation, top-1 agreement over every probe position, and NLL /
  ΔNLL on the probe set's general-text rows;
- weight space: ‖ΔW‖_F and σ_max of the whole stack and ‖ΔW‖_F / ‖W₀‖_F (relation ``base``); the
  distance to the parent's stack relative to ‖W₀‖_F (which is the model's own adapter's size,
  since the shared levels cancel) and the cosine between the two stacks (relation ``parent``).

Work is organised so that nothing is computed twice: versions are sorted by lineage, so siblings
follow each other and their common parent stack is run once and kept only while they need it;
adapters are loaded into engine slots once per chunk of versions; and each forward carries
``batch_models`` stacks × the probe rows (``engine.rows``: every row its own stack; on Llama bases
a stack's probe rows run as one long engine row, see ``_forward.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fleet.divergence._forward import stacked_logits
from fleet.divergence._logits import function_metrics, log_probs, nll_shift
from fleet.divergence.metrics import lora_batches, relative_metrics, weight_metrics
from fleet.divergence.policy import DriftMetrics
from fleet.divergence.probes import ProbeSet
from fleet.errors import FleetError, ValidationError

Levels = tuple[str, ...]


@dataclass(frozen=True)
class ScoreItem:
    """One version to score: its stack's adapter keys, company first, its own version last."""

    model_id: str
    version: int
    tier: str
    levels: Levels

    @property
    def parent(self) -> Levels:
        return self.levels[:-1]


@dataclass(frozen=True)
class VersionScore:
    model_id: str
    version: int
    tier: str
    base: dict[str, float]
    """Against the base: kl, kl_upper, tv, tv_upper, top1, nll, dnll, tokens; weight space:
    rel_weight_norm (the stack's ‖ΔW‖/‖W₀‖), fro, spectral."""
    parent: dict[str, float] | None
    """Against the parent stack (None when the parent is the base): kl, tv, top1, nll, dnll;
    rel_weight_norm (‖ΔW − ΔW_parent‖/‖W₀‖, the own adapter's size), cosine."""

    @property
    def own_rel_weight_norm(self) -> float | None:
        """The model's own adapter relative to the base: what the publication gate caps too."""
        src = self.parent if self.parent is not None else self.base
        return src.get("rel_weight_norm")

    def drift_metrics(self) -> DriftMetrics:
        """What the policy judges: function space against the base, the own adapter's size."""
        return DriftMetrics(
            kl=self.base["kl"],
            rel_weight_norm=self.own_rel_weight_norm,
            top1_agreement=self.base["top1"],
            general_dnll=self.base["dnll"],
        )


@dataclass(frozen=True)
class ScoreError:
    model_id: str
    version: int
    message: str


class FunctionScorer:
    """Scores :class:`ScoreItem` s with one engine; ``fetch(key)`` returns an adapter's weights.

    The engine needs ``3 × chunk_models`` free slots at most (a chunk's adapters; its parents'
    levels are among them). Other resident adapters are unloaded when room is needed.
    ``weight_space=False`` leaves out the weight-space figures (function space only).
    """

    def __init__(
        self,
        engine,
        probe: ProbeSet,
        fetch: Callable[[str], object],
        *,
        batch_models: int = 8,
        chunk_models: int | None = None,
        base_norms: dict[str, float] | None = None,
        weight_space: bool = True,
    ) -> None:
        if batch_models < 1:
            raise ValidationError(f"batch_models must be >= 1, got {batch_models}")
        self.engine = engine
        self.probe = probe.to(engine.device)
        self.fetch = fetch
        self.batch_models = batch_models
        self.chunk_models = chunk_models or max(4 * batch_models, 16)
        self.base_norms = base_norms
        self.weight_space = weight_space
        self._weights: dict[str, object] = {}
        self._parents: dict[Levels, Tensor] = {}
        self.forwards = 0
        self.stacks_run = 0
        self.errors: list[ScoreError] = []

    # ------------------------------------------------------------------ driving
    def score(self, items: Iterable[ScoreItem]) -> list[VersionScore]:
        ordered = sorted(items, key=lambda it: (it.parent, it.levels, it.model_id))
        out: list[VersionScore] = []
        for i in range(0, len(ordered), self.chunk_models):
            chunk = self._prepare(ordered[i : i + self.chunk_models])
            if chunk:
                out += self._score_chunk(chunk)
        self._parents.clear()
        return out

    def _prepare(self, chunk: list[ScoreItem]) -> list[ScoreItem]:
        """Fetch the chunk's adapters and load them into slots; drop versions whose adapter fails."""
        keys = list(dict.fromkeys(k for it in chunk for k in it.levels))
        weights: dict[str, object] = {}
        bad: dict[str, str] = {}
        for k in keys:
            try:
                weights[k] = self._weights[k] if k in self._weights else self.fetch(k)
            except FleetError as exc:  # a corrupt or missing object fails its versions, not the scan
                bad[k] = exc.message
        self._weights = weights
        ok = []
        for it in chunk:
            broken = [k for k in it.levels if k in bad]
            if broken:
                self.errors.append(ScoreError(it.model_id, it.version, f"{broken[0]}: {bad[broken[0]]}"))
            else:
                ok.append(it)
        self._load([k for k in keys if k in weights])
        return ok

    def _load(self, keys: Sequence[str]) -> None:
        engine = self.engine
        missing = [k for k in keys if engine.slot(k) is None]
        if len(missing) > engine.free_slots:
            keep = set(keys)
            for k in engine.keys():
                if len(missing) <= engine.free_slots:
                    break
                if k not in keep:
                    engine.unload(k)
        for k in missing:
            engine.load(k, self._weights[k])

    # ------------------------------------------------------------------ one chunk
    def _score_chunk(self, chunk: list[ScoreItem]) -> list[VersionScore]:
        needed = list(dict.fromkeys(it.parent for it in chunk if it.parent))
        self._parents = {p: lp for p, lp in self._parents.items() if p in needed}
        todo = [p for p in needed if p not in self._parents]
        for i in range(0, len(todo), self.batch_models):
            part = todo[i : i + self.batch_models]
            for p, lp in zip(part, self._logp(part), strict=True):
                self._parents[p] = lp
        weight = self._weight_metrics(chunk) if self.weight_space else {}
        out: list[VersionScore] = []
        for i in range(0, len(chunk), self.batch_models):
            part = chunk[i : i + self.batch_models]
            out += self._function_metrics(part, self._logp([it.levels for it in part]), weight)
        return out

    @torch.inference_mode()
    def _logp(self, stacks: Sequence[Levels]) -> Tensor:
        """``[S, P, T, V]`` log-probs of each stack on every probe row, in one forward."""
        engine = self.engine
        slots = []
        for levels in stacks:
            row = [engine.slot(k) for k in levels]
            slots.append(row + [-1] * (3 - len(row)))
        logits = stacked_logits(engine, slots, self.probe.ids_PT)
        self.forwards += 1
        self.stacks_run += len(stacks)
        return log_probs(logits)

    @torch.inference_mode()
    def _function_metrics(
        self,
        part: list[ScoreItem],
        lp_MPTV: Tensor,
        weight: dict[tuple[str, int], dict[str, dict[str, float]]],
    ) -> list[VersionScore]:
        probe, g = self.probe, self.probe.general_rows
        tgt_GT = probe.targets_PT[g]
        fm = function_metrics(lp_MPTV, probe.cache, probe.mask_PT)
        nll, dnll = nll_shift(lp_MPTV[:, g], tgt_GT, probe.nll_mask_GT, probe.general_cache())
        with_parent = [i for i, it in enumerate(part) if it.parent]
        parent_rows: dict[int, dict[str, float]] = {}
        if with_parent:
            idx = torch.tensor(with_parent, device=lp_MPTV.device)
            lp = lp_MPTV.index_select(0, idx)
            ref = torch.stack([self._parents[part[i].parent] for i in with_parent])
            pm = function_metrics(lp, ref, probe.mask_PT)
            p_nll, p_dnll = nll_shift(lp[:, g], tgt_GT, probe.nll_mask_GT, ref[:, g])
            for j, i in enumerate(with_parent):
                parent_rows[i] = {
                    "kl": float(pm.kl[j]), "tv": float(pm.tv[j]), "top1": float(pm.top1_agreement[j]),
                    "nll": float(p_nll[j]), "dnll": float(p_dnll[j]),
                }  # fmt: skip
        out = []
        for i, it in enumerate(part):
            w = weight.get((it.model_id, it.version), {})
            base = {
                "kl": float(fm.kl[i]), "kl_upper": float(fm.kl_upper[i]), "tv": float(fm.tv[i]),
                "tv_upper": float(fm.tv_upper[i]), "top1": float(fm.top1_agreement[i]),
                "nll": float(nll[i]), "dnll": float(dnll[i]), "tokens": float(fm.tokens[i]),
                **w.get("base", {}),
            }  # fmt: skip
            parent = {**parent_rows[i], **w.get("parent", {})} if i in parent_rows else None
            out.append(VersionScore(it.model_id, it.version, it.tier, base, parent))
        return out

    # ------------------------------------------------------------------ weight space
    def _weight_metrics(self, chunk: list[ScoreItem]) -> dict[tuple[str, int], dict[str, dict[str, float]]]:
        """Weight-space figures of the chunk, batched over versions whose levels have the same shapes."""
        groups: dict[tuple, list[ScoreItem]] = {}
        for it in chunk:
            sig = tuple((self._weights[k].rank, tuple(sorted(self._weights[k].modules()))) for k in it.levels)
            groups.setdefault(sig, []).append(it)
        out: dict[tuple[str, int], dict[str, dict[str, float]]] = {}
        for items in groups.values():
            depth = len(items[0].levels)
            levels = []
            for j in range(depth):
                ws = [self._weights[it.levels[j]] for it in items]
                levels.append(lora_batches([w.modules() for w in ws], [w.scale for w in ws]))
            modules = list(dict.fromkeys(m for lv in levels for m in lv))
            child = {m: [lv[m] for lv in levels if m in lv] for m in modules}
            wm = weight_metrics(child, self.base_norms)
            rm = None
            if depth > 1:
                parent = {m: [lv[m] for lv in levels[:-1] if m in lv] for m in modules}
                rm = relative_metrics(child, {m: v for m, v in parent.items() if v}, self.base_norms)
            for n, it in enumerate(items):
                base = {"fro": float(wm.fro_N[n]), "spectral": float(wm.spectral_N[n])}
                if self.base_norms is not None:
                    base["rel_weight_norm"] = float(wm.rel_fro_N[n])
                entry = {"base": base}
                if rm is not None:
                    par = {"distance": float(rm.distance_N[n]), "cosine": float(rm.cosine_N[n])}
                    if self.base_norms is not None:
                        par["rel_weight_norm"] = float(rm.rel_distance_N[n])
                    entry["parent"] = par
                out[(it.model_id, it.version)] = entry
        return out
