"""The engine's forward against PEFT: every row of a mixed batch equals PEFT's output for that
row's adapter alone (a stack exported as one LoRA through AdapterWeights.stack)."""

from __future__ import annotations

import copy
import os

import psutil
import pytest
import torch
from _tiny import one_thread, random_lora, tiny_llama
from hypothesis import example, given, settings
from hypothesis import strategies as st
from peft import PeftModel

from fleet.errors import CapacityError, NotFoundError, ValidationError
from fleet.lora import AdapterWeights, LoraEngine

N_IND, N_TEAM, N_CO = 64, 4, 2
RANKS = (1, 2, 3, 4, 8, 16)
MAX_RANK = 16
SEQ_LEN, N_SEQS = 9, 6
REL_TOL = 1e-5


def small_llama(seed: int = 0):
    # Grouped-query attention (4 query heads, 2 kv heads) so that path is covered too.
    return tiny_llama(vocab=128, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, seed=seed)


class Oracle:
    """Adapters, an engine holding all of them, and PEFT reference logits computed on demand."""

    def __init__(self, tmp_path_factory) -> None:
        self.plain = small_llama()
        self.tmp = tmp_path_factory.mktemp("peft")
        self.engine = LoraEngine(
            copy.deepcopy(self.plain), max_slots=N_IND + N_TEAM + N_CO + 2, max_rank=MAX_RANK
        )
        self.adapters: dict[str, AdapterWeights] = {}
        for i in range(N_IND):
            r = RANKS[i % len(RANKS)]
            self.adapters[f"ind{i}"] = random_lora(
                self.plain, rank=r, alpha=[r, 2 * r, 16][i % 3], use_rslora=i % 5 == 0, seed=i
            )
        for j in range(N_TEAM):
            self.adapters[f"team{j}"] = random_lora(
                self.plain, rank=4, seed=100 + j, target_modules=("q_proj", "v_proj", "down_proj")
            )
        for k in range(N_CO):
            self.adapters[f"co{k}"] = random_lora(self.plain, rank=8, alpha=4, seed=200 + k)
        for key, a in self.adapters.items():
            self.engine.load(key, a)
        self.seqs = torch.randint(3, 128, (N_SEQS, SEQ_LEN), generator=torch.Generator().manual_seed(7))
        self.refs: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def stack_of(i: int, shape: str) -> tuple[str | None, str | None, str | None]:
        """(company, team, individual) keys of one of the stack shapes rows may use."""
        co, team, ind = f"co{i % N_CO}", f"team{i % N_TEAM}", f"ind{i}"
        return {
            "base": (None, None, None),
            "ind": (None, None, ind),
            "full": (co, team, ind),
            "no_team": (co, None, ind),
            "team_only": (None, team, None),
            "co_team": (co, team, None),
        }[shape]

    def slots(self, stack) -> list[int]:
        return [-1 if k is None else self.engine.slot(k) for k in stack]

    def reference(self, stack) -> torch.Tensor:
        """PEFT's logits [N_SEQS, SEQ_LEN, V] for this stack alone."""
        if stack not in self.refs:
            levels = [self.adapters[k] for k in stack if k is not None]
            if not levels:
                with torch.no_grad():
                    self.refs[stack] = self.plain(self.seqs).logits
                return self.refs[stack]
            # A single adapter goes to PEFT as it is; a stack as the one LoRA AdapterWeights.stack makes.
            one = levels[0] if len(levels) == 1 else AdapterWeights.stack(levels)
            name = "_".join(k or "x" for k in stack)
            one.to_peft_dir(self.tmp / name)
            # A fresh PeftModel per reference: PEFT's load_adapter slows down as adapters accumulate.
            peft_model = PeftModel.from_pretrained(copy.deepcopy(self.plain), self.tmp / name).eval()
            with torch.no_grad():
                self.refs[stack] = peft_model(input_ids=self.seqs).logits
        return self.refs[stack]

    def check(self, rows: list[tuple[int, tuple]], t: int) -> float:
        """Run rows (seq index, stack) as one batch of length-t prefixes; return the worst relative error."""
        ids = self.seqs[[s for s, _ in rows], :t]
        slots = torch.tensor([self.slots(stack) for _, stack in rows])
        with torch.no_grad(), self.engine.rows(slots):
            out = self.engine.model(input_ids=ids).logits
        worst = 0.0
        for b, (s, stack) in enumerate(rows):
            ref = self.reference(stack)[s, :t]
            worst = max(worst, float((out[b] - ref).abs().max() / ref.abs().max()))
        return worst


_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory) -> Oracle:
    return Oracle(tmp_path_factory)


SHAPES = ("base", "ind", "full", "no_team", "team_only", "co_team")


def test_64_distinct_adapters_with_stacks_and_base_rows_match_peft(oracle: Oracle) -> None:
    rows = [(i % N_SEQS, oracle.stack_of(i, "ind")) for i in range(N_IND)]
    rows += [(i % N_SEQS, oracle.stack_of(i, shape)) for i, shape in enumerate(SHAPES * 2)]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(3)).tolist()
    rows = [rows[i] for i in order]
    for t in (SEQ_LEN, 1):  # t=1 is the decode kernel (embedding_bag), longer rows the gather+bmm one
        assert oracle.check(rows, t) <= REL_TOL
    # The comparison can fail: adapters change the logits by far more than the tolerance.
    base = oracle.reference(oracle.stack_of(0, "base"))
    assert float((oracle.reference(oracle.stack_of(5, "full")) - base).abs().max() / base.abs().max()) > 1e-2


@settings(max_examples=25, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.integers(0, N_SEQS - 1), st.integers(0, 15), st.sampled_from(SHAPES)),
        min_size=1,
        max_size=24,
    ),
    t=st.sampled_from([1, 2, 5, SEQ_LEN]),
)
def test_any_mixed_batch_matches_peft_row_by_row(oracle: Oracle, rows, t: int) -> None:
    batch = [(s, oracle.stack_of(i, shape)) for s, i, shape in rows]
    assert oracle.check(batch, t) <= REL_TOL


@settings(max_examples=5, deadline=None)
@given(
    rank=st.integers(1, MAX_RANK),
    alpha=st.sampled_from([1.0, 8.0, 32.0]),
    rslora=st.booleans(),
    seed=st.integers(0, 99),
)
@example(rank=1, alpha=32.0, rslora=False, seed=1)  # the largest scale: float32 rounding near 1e-5
def test_any_rank_matches_peft(
    oracle: Oracle, tmp_path_factory, rank: int, alpha: float, rslora: bool, seed: int
) -> None:
    adapter = random_lora(oracle.plain, rank=rank, alpha=alpha, use_rslora=rslora, seed=1000 + seed)
    path = adapter.to_peft_dir(tmp_path_factory.mktemp("rank"))
    slot = oracle.engine.load("hyp", adapter)
    try:
        peft_model = PeftModel.from_pretrained(copy.deepcopy(oracle.plain), path).eval()
        with torch.no_grad():
            ref = peft_model(input_ids=oracle.seqs).logits
            with oracle.engine.rows([[slot]] * N_SEQS):
                out = oracle.engine.model(input_ids=oracle.seqs).logits
        rel = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
        if rel(out, ref) > REL_TOL:
            # Large deltas (alpha/r up to 32 here) put float32 rounding above 1e-5 for PEFT itself:
            # then the engine must be as close to the exact (float64) logits as PEFT is.
            with torch.no_grad():
                exact = peft_model.double()(input_ids=oracle.seqs).logits
            assert rel(out.double(), exact) <= max(REL_TOL, 2 * rel(ref.double(), exact)), (
                rel(out, ref),
                rel(ref.double(), exact),
            )
    finally:
        oracle.engine.unload("hyp")


def test_export_loads_in_peft_with_identical_logits(oracle: Oracle, tmp_path) -> None:
    key = "ind9"
    exported = oracle.engine.export(key)
    original = oracle.adapters[key]
    assert exported.rank == original.rank and exported.scale == original.scale
    assert exported.tensors.keys() == original.tensors.keys()
    assert all(torch.equal(exported.tensors[k], original.tensors[k]) for k in original.tensors)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(oracle.plain), exported.to_peft_dir(tmp_path)).eval()
    with torch.no_grad():
        ref = peft_model(input_ids=oracle.seqs).logits
        with oracle.engine.rows([[oracle.engine.slot(key)]] * N_SEQS):
            out = oracle.engine.model(input_ids=oracle.seqs).logits
    assert float((out - ref).abs().max() / ref.abs().max()) <= REL_TOL


def test_outside_rows_and_all_none_rows_give_the_base_model(oracle: Oracle) -> None:
    with torch.no_grad():
        ref = oracle.plain(oracle.seqs).logits
        out = oracle.engine.model(oracle.seqs).logits
        with oracle.engine.rows([[-1, -1, -1]] * N_SEQS):
            none = oracle.engine.model(oracle.seqs).logits
    assert torch.allclose(out, ref, atol=1e-6) and torch.allclose(none, ref, atol=1e-6)


def test_inference_mode_and_bfloat16() -> None:
    model32 = small_llama(seed=1)
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    e32 = LoraEngine(model32, max_slots=2, max_rank=8)
    e16 = LoraEngine(model16, max_slots=2, max_rank=8)
    a = random_lora(model32, rank=8, seed=3)
    e32.load("a", a)
    e16.load("a", a)
    ids = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for t in (6, 1):
            with e32.rows([[0], [-1], [0]]):
                ref = e32.model(ids[:, :t]).logits
            with e16.rows([[0], [-1], [0]]):
                out = e16.model(ids[:, :t]).logits
            assert out.dtype == torch.bfloat16 and not out.requires_grad
            assert float((out.float() - ref).abs().max() / ref.abs().max()) < 5e-2
    # A bfloat16 base keeps float32 slots (a rank-r update would round away in bfloat16).
    assert e16.layers["model.layers.0.self_attn.q_proj"].At_SDR.dtype == torch.float32


def test_slot_table_load_unload_swap_and_errors() -> None:
    model = small_llama(seed=2)
    engine = LoraEngine(model, max_slots=2, max_rank=8)
    a, b, c = (random_lora(model, rank=4, seed=s) for s in (1, 2, 3))
    assert engine.capacity == 2 and engine.free_slots == 2
    sa, sb = engine.load("m/a@v1", a), engine.load("m/b@v1", b)
    assert {sa, sb} == {0, 1} and engine.free_slots == 0 and set(engine.keys()) == {"m/a@v1", "m/b@v1"}
    with pytest.raises(CapacityError):
        engine.load("m/c@v1", c)
    assert engine.load("m/a@v1", c) == sa  # same key: swapped in place
    assert torch.equal(engine.export("m/a@v1").tensors[next(iter(c.tensors))], next(iter(c.tensors.values())))
    engine.unload("m/b@v1")
    assert engine.slot("m/b@v1") is None and engine.free_slots == 1
    with pytest.raises(NotFoundError):
        engine.unload("m/b@v1")
    with pytest.raises(ValidationError, match="holds no adapter"):
        engine.plan([[sb]])
    with pytest.raises(ValidationError, match="out of range"):
        engine.plan([[7]])
    with pytest.raises(CapacityError, match="max_rank"):
        engine.load("m/big@v1", random_lora(model, rank=9))
    ids = torch.randint(3, 128, (2, 4))
    with pytest.raises(ValidationError, match="rows"), engine.rows([[sa]] * 3), torch.no_grad():
        engine.model(ids)


def test_slot_churn_keeps_memory_flat(tmp_path) -> None:
    model = small_llama(seed=3)
    engine = LoraEngine(model, max_slots=8, max_rank=8)
    blobs = [random_lora(model, rank=[2, 4, 8][i % 3], seed=i).to_bytes() for i in range(6)]
    pools = [(p, p.data_ptr()) for layer in engine.layers.values() for p in (layer.At_SDR, layer.Bt_SRO)]
    process = psutil.Process(os.getpid())
    rss0 = None
    live: list[str] = []
    for version in range(3000):
        key = f"acme/t{version % 40}@v{version}"
        engine.load(key, AdapterWeights.from_bytes(*blobs[version % len(blobs)]))
        live.append(key)
        if len(live) == engine.capacity:
            engine.unload(live.pop(0))
        if version == 200:
            rss0 = process.memory_info().rss
    growth = process.memory_info().rss - rss0
    assert all(p.data_ptr() == ptr for p, ptr in pools), "a pool was reallocated"
    assert growth < 64 * 2**20, f"RSS grew by {growth / 2**20:.0f} MiB over 2,800 load/unload cycles"
    last = AdapterWeights.from_bytes(*blobs[2999 % len(blobs)])
    exported = engine.export(live[-1])
    assert all(torch.equal(exported.tensors[k], last.tensors[k]) for k in last.tensors)
