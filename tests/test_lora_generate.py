"""Generation through the engine: the KV-cache decode path against full recomputation, stop
strings and per-row finish, continuous batching, sampling and prompt log-probabilities."""

from __future__ import annotations

import pytest
import torch
from _tiny import CharTokenizer, one_thread, random_lora, tiny_llama

from fleet.errors import ValidationError
from fleet.lora import DecodeBatch, LoraEngine, generate, prompt_logprobs

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

VOCAB = 96
NO_EOS = -1  # an id no model produces: rows run to max_new_tokens


@pytest.fixture(scope="module")
def engine() -> LoraEngine:
    # initializer_range 0.2 gives clear top-1 margins, so greedy paths do not hinge on float noise.
    model = tiny_llama(vocab=VOCAB, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, seed=11)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    engine = LoraEngine(model, max_slots=6, max_rank=8)
    for i, key in enumerate(("co", "team", "ann", "bob")):
        engine.load(key, random_lora(model, rank=[8, 4, 8, 2][i], seed=i, std=0.2))
    return engine


def stacks(engine: LoraEngine) -> list[list[int]]:
    s = engine.slot
    return [[s("co"), s("team"), s("ann")], [-1, -1, -1], [-1, -1, s("bob")], [s("co"), -1, s("bob")]]


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (7, 3, 1, 12)]


def recompute_greedy(engine: LoraEngine, prompt: list[int], slots: list[int], n: int) -> list[int]:
    """The plainest decoder: the full sequence through the model's own forward, argmax, repeat."""
    ids = list(prompt)
    with torch.no_grad(), engine.rows([slots]):
        for _ in range(n):
            ids.append(int(engine.model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_greedy_generate_equals_full_recompute(engine: LoraEngine) -> None:
    outs = generate(engine, None, prompts(), stacks(engine), max_new_tokens=12, eos_token_id=NO_EOS)
    for prompt, slots, out in zip(prompts(), stacks(engine), outs, strict=True):
        assert out.finish_reason == "length" and len(out.token_ids) == 12
        assert out.token_ids == recompute_greedy(engine, prompt, slots, 12)
    assert len({tuple(o.token_ids) for o in outs}) > 1  # different stacks, different completions


def test_stop_strings_eos_and_per_row_finish(engine: LoraEngine) -> None:
    tok = CharTokenizer()
    free = generate(engine, tok, prompts(), stacks(engine), max_new_tokens=10, eos_token_id=NO_EOS)
    text0 = free[0].text
    stop = text0[4:6]  # a string row 0 produces at characters 4-5
    eos = free[2].token_ids[3]  # the token row 2 produces 4th
    outs = generate(engine, tok, prompts(), stacks(engine), max_new_tokens=10, stop=[stop], eos_token_id=eos)
    first = text0.find(stop)
    assert outs[0].finish_reason == "stop" and outs[0].text == text0[:first]
    assert outs[0].token_ids == free[0].token_ids[: len(outs[0].token_ids)]
    row2_first_eos = free[2].token_ids.index(eos)
    assert outs[2].finish_reason == "stop" and outs[2].token_ids == free[2].token_ids[:row2_first_eos]
    for i in (1, 3):  # rows that meet neither condition run to max_new_tokens, unaffected by the others
        if stop not in free[i].text and eos not in free[i].token_ids:
            assert outs[i].finish_reason == "length" and outs[i].token_ids == free[i].token_ids


def test_requests_joining_and_leaving_do_not_change_other_rows(engine: LoraEngine) -> None:
    ps, ss = prompts(), stacks(engine)
    lengths = [9, 4, 14, 6]
    alone = [
        generate(engine, None, [p], [s], max_new_tokens=n, eos_token_id=NO_EOS)[0].token_ids
        for p, s, n in zip(ps, ss, lengths, strict=True)
    ]
    batch = DecodeBatch(engine, eos_token_id=NO_EOS)
    batch.add("r0", ps[0], ss[0], lengths[0])
    batch.add("r1", ps[1], ss[1], lengths[1])
    streamed: dict[str, list[int]] = {"r0": [], "r1": [], "r2": [], "r3": [], "gone": []}
    for step in range(30):
        if step == 2:
            batch.add("r2", ps[2], ss[2], lengths[2])
            batch.add("gone", ps[3], ss[0], 50)
        if step == 5:
            batch.add("r3", ps[3], ss[3], lengths[3])
        if step == 7:
            batch.cancel("gone")  # leaves mid-way, never finishes
        for out in batch.step():
            streamed[out.request_id].append(out.token_id)
        if not batch.active:
            break
    assert batch.active == 0 and set(batch.results) == {"r0", "r1", "r2", "r3"}
    for i, rid in enumerate(("r0", "r1", "r2", "r3")):
        assert batch.results[rid].token_ids == alone[i] == streamed[rid]
        assert batch.results[rid].finish_reason == "length"
    with pytest.raises(ValidationError, match="already"):
        batch.add("x", [5], [-1], 2)
        batch.add("x", [5], [-1], 2)


def test_sampling_is_seeded_per_row_and_top_p_narrows_to_greedy(engine: LoraEngine) -> None:
    ps, ss = prompts(), stacks(engine)
    kw = dict(max_new_tokens=8, temperature=1.0, eos_token_id=NO_EOS)
    a = generate(engine, None, ps, ss, seed=3, **kw)
    b = generate(engine, None, ps, ss, seed=3, **kw)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    # Row i draws with seed 3 + i whatever shares its batch.
    alone = generate(engine, None, [ps[2]], [ss[2]], seed=5, **kw)
    assert alone[0].token_ids == a[2].token_ids
    greedy = generate(engine, None, ps, ss, max_new_tokens=8, eos_token_id=NO_EOS)
    assert [o.token_ids for o in a] != [o.token_ids for o in greedy]
    narrow = generate(engine, None, ps, ss, seed=1, top_p=1e-6, **{**kw, "temperature": 0.7})
    assert [o.token_ids for o in narrow] == [o.token_ids for o in greedy]


def test_prompt_logprobs_match_the_forward(engine: LoraEngine) -> None:
    ps, ss = prompts(), stacks(engine)
    out = prompt_logprobs(engine, ps, ss, top_k=3)
    for p, s, entries in zip(ps, ss, out, strict=True):
        assert [e["token_id"] for e in entries] == p
        assert entries[0]["logprob"] is None and entries[0]["top"] == []
        with torch.no_grad(), engine.rows([s]):
            logp = torch.log_softmax(engine.model(torch.tensor([p])).logits[0], -1)
        for j in range(1, len(p)):
            assert entries[j]["logprob"] == pytest.approx(float(logp[j - 1, p[j]]), abs=1e-5)
            top = entries[j]["top"]
            assert [t["token_id"] for t in top] == logp[j - 1].topk(3).indices.tolist()
            assert top[0]["logprob"] >= top[1]["logprob"] >= top[2]["logprob"] >= entries[j][
                "logprob"
            ] - 1e-6 or (entries[j]["token_id"] not in [t["token_id"] for t in top])


def test_text_prompts_and_bad_requests(engine: LoraEngine) -> None:
    tok = CharTokenizer()
    out = generate(engine, tok, ["hello"], [[-1]], max_new_tokens=3, eos_token_id=NO_EOS)[0]
    assert len(out.token_ids) == 3 and out.text == tok.decode(out.token_ids)
    batch = DecodeBatch(engine)
    with pytest.raises(ValidationError, match="at least one token"):
        batch.add("a", [], [-1], 3)
    with pytest.raises(ValidationError, match="tokenizer"):
        batch.add("b", [5], [-1], 3, stop=["x"])
    with pytest.raises(ValidationError, match="context"):
        batch.add("c", [5] * 10, [-1], 5000)
    with pytest.raises(ValidationError, match="holds no adapter"):
        batch.add("d", [5], [5], 3)
    batch.add("d", [5], [-1], 3)  # a refused request leaves nothing behind
    assert batch.active == 1


def test_bfloat16_generation_follows_its_own_forward() -> None:
    model = tiny_llama(
        vocab=VOCAB, hidden=64, layers=2, heads=4, intermediate=128, seed=3, dtype=torch.bfloat16
    )
    engine = LoraEngine(model, max_slots=2, max_rank=4)
    engine.load("a", random_lora(model, rank=4, seed=1, std=0.2))
    out = generate(engine, None, [[5, 6, 7], [9]], [[0], [-1]], max_new_tokens=4, eos_token_id=NO_EOS)
    assert [len(o.token_ids) for o in out] == [4, 4]
    assert all(0 <= t < VOCAB for o in out for t in o.token_ids)
    # The first token comes from the prefill: it must be the forward's own argmax.
    with torch.no_grad(), engine.rows([[0]]):
        assert out[0].token_ids[0] == int(engine.model(torch.tensor([[5, 6, 7]])).logits[0, -1].argmax())


@pytest.mark.parametrize("tied", [False, True])
def test_a_model_laid_out_for_cpu_decoding_gives_the_same_logits_and_tokens(tied: bool) -> None:
    import copy

    from torch import nn

    from fleet.lora import lay_out_for_cpu

    def build(model):
        engine = LoraEngine(model, max_slots=6, max_rank=8)
        for i, key in enumerate(("co", "team", "ann", "bob")):
            engine.load(key, random_lora(model, rank=[8, 4, 8, 2][i], seed=i, std=0.2))
        return engine

    model = tiny_llama(vocab=VOCAB, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, seed=11)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    if tied:  # as SmolLM2's: the head is the embedding
        model.lm_head.weight = model.model.embed_tokens.weight
    ref, laid = build(copy.deepcopy(model)), build(model)
    linears = sum(type(m) is nn.Linear for m in laid.model.modules()) - int(tied)
    info = lay_out_for_cpu(laid.model)
    assert info == {"column_major": linears, "packed_head": tied and torch.backends.mkl.is_available()}
    assert lay_out_for_cpu(laid.model) == {"column_major": 0, "packed_head": False}  # once is enough
    ids = torch.tensor([prompts()[0], prompts()[3][:7]])
    with torch.no_grad(), ref.rows(stacks(ref)[:2]), laid.rows(stacks(laid)[:2]):
        torch.testing.assert_close(laid.model(ids).logits, ref.model(ids).logits, rtol=1e-5, atol=1e-5)
    args = dict(max_new_tokens=12, eos_token_id=NO_EOS)
    outs = [o.token_ids for o in generate(laid, None, prompts(), stacks(laid), **args)]
    assert outs == [o.token_ids for o in generate(ref, None, prompts(), stacks(ref), **args)]
    assert laid.model.lm_head.weight.shape == (VOCAB, 64)  # code that reads the head still can


def test_a_level_every_row_shares_decodes_as_the_full_recompute(engine: LoraEngine) -> None:
    # Every row has the company adapter (the A side reads x in place there), the rest differ per row.
    s = engine.slot
    rows = [
        [s("co"), s("team"), s("ann")],
        [s("co"), -1, -1],
        [s("co"), -1, s("bob")],
        [s("co"), s("team"), -1],
    ]
    outs = generate(engine, None, prompts(), rows, max_new_tokens=10, eos_token_id=NO_EOS)
    for prompt, slots, out in zip(prompts(), rows, outs, strict=True):
        assert out.token_ids == recompute_greedy(engine, prompt, slots, 10)
