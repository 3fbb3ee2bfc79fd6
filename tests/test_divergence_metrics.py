"""Drift metrics against their definitions: materialized ΔW in float64, exact KL over the full vocabulary."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fleet.divergence.metrics import (
    SPECTRAL_RTOL,
    LoraBatch,
    TopKCache,
    base_module_norms,
    cached_base_norms,
    forward_kl,
    forward_kl_topk,
    function_metrics,
    log_probs,
    lora_batches,
    nll_shift,
    relative_metrics,
    spectrum,
    top1_agreement,
    total_variation,
    total_variation_topk,
    weight_metrics,
    weight_metrics_chunks,
)
from fleet.errors import ValidationError


def _level(g: torch.Generator, n: int, r: int, d_in: int, d_out: int, dtype=torch.float64) -> LoraBatch:
    A = torch.randn(n, r, d_in, generator=g, dtype=dtype)
    B = torch.randn(n, d_out, r, generator=g, dtype=dtype)
    return LoraBatch.of(A, B, torch.rand(n, generator=g, dtype=torch.float64) * 2 + 0.1)


def _dense(levels) -> torch.Tensor:
    return sum(lv.materialize() for lv in levels)


# ---------------------------------------------------------------------------------------- weight space
@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 3),
    d_in=st.integers(1, 12),
    d_out=st.integers(1, 12),
    ranks=st.lists(st.integers(1, 6), min_size=1, max_size=3),
)
def test_weight_formulas_match_materialized_delta(seed, n, d_in, d_out, ranks):
    g = torch.Generator().manual_seed(seed)
    levels = [_level(g, n, r, d_in, d_out) for r in ranks]
    W = _dense(levels)
    sv = torch.linalg.svdvals(W)
    wm = weight_metrics({"m": levels}, {"m": 2.0})

    fro = torch.linalg.matrix_norm(W)
    torch.testing.assert_close(wm.fro_NM[:, 0], fro, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(wm.rel_fro_NM[:, 0], fro / 2.0, rtol=1e-10, atol=1e-12)
    # σ_max comes from a bracket of relative width SPECTRAL_RTOL on σ²
    torch.testing.assert_close(wm.spectral_NM[:, 0], sv[:, 0], rtol=SPECTRAL_RTOL, atol=1e-12)
    torch.testing.assert_close(
        wm.stable_rank_NM[:, 0], (sv**2).sum(-1) / sv[:, 0] ** 2, rtol=4 * SPECTRAL_RTOL, atol=0
    )
    # the exact QR-core spectrum agrees with the SVD of ΔW on every nonzero singular value
    core = spectrum(levels)
    k = min(core.shape[-1], sv.shape[-1])
    torch.testing.assert_close(core[:, :k], sv[:, :k], rtol=1e-9, atol=1e-10)


def test_spectral_norm_with_nearly_equal_top_singular_values():
    # the slowest case for repeated squaring: σ₁ and σ₂ within 1e-6 of each other
    n, r, d = 4, 8, 32
    Q_in = torch.linalg.qr(torch.randn(n, d, r, dtype=torch.float64)).Q
    Q_out = torch.linalg.qr(torch.randn(n, d, r, dtype=torch.float64)).Q
    sigmas = torch.tensor([3.0, 3.0 * (1 - 1e-6), 2.0, 1.0, 0.5, 0.5, 0.1, 0.0], dtype=torch.float64)
    delta = LoraBatch.of(Q_in.mT, Q_out * sigmas, 1.0)
    wm = weight_metrics({"m": delta})
    torch.testing.assert_close(
        wm.spectral_NM[:, 0], torch.full((n,), 3.0, dtype=torch.float64), rtol=1e-7, atol=0
    )


def test_zero_and_rank_deficient_deltas():
    g = torch.Generator().manual_seed(1)
    fresh = LoraBatch.of(torch.randn(3, 4, 10, generator=g), torch.zeros(3, 6, 4), 2.0)  # PEFT init: B = 0
    wm = weight_metrics({"m": fresh}, {"m": 5.0})
    assert torch.all(wm.fro_NM == 0) and torch.all(wm.spectral_NM == 0) and torch.all(wm.stable_rank_NM == 0)
    assert torch.all(wm.rel_fro_N == 0)

    # the same level twice: concatenated A has duplicate rows, G_A is singular; ΔW = 2·s·B·A
    lv = _level(g, 2, 3, 9, 7)
    wm2 = weight_metrics({"m": [lv, lv]})
    sv = torch.linalg.svdvals(2 * lv.materialize())
    torch.testing.assert_close(wm2.spectral_NM[:, 0], sv[:, 0], rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(
        wm2.fro_NM[:, 0], torch.linalg.matrix_norm(2 * lv.materialize()), rtol=1e-10, atol=0
    )


def test_float32_factors_agree_with_float64():
    g = torch.Generator().manual_seed(2)
    lv64 = _level(g, 16, 8, 256, 688)
    lv32 = LoraBatch.of(lv64.A_NRI.float(), lv64.B_NOR.float(), lv64.scale_N)
    a, b = weight_metrics({"m": lv64}), weight_metrics({"m": lv32})
    torch.testing.assert_close(b.fro_NM, a.fro_NM, rtol=1e-5, atol=0)
    torch.testing.assert_close(b.spectral_NM, a.spectral_NM, rtol=1e-5, atol=0)


def test_aggregates_are_root_sum_of_squares_over_modules():
    g = torch.Generator().manual_seed(3)
    deltas = {f"layer{i}": _level(g, 5, 4, 6 + i, 5) for i in range(3)}
    base = {"layer0": 3.0, "layer1": 4.0, "layer2": 12.0}
    wm = weight_metrics(deltas, base)
    per = torch.stack([torch.linalg.matrix_norm(d.materialize()) for d in deltas.values()], -1)
    torch.testing.assert_close(wm.fro_N, per.square().sum(-1).sqrt())
    torch.testing.assert_close(wm.rel_fro_N, wm.fro_N / 13.0)  # √(9 + 16 + 144)
    torch.testing.assert_close(
        wm.max_rel_fro_N, (per / torch.tensor([3.0, 4.0, 12.0], dtype=torch.float64)).amax(-1)
    )
    assert wm.summary(0)["rel_fro"] == pytest.approx(float(wm.fro_N[0]) / 13.0)
    with pytest.raises(ValidationError, match="base norm"):
        weight_metrics(deltas, {"layer0": 1.0})


def test_many_models_span_several_blocks_and_chunks_in_order():
    # 1,500 models × 2 modules = 3,000 r×r problems: two blocks of the spectral loop
    g = torch.Generator().manual_seed(14)
    deltas = {m: _level(g, 1500, 8, 10, 9) for m in ("a", "b")}  # 8×8 cores: 2,048 per block
    wm = weight_metrics(deltas)
    for j, lv in enumerate(deltas.values()):
        sv = torch.linalg.svdvals(lv.materialize())
        torch.testing.assert_close(wm.spectral_NM[:, j], sv[:, 0], rtol=SPECTRAL_RTOL, atol=0)
    chunks = [
        {
            m: LoraBatch(d.A_NRI[k : k + 400], d.B_NOR[k : k + 400], d.scale_N[k : k + 400])
            for m, d in deltas.items()
        }
        for k in range(0, 1500, 400)
    ]
    for workers in (1, 2):
        parts = list(weight_metrics_chunks(iter(chunks), None, workers=workers))
        assert [p.fro_NM.shape[0] for p in parts] == [400, 400, 400, 300]
        torch.testing.assert_close(torch.cat([p.fro_NM for p in parts]), wm.fro_NM)
        torch.testing.assert_close(torch.cat([p.spectral_NM for p in parts]), wm.spectral_NM)
    with pytest.raises(ValidationError, match="workers"):
        list(weight_metrics_chunks(chunks, None, workers=0))


def test_modules_of_different_ranks_in_one_call():
    g = torch.Generator().manual_seed(15)
    a, b, c = _level(g, 7, 4, 9, 6), _level(g, 7, 4, 9, 6), _level(g, 7, 2, 9, 6)
    deltas = {"single": a, "stack": [b, c], "other": _level(g, 7, 6, 5, 5)}
    together = weight_metrics(deltas)
    for j, (name, d) in enumerate(deltas.items()):
        alone = weight_metrics({name: d})
        torch.testing.assert_close(together.spectral_NM[:, j], alone.spectral_NM[:, 0])
        torch.testing.assert_close(together.stable_rank_NM[:, j], alone.stable_rank_NM[:, 0])


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1), r_own=st.integers(1, 5), shared=st.integers(0, 2), r_p=st.integers(1, 5)
)
def test_parent_relative_metrics_on_stacks(seed, r_own, shared, r_p):
    g = torch.Generator().manual_seed(seed)
    n, d_in, d_out = 3, 7, 5
    common = [_level(g, n, 2 + i, d_in, d_out) for i in range(shared)]
    child = [*common, _level(g, n, r_own, d_in, d_out)]
    parent = [*common, _level(g, n, r_p, d_in, d_out)] if shared == 0 else common
    Wc, Wp = _dense(child), _dense(parent)
    rm = relative_metrics({"m": child}, {"m": parent}, {"m": 10.0})
    torch.testing.assert_close(rm.inner_NM[:, 0], (Wc * Wp).sum((-2, -1)), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(rm.distance_NM[:, 0], torch.linalg.matrix_norm(Wc - Wp), rtol=1e-9, atol=1e-9)
    cos = (Wc * Wp).sum((-2, -1)) / (torch.linalg.matrix_norm(Wc) * torch.linalg.matrix_norm(Wp))
    torch.testing.assert_close(rm.cosine_N, cos, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(rm.rel_distance_N, rm.distance_N / 10.0)


def test_shared_levels_cancel_exactly_in_float32():
    # lineage: child = parent + a tiny own level. ‖c‖² + ‖p‖² − 2⟨c,p⟩ would lose the answer in float32.
    g = torch.Generator().manual_seed(4)
    big = LoraBatch.of(torch.randn(4, 8, 256, generator=g), torch.randn(4, 688, 8, generator=g), 1.0)
    tiny = LoraBatch.of(torch.randn(4, 8, 256, generator=g), torch.randn(4, 688, 8, generator=g), 1e-4)
    rm = relative_metrics({"m": [big, tiny]}, {"m": [big]})
    exact = torch.linalg.matrix_norm(tiny.materialize())
    torch.testing.assert_close(rm.distance_NM[:, 0], exact, rtol=1e-5, atol=0)
    assert torch.all(rm.cosine_N > 0.999999)


def test_parent_none_is_the_base():
    g = torch.Generator().manual_seed(5)
    lv = _level(g, 2, 3, 4, 5)
    rm = relative_metrics({"m": lv}, None)
    torch.testing.assert_close(rm.distance_NM[:, 0], torch.linalg.matrix_norm(lv.materialize()))
    assert torch.all(rm.cosine_N == 0) and torch.all(rm.parent_fro_NM == 0)


def test_base_norms_from_a_state_dict_and_batching_adapters():
    base = nn.ModuleDict({"q_proj": nn.Linear(6, 4, bias=False), "v_proj": nn.Linear(6, 4, bias=False)})
    sd = base.state_dict()
    norms = base_module_norms(sd, ["q_proj", "v_proj"])
    assert norms["q_proj"] == pytest.approx(float(sd["q_proj.weight"].double().norm()))
    assert cached_base_norms("tiny@test", sd, ["q_proj"]) == {"q_proj": norms["q_proj"]}
    with pytest.raises(ValidationError, match="no weight"):
        base_module_norms(sd, ["k_proj"])

    g = torch.Generator().manual_seed(6)
    adapters = [
        {m: (torch.randn(2, 6, generator=g), torch.randn(4, 2, generator=g)) for m in ("q_proj", "v_proj")}
        for _ in range(3)
    ]
    batches = lora_batches(adapters, [1.0, 2.0, 0.5])
    wm = weight_metrics(batches, norms)
    want = torch.linalg.matrix_norm(
        0.5 * adapters[2]["v_proj"][1].double() @ adapters[2]["v_proj"][0].double()
    )
    assert float(wm.fro_NM[2, 1]) == pytest.approx(float(want), rel=1e-6)
    with pytest.raises(ValidationError, match="other modules"):
        lora_batches([adapters[0], {"q_proj": adapters[0]["q_proj"]}], [1.0, 1.0])


def test_bad_shapes_are_refused():
    with pytest.raises(ValidationError, match="disagree"):
        LoraBatch.of(torch.zeros(2, 3, 4), torch.zeros(2, 5, 2), 1.0)
    with pytest.raises(ValidationError, match="scale"):
        LoraBatch.of(torch.zeros(2, 3, 4), torch.zeros(2, 5, 3), [1.0, 2.0, 3.0])
    a, b = (
        LoraBatch.of(torch.zeros(2, 3, 4), torch.zeros(2, 5, 3), 1.0),
        LoraBatch.of(torch.zeros(2, 3, 6), torch.zeros(2, 5, 3), 1.0),
    )
    with pytest.raises(ValidationError, match="stack levels disagree"):
        weight_metrics({"m": [a, b]})
    with pytest.raises(ValidationError, match="same models"):
        weight_metrics({"m": a, "n": LoraBatch.of(torch.zeros(3, 3, 4), torch.zeros(3, 5, 3), 1.0)})


# -------------------------------------------------------------------------------------- function space
def _logits(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * 3


def test_zero_adapter_gives_zero_kl_and_full_agreement():
    g = torch.Generator().manual_seed(7)
    base = log_probs(_logits(g, 2, 5, 50).float())
    mask = torch.ones(2, 5, dtype=torch.bool)
    model = base.clone().expand(3, 2, 5, 50)  # three models identical to the base
    for ref in (base, TopKCache.from_logits(base, k=8)):
        fm = function_metrics(model, ref, mask)
        # Exactly zero against full log-probs; float rounding of the tail mass against a top-k cache.
        assert torch.all(fm.kl.abs() <= 1e-6) and torch.all(fm.tv.abs() <= 1e-6)
        assert torch.all(fm.kl_upper >= fm.kl)
        assert torch.all(fm.top1_agreement == 1)
        assert torch.all(fm.tokens == 10)


@pytest.mark.parametrize("shift", [-4.0, -0.5, 0.3, 2.0, 7.0])
def test_kl_of_a_one_token_logit_shift_is_analytic(shift):
    g = torch.Generator().manual_seed(8)
    z = _logits(g, 1, 4, 30)
    j = 11
    p_j = torch.softmax(z, -1)[..., j]
    bumped = z.clone()
    bumped[..., j] += shift
    # KL(p ‖ q) with q ∝ p·e^{c·[v=j]}: log(1 − p_j + p_j e^c) − c·p_j
    Z = 1 - p_j + p_j * math.exp(shift)
    kl = torch.log(Z) - shift * p_j
    tv = (1 - p_j) * (1 - 1 / Z).abs()
    torch.testing.assert_close(forward_kl(log_probs(z), log_probs(bumped)), kl, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(total_variation(log_probs(z), log_probs(bumped)), tv, rtol=1e-10, atol=1e-13)


def test_topk_cache_brackets_the_exact_kl_and_tv():
    g = torch.Generator().manual_seed(9)
    z = _logits(g, 4, 16, 64)
    for k in (1, 4, 16, 63, 64):
        cache = TopKCache.from_logits(z, k)
        for scale in (0.1, 1.0, 3.0):
            model = log_probs(z + scale * _logits(g, 4, 16, 64))
            exact_kl, exact_tv = forward_kl(log_probs(z), model), total_variation(log_probs(z), model)
            kl, tv = forward_kl_topk(cache, model), total_variation_topk(cache, model)
            assert torch.all(kl.lower <= exact_kl + 1e-12), (k, scale)
            assert torch.all(exact_kl <= kl.upper + 1e-12), (k, scale)
            assert torch.all(tv.lower <= exact_tv + 1e-12) and torch.all(exact_tv <= tv.upper + 1e-12)
            if k == 64:  # nothing in the tail: exact
                torch.testing.assert_close(kl.lower, exact_kl)
                torch.testing.assert_close(kl.upper, exact_kl)


def test_topk_bound_is_tight_when_the_tail_is_small():
    g = torch.Generator().manual_seed(10)
    z = _logits(g, 2, 8, 200)
    z[..., :16] += 25.0  # the first 16 tokens hold all but ~1e-9 of the base's mass
    cache = TopKCache.from_logits(z, k=16)
    assert torch.all(cache.tail_logp_BT.exp() < 1e-8)
    model = log_probs(z + _logits(g, 2, 8, 200))
    exact = forward_kl(log_probs(z), model)
    kl = forward_kl_topk(cache, model)
    assert torch.all(exact - kl.lower < 1e-6)
    assert torch.all(kl.upper - kl.lower < 1e-6)


def test_tail_mass_is_exact_not_one_minus_the_head():
    z = torch.zeros(1, 1, 10, dtype=torch.float64)
    z[..., 0] = 40.0  # tail mass 9e^-40 ≈ 4e-17: 1 − Σ head would round to 0
    cache = TopKCache.from_logits(z, k=1)
    torch.testing.assert_close(
        cache.tail_logp_BT, torch.log(torch.tensor([[9.0]], dtype=torch.float64)) - 40.0, rtol=1e-9, atol=0
    )
    with pytest.raises(ValidationError, match="top_k"):
        TopKCache.from_logits(z, k=11)


def test_padding_is_masked_even_when_it_holds_garbage():
    g = torch.Generator().manual_seed(11)
    base, model = _logits(g, 2, 6, 20), _logits(g, 2, 6, 20)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    garbage = model.clone()
    garbage[1, 3:] = float("nan")
    a = function_metrics(log_probs(model), log_probs(base), mask)
    b = function_metrics(log_probs(garbage), log_probs(base), mask)
    for f in ("kl", "tv", "top1_agreement"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f))
    want = forward_kl(log_probs(base), log_probs(model))[mask].mean()
    torch.testing.assert_close(a.kl, want)
    with pytest.raises(ValidationError, match="no scored tokens"):
        function_metrics(log_probs(model), log_probs(base), torch.zeros(2, 6, dtype=torch.bool))


def test_many_models_in_one_batch_equal_each_model_alone():
    g = torch.Generator().manual_seed(12)
    base = log_probs(_logits(g, 3, 7, 40))
    models = log_probs(_logits(g, 5, 3, 7, 40))
    mask = torch.rand(3, 7, generator=g) > 0.2
    cache = TopKCache.from_logits(base, 6)
    together = function_metrics(models, cache, mask)
    for i in range(5):
        alone = function_metrics(models[i], cache, mask)
        torch.testing.assert_close(together.kl[i], alone.kl)
        torch.testing.assert_close(together.top1_agreement[i], alone.top1_agreement)
    # top-1 agreement from the cache is exact
    exact = function_metrics(models, base, mask)
    torch.testing.assert_close(together.top1_agreement, exact.top1_agreement)


def test_top1_agreement_counts_ties_in_the_reference_as_agreement():
    ref = torch.log(torch.tensor([[[0.4, 0.4, 0.2]]], dtype=torch.float64))
    model = torch.log(torch.tensor([[[0.1, 0.6, 0.3]]], dtype=torch.float64))
    assert float(top1_agreement(ref, model)) == 1.0


def test_general_text_nll_shift():
    g = torch.Generator().manual_seed(13)
    base = log_probs(_logits(g, 2, 9, 30))
    models = log_probs(_logits(g, 4, 2, 9, 30))
    targets = torch.randint(0, 30, (2, 9), generator=g)
    targets[0, -1] = -100  # padding label, masked below
    mask = targets >= 0
    nll, dnll = nll_shift(models, targets, mask, base)
    want = -models.gather(-1, targets.clamp_min(0).expand(4, 2, 9)[..., None])[..., 0][:, mask].mean(-1)
    torch.testing.assert_close(nll, want)
    base_nll = -base.gather(-1, targets.clamp_min(0)[..., None])[..., 0][mask].mean()
    torch.testing.assert_close(dnll, want - base_nll)
    cache = TopKCache.from_logits(base, 4, targets)
    torch.testing.assert_close(nll_shift(models, targets, mask, cache)[1], dnll)
    _, zero = nll_shift(base, targets, mask, cache)
    assert float(zero) == 0.0
    with pytest.raises(ValidationError, match="no target"):
        nll_shift(models, targets, mask, TopKCache.from_logits(base, 4))
