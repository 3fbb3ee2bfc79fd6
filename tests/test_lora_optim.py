"""SlotAdamW equals torch.optim.AdamW run per member, with per-member schedules and clipping."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _tiny import one_thread, random_lora, tiny_llama
from peft import PeftModel

from fleet.errors import ValidationError
from fleet.lora import LoraEngine, SlotAdamW

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

BETAS, EPS, WD = (0.9, 0.99), 1e-8, 0.01


def small_llama():
    return tiny_llama(vocab=96, hidden=48, layers=2, heads=4, intermediate=96, seed=9)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def test_packed_training_equals_each_member_with_peft_and_torch_adamw(tmp_path) -> None:
    plain = small_llama()
    members = {"a": random_lora(plain, rank=4, seed=1), "b": random_lora(plain, rank=8, seed=2)}
    rows = {"a": [0, 2], "b": [1, 3, 4]}
    ids = torch.randint(3, 96, (5, 10), generator=torch.Generator().manual_seed(1))
    lrs = {"a": [1e-2, 5e-3, 2e-3], "b": [3e-3, 3e-3, 1e-3]}  # each member its own schedule
    clip = {"a": 1e-3, "b": 1e3}  # a is clipped every step, b never

    engine = LoraEngine(copy.deepcopy(plain), max_slots=4, max_rank=8)
    for key, a in members.items():
        engine.load(key, a, trainable=True)
    opt = SlotAdamW(engine, list(members), betas=BETAS, eps=EPS, weight_decay=WD)
    slots = torch.tensor(
        [[engine.slot("a")], [engine.slot("b")], [engine.slot("a")], [engine.slot("b")], [engine.slot("b")]]
    )
    norms_seen = []
    for step in range(3):
        opt.set_lr({k: v[step] for k, v in lrs.items()})
        with engine.rows(slots):
            logits = engine.model(ids).logits
        loss = sum(lm_loss(logits[r], ids[r]) for r in rows.values())
        loss.backward()
        norms_seen.append(opt.clip_(clip))
        opt.step()
        opt.zero_grad()
    assert all(n["a"] > clip["a"] for n in norms_seen)

    for key, adapter in members.items():
        model = PeftModel.from_pretrained(
            copy.deepcopy(plain), adapter.to_peft_dir(tmp_path / key), is_trainable=True
        )
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        ref_opt = torch.optim.AdamW(params.values(), lr=lrs[key][0], betas=BETAS, eps=EPS, weight_decay=WD)
        r = rows[key]
        for step in range(3):
            for group in ref_opt.param_groups:
                group["lr"] = lrs[key][step]
            lm_loss(model(input_ids=ids[r]).logits, ids[r]).backward()
            norm = torch.nn.utils.clip_grad_norm_(params.values(), clip[key])
            assert abs(float(norm) - norms_seen[step][key]) <= 1e-4 * float(norm)
            ref_opt.step()
            ref_opt.zero_grad()
        trained = engine.export(key).tensors
        for name, p in params.items():
            ours = trained[name.replace(".default", "")]
            assert torch.allclose(ours, p.detach(), rtol=1e-4, atol=1e-6), name
            assert not torch.equal(ours, adapter.tensors[name.replace(".default", "")])  # it did train


def _synthetic_grads(engine: LoraEngine, keys: list[str], seed: int) -> None:
    """Random gradients on each member's real (unpadded) entries, zero elsewhere."""
    g = torch.Generator().manual_seed(seed)
    for layer in engine.layers.values():
        layer.At_SDR.grad = torch.zeros_like(layer.At_SDR)
        layer.Bt_SRO.grad = torch.zeros_like(layer.Bt_SRO)
        for key in keys:
            s, r = engine.slot(key) + 1, engine.rank(key)
            layer.At_SDR.grad[s, :, :r] = torch.randn(layer.d_in, r, generator=g)
            layer.Bt_SRO.grad[s, :r] = torch.randn(r, layer.d_out, generator=g)


def _engine(plain):
    engine = LoraEngine(copy.deepcopy(plain), max_slots=3, max_rank=8)
    engine.load("x", random_lora(plain, rank=3, seed=4), trainable=True)
    engine.load("y", random_lora(plain, rank=8, seed=5), trainable=True)
    return engine


def test_step_matches_torch_adamw_exactly_and_resumes_from_state_dict() -> None:
    plain = small_llama()
    keys = ["x", "y"]
    lrs = [{"x": 1e-2, "y": 1e-3}, {"x": 5e-3, "y": 2e-3}, {"x": 1e-3, "y": 4e-3}]

    # Reference: one torch AdamW per member over plain copies of that member's tensors.
    engine = _engine(plain)
    refs = {k: {n: t.clone().requires_grad_(True) for n, t in engine.export(k).tensors.items()} for k in keys}
    ref_opts = {
        k: torch.optim.AdamW(refs[k].values(), lr=1.0, betas=BETAS, eps=EPS, weight_decay=WD) for k in keys
    }
    opt = SlotAdamW(engine, keys, betas=BETAS, eps=EPS, weight_decay=WD)
    for step, lr in enumerate(lrs):
        _synthetic_grads(engine, keys, seed=step)
        for k in keys:
            for name, A_or_B in _grads_in_peft_names(engine, k).items():
                refs[k][name].grad = A_or_B.clone()
            ref_opts[k].param_groups[0]["lr"] = lr[k]
            ref_opts[k].step()
        opt.set_lr(lr)
        opt.step()
        if step == 1:
            saved_sd, saved = opt.state_dict(), {k: engine.export(k) for k in keys}
    for k in keys:
        exported = engine.export(k).tensors
        for name, t in refs[k].items():
            assert torch.allclose(exported[name], t.detach(), rtol=1e-6, atol=1e-7), (k, name)

    # Resume: a new engine and optimizer from the step-2 checkpoint reach the same weights.
    resumed = _engine(plain)
    for k in keys:
        resumed.load(k, saved[k], trainable=True)
    opt2 = SlotAdamW(resumed, keys)
    opt2.load_state_dict(saved_sd)
    assert saved_sd["members"]["x"]["step"] == 2
    _synthetic_grads(resumed, keys, seed=2)
    opt2.set_lr(lrs[2])
    opt2.step()
    for k in keys:
        a, b = engine.export(k).tensors, resumed.export(k).tensors
        assert all(torch.allclose(a[n], b[n], rtol=1e-6, atol=1e-7) for n in a)


def _grads_in_peft_names(engine: LoraEngine, key: str) -> dict[str, torch.Tensor]:
    slot, rank = engine.slot(key) + 1, engine.rank(key)
    out = {}
    for name in engine.adapted_modules(key):
        layer = engine.layers[name]
        out[f"base_model.model.{name}.lora_A.weight"] = layer.At_SDR.grad[slot, :, :rank].t()
        out[f"base_model.model.{name}.lora_B.weight"] = layer.Bt_SRO.grad[slot, :rank].t()
    return out


def test_members_are_independent_and_padding_stays_zero() -> None:
    plain = small_llama()
    engine = _engine(plain)
    opt = SlotAdamW(engine, ["x", "y"], weight_decay=WD)
    before_y = engine.export("y").tensors
    _synthetic_grads(engine, ["x", "y"], seed=0)
    norms = opt.grad_norms()
    pre = opt.clip_({"x": 0.5})  # clipping x must not touch y's gradient
    assert pre == norms and abs(opt.grad_norms()["x"] - 0.5) < 1e-4 and opt.grad_norms()["y"] == norms["y"]
    opt.set_lr({"x": 1e-2, "y": 1e-2})
    opt.step(keys=["x"])  # only x steps; y keeps weights and step count
    assert all(torch.equal(before_y[n], t) for n, t in engine.export("y").tensors.items())
    assert opt.state_dict()["members"]["y"]["step"] == 0
    slot_x = engine.slot("x") + 1
    for layer in engine.layers.values():  # rank 3 in a max-rank-8 pool: padded entries stay exactly 0
        assert float(layer.At_SDR.data[slot_x, :, 3:].abs().max()) == 0.0
        assert float(layer.Bt_SRO.data[slot_x, 3:].abs().max()) == 0.0
    engine.load("z", random_lora(plain, rank=2, seed=6))
    with pytest.raises(ValidationError, match="not trainable"):
        SlotAdamW(engine, ["z"])
