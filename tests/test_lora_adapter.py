"""AdapterWeights: PEFT's directory format both ways, stacks, fresh adapters, and refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _tiny import one_thread, random_lora, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model

from fleet.errors import CapacityError, UnsupportedAdapterError
from fleet.lora import AdapterWeights, LoraEngine

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def plain():
    return tiny_llama(vocab=96, hidden=48, layers=2, heads=4, intermediate=96, seed=21)


def ids() -> torch.Tensor:
    return torch.randint(3, 96, (3, 7), generator=torch.Generator().manual_seed(2))


def peft_made(plain, tmp_path, **config) -> tuple[PeftModel, str]:
    """An adapter made by PEFT itself (get_peft_model) with random B, saved with save_pretrained."""
    model = get_peft_model(copy.deepcopy(plain), LoraConfig(**{"r": 4, "lora_alpha": 8, **config}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    model.save_pretrained(tmp_path)
    return model.eval(), str(tmp_path)


def test_import_of_a_peft_adapter_gives_identical_logits(plain, tmp_path) -> None:
    peft_model, path = peft_made(plain, tmp_path, target_modules=TARGETS, use_rslora=True, r=6, lora_alpha=12)
    weights = AdapterWeights.from_peft_dir(path)
    assert weights.rank == 6 and weights.use_rslora and weights.scale == pytest.approx(12 / 6**0.5)
    engine = LoraEngine(copy.deepcopy(plain), max_slots=2, max_rank=8)
    slot = engine.load("imported@v1", weights)
    with torch.no_grad():
        ref = peft_model(input_ids=ids()).logits
        with engine.rows([[slot]] * 3):
            out = engine.model(ids()).logits
        base = plain(ids()).logits
    assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-5
    assert float((ref - base).abs().max()) > 1e-3  # the adapter does change the output


def test_bytes_and_directory_round_trips_are_exact(plain, tmp_path) -> None:
    a = random_lora(plain, rank=3, alpha=5.0, seed=1)
    config, blob = a.to_bytes("tiny-base")
    b = AdapterWeights.from_bytes(config, blob)
    c = AdapterWeights.from_peft_dir(a.to_peft_dir(tmp_path, "tiny-base"))
    for other in (b, c):
        assert (other.rank, other.alpha, other.use_rslora, other.target_modules) == (
            3,
            5.0,
            False,
            sorted(TARGETS),
        )
        assert all(torch.equal(other.tensors[k], a.tensors[k]) for k in a.tensors)
    assert json.loads(config)["base_model_name_or_path"] == "tiny-base"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_stack_is_one_lora_equal_to_the_sum_of_its_levels(plain) -> None:
    levels = [
        random_lora(plain, rank=2, alpha=7.0, seed=1),
        random_lora(plain, rank=4, use_rslora=True, seed=2, target_modules=("q_proj", "down_proj")),
        random_lora(plain, rank=3, seed=3),
    ]
    stack = AdapterWeights.stack(levels)
    assert stack.rank == 9 and stack.scale == 1.0
    for name, (A, B) in stack.modules().items():
        expected = sum(
            lv.scale * (lv.modules()[name][1] @ lv.modules()[name][0])
            for lv in levels
            if name in lv.modules()
        )
        assert torch.allclose(stack.scale * (B @ A), expected, atol=1e-6)


def test_fresh_adapter_is_initialised_like_peft(plain) -> None:
    a = AdapterWeights.fresh(plain, rank=4, alpha=8, seed=0)
    peft_model = get_peft_model(copy.deepcopy(plain), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    theirs = {n.replace(".default", ""): p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert theirs.keys() == a.tensors.keys()
    for name, t in a.tensors.items():
        if "lora_B" in name:
            assert float(t.abs().max()) == 0.0
        else:  # same distribution: uniform(±1/sqrt(d_in)), as PEFT's kaiming_uniform_(a=sqrt(5))
            bound = 1 / t.shape[1] ** 0.5
            assert float(t.abs().max()) <= bound and float(theirs[name].abs().max()) <= bound
            assert float(t.abs().max()) > 0.8 * bound
    assert torch.equal(AdapterWeights.fresh(plain, rank=4, alpha=8, seed=0).tensors[name], a.tensors[name])


@pytest.mark.parametrize(
    "config,match",
    [
        ({"use_dora": True, "target_modules": TARGETS}, "DoRA"),
        ({"bias": "lora_only", "target_modules": TARGETS}, "bias"),
        ({"target_modules": ["embed_tokens"]}, "embedding"),
        ({"target_modules": TARGETS, "modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": TARGETS, "layers_to_transform": [0]}, "layers_to_transform"),
        ({"target_modules": TARGETS, "rank_pattern": {"q_proj": 2}}, "rank_pattern"),
    ],
)
def test_unsupported_peft_adapters_are_refused(plain, tmp_path, config, match) -> None:
    _, path = peft_made(plain, tmp_path, **config)
    with pytest.raises(UnsupportedAdapterError, match=match):
        AdapterWeights.from_peft_dir(path)


def test_malformed_adapters_are_refused(plain, tmp_path) -> None:
    a = random_lora(plain, rank=2, seed=1)
    config, blob = a.to_bytes()
    ia3 = json.dumps({**json.loads(config), "peft_type": "IA3"}).encode()
    with pytest.raises(UnsupportedAdapterError, match="peft_type"):
        AdapterWeights.from_bytes(ia3, blob)
    name_a = next(k for k in a.tensors if "q_proj.lora_A" in k)
    missing = {k: v for k, v in a.tensors.items() if k != name_a}
    with pytest.raises(UnsupportedAdapterError, match="missing tensor"):
        AdapterWeights(2, 4.0, False, TARGETS, missing)
    extra = {**a.tensors, name_a.replace("q_proj", "x_proj"): torch.zeros(2, 48)}
    with pytest.raises(UnsupportedAdapterError, match="extra tensor"):
        AdapterWeights(2, 4.0, False, TARGETS, extra)
    wrong_rank = {**a.tensors, name_a: torch.zeros(3, 48)}
    with pytest.raises(UnsupportedAdapterError, match="r=2"):
        AdapterWeights(2, 4.0, False, TARGETS, wrong_rank)


def test_engine_refuses_adapters_that_do_not_fit_its_base(plain) -> None:
    engine = LoraEngine(copy.deepcopy(plain), target_modules=["q_proj", "v_proj"], max_slots=2, max_rank=4)
    other_base = tiny_llama(vocab=96, hidden=64, layers=2, heads=4, intermediate=96)
    with pytest.raises(UnsupportedAdapterError, match="different base"):
        engine.check(random_lora(other_base, rank=2, target_modules=("q_proj",)))
    with pytest.raises(UnsupportedAdapterError, match="different base"):
        engine.load("wrong", random_lora(other_base, rank=2, target_modules=("q_proj",)))
    engine.check(random_lora(plain, rank=2, target_modules=("q_proj", "v_proj")))  # fits: no error
    with pytest.raises(UnsupportedAdapterError, match="add 'o_proj'"):
        engine.load("more", random_lora(plain, rank=2, target_modules=("q_proj", "o_proj")))
    partial = random_lora(plain, rank=2, target_modules=("q_proj",))
    partial.tensors = {k: v for k, v in partial.tensors.items() if ".layers.1." not in k}
    with pytest.raises(UnsupportedAdapterError, match="no tensors"):
        engine.load("partial", partial)
    with pytest.raises(CapacityError, match="max_rank"):
        engine.load("big", random_lora(plain, rank=8, target_modules=("q_proj",)))
    with pytest.raises(UnsupportedAdapterError, match="not nn.Linear"):
        LoraEngine(copy.deepcopy(plain), target_modules=["mlp"], max_slots=1, max_rank=4)
    assert engine.free_slots == 2  # nothing half-loaded
