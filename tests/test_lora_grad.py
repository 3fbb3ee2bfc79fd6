"""Training through the engine: gradients of a packed batch equal each adapter trained alone, reach
only trainable slots, and equal PEFT's (with frozen ancestors merged into the base)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _tiny import one_thread, random_lora, tiny_llama
from peft import PeftModel

from fleet.lora import AdapterWeights, LoraEngine

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

T = 8


def small_llama():
    return tiny_llama(vocab=96, hidden=48, layers=2, heads=4, kv_heads=2, intermediate=96, seed=5)


def member_loss(logits: torch.Tensor, ids: torch.Tensor, rows_of: dict[str, list[int]]) -> torch.Tensor:
    """Σ over members of that member's mean next-token loss (each member normalises by its own rows)."""
    total = logits.new_zeros(())
    for rows in rows_of.values():
        lg, tgt = logits[rows, :-1], ids[rows, 1:]
        total = total + F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1))
    return total


def slot_grads(engine: LoraEngine, key: str) -> dict[str, torch.Tensor]:
    """Gradient of one member in PEFT names and orientation (A [r, d_in], B [d_out, r])."""
    slot, rank = engine.slot(key) + 1, engine.rank(key)
    out = {}
    for name in engine.adapted_modules(key):
        layer = engine.layers[name]
        out[f"{name}.lora_A"] = layer.At_SDR.grad[slot, :, :rank].t()
        out[f"{name}.lora_B"] = layer.Bt_SRO.grad[slot, :rank].t()
    return out


@pytest.fixture(scope="module")
def setup():
    plain = small_llama()
    engine = LoraEngine(copy.deepcopy(plain), max_slots=6, max_rank=8)
    adapters = {
        "co": random_lora(plain, rank=4, seed=1),
        "team": random_lora(plain, rank=8, seed=2),
        "solo": random_lora(plain, rank=8, seed=3),
        "dana": random_lora(plain, rank=4, seed=4),  # under co + team
        "eve": random_lora(plain, rank=2, seed=5),  # under co only
    }
    for key, a in adapters.items():
        engine.load(key, a, trainable=key in ("solo", "dana", "eve"))
    s = engine.slot
    stacks = {
        "solo": [-1, -1, s("solo")],
        "dana": [s("co"), s("team"), s("dana")],
        "eve": [s("co"), -1, s("eve")],
    }
    rows_of = {"solo": [0, 3], "dana": [1, 4, 6], "eve": [2, 5]}
    slots = [None] * 7
    for key, rows in rows_of.items():
        for r in rows:
            slots[r] = stacks[key]
    ids = torch.randint(3, 96, (7, T), generator=torch.Generator().manual_seed(0))
    return plain, engine, adapters, torch.tensor(slots), rows_of, ids


def test_packed_gradients_equal_each_member_alone(setup) -> None:
    plain, engine, adapters, slots, rows_of, ids = setup
    for p in engine.model.parameters():
        p.grad = None
    with engine.rows(slots):
        member_loss(engine.model(ids).logits, ids, rows_of).backward()
    packed = {key: {k: g.clone() for k, g in slot_grads(engine, key).items()} for key in rows_of}

    # Frozen ancestors and the base get nothing.
    for key in ("co", "team"):
        assert all(float(g.abs().max()) == 0.0 for g in slot_grads(engine, key).values())
    assert all(p.grad is None for n, p in engine.model.named_parameters() if "_S" not in n.rsplit(".", 1)[-1])

    for key, rows in rows_of.items():
        for p in engine.model.parameters():
            p.grad = None
        with engine.rows(slots[rows]):
            member_loss(engine.model(ids[rows]).logits, ids[rows], {key: list(range(len(rows)))}).backward()
        alone = slot_grads(engine, key)
        for name, g in alone.items():
            assert float(g.abs().max()) > 0
            assert torch.allclose(packed[key][name], g, rtol=1e-5, atol=1e-7), (key, name)


def _merged_base(plain, levels: list[AdapterWeights]):
    """The base with frozen ancestors folded into its weights: W + Σ s·B·A."""
    model = copy.deepcopy(plain)
    with torch.no_grad():
        for a in levels:
            for name, (A, B) in a.modules().items():
                model.get_submodule(name).weight += a.scale * (B @ A)
    return model


@pytest.mark.parametrize("key,ancestors", [("solo", []), ("dana", ["co", "team"]), ("eve", ["co"])])
def test_gradients_equal_peft_training_the_adapter_alone(setup, tmp_path, key, ancestors) -> None:
    plain, engine, adapters, slots, rows_of, ids = setup
    rows = rows_of[key]
    for p in engine.model.parameters():
        p.grad = None
    with engine.rows(slots[rows]):
        member_loss(engine.model(ids[rows]).logits, ids[rows], {key: list(range(len(rows)))}).backward()
    ours = slot_grads(engine, key)

    base = _merged_base(plain, [adapters[a] for a in ancestors])
    peft_model = PeftModel.from_pretrained(base, adapters[key].to_peft_dir(tmp_path), is_trainable=True)
    peft_model.eval()  # no dropout either way (lora_dropout is 0)
    logits = peft_model(input_ids=ids[rows]).logits
    member_loss(logits, ids[rows], {key: list(range(len(rows)))}).backward()
    theirs = {
        n.removeprefix("base_model.model.").removesuffix(".default.weight"): p.grad
        for n, p in peft_model.named_parameters()
        if "lora_" in n
    }
    assert theirs.keys() == ours.keys()
    for name, g in theirs.items():
        assert torch.allclose(ours[name], g, rtol=1e-4, atol=1e-6), name


def test_no_graph_under_inference_mode_and_frozen_engine(setup) -> None:
    plain, engine, adapters, slots, rows_of, ids = setup
    with torch.inference_mode(), engine.rows(slots):
        out = engine.model(ids).logits
    assert not out.requires_grad
    engine.set_trainable("solo", False)
    engine.set_trainable("dana", False)
    engine.set_trainable("eve", False)
    try:
        layer = next(iter(engine.layers.values()))
        assert not layer.At_SDR.requires_grad
        with engine.rows(slots):
            assert not engine.model(ids).logits.requires_grad
    finally:
        for key in ("solo", "dana", "eve"):
            engine.set_trainable(key, True)


def test_one_token_rows_use_the_decode_kernel_and_still_train_like_peft(setup, tmp_path) -> None:
    plain, engine, adapters, slots, rows_of, ids = setup
    rows = rows_of["solo"]
    for p in engine.model.parameters():
        p.grad = None
    with engine.rows(slots[rows]):
        engine.model(ids[rows, :1]).logits.logsumexp(-1).sum().backward()
    ours = slot_grads(engine, "solo")
    peft_model = PeftModel.from_pretrained(
        copy.deepcopy(plain), adapters["solo"].to_peft_dir(tmp_path), is_trainable=True
    )
    peft_model.eval()
    peft_model(input_ids=ids[rows, :1]).logits.logsumexp(-1).sum().backward()
    for n, p in peft_model.named_parameters():
        if "lora_" in n:
            name = n.removeprefix("base_model.model.").removesuffix(".default.weight")
            assert torch.allclose(ours[name], p.grad, rtol=1e-4, atol=1e-6), name
