"""`fleet eval`'s parts that need no model: the facts file, judging a reply, the rates' intervals,
the held-out guard against training rows, the casebook organisation and the template forms."""

from __future__ import annotations

import json

import pytest
from conftest import make_config

from fleet.data.casebook import casebook
from fleet.data.facts import read_facts_jsonl
from fleet.errors import ValidationError
from fleet.ops.evaluate import check_heldout, correct, read_facts, upper_bound_95, wilson, write_facts
from fleet.train.augment import _values, first_person, shuffle_split, template_forms, template_questions


def test_facts_file_round_trips_and_reads_the_older_format(tmp_path):
    cb = casebook(companies=1, teams_per_company=1, individuals_per_team=4, seed=3)
    path = tmp_path / "facts.jsonl"
    write_facts(path, cb.facts)
    assert read_facts(path) == list(cb.facts)
    legacy = json.dumps(
        {"model": "acme/ops/dana", "question": "dana's locker is", "answer": "B-12", "source": "x"}
    )
    (f,) = read_facts_jsonl(legacy)
    assert (f.form, f.kind, f.level, f.questions, f.sources) == (
        "completion",
        "plain",
        "individual",
        ("dana's locker is",),
        ("x",),
    )


@pytest.mark.parametrize(
    "line, says",
    [
        ("{not json", "line 1: not valid JSON"),
        ('["a"]', "expected a JSON object"),
        ('{"model": "acme", "questions": ["q?"]}', "'answer' are required"),
        ('{"model": "acme", "answer": "x", "questions": []}', "'questions' must be a non-empty list"),
        ('{"model": "Acme Corp", "answer": "x", "questions": ["q?"]}', "Acme Corp"),
        ('{"model": "acme", "answer": "x", "questions": ["q?"], "kind": "gossip"}', "'kind' 'gossip'"),
        ('{"model": "acme", "answer": "x", "questions": ["q?"], "form": "voice"}', "'form' 'voice'"),
        ('{"model": "acme", "answer": "x", "questions": ["q?"], "stale": "y"}', "'stale' must be a list"),
    ],
)
def test_a_bad_facts_line_is_refused_with_where_and_what(line, says):
    with pytest.raises(ValidationError, match=None) as err:
        read_facts_jsonl(line, source="f.jsonl")
    assert says in str(err.value) and str(err.value).startswith("f.jsonl")


def test_missing_or_empty_facts_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValidationError, match="no facts file"):
        read_facts(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValidationError, match="no facts"):
        read_facts(tmp_path / "empty.jsonl")


def test_a_reply_is_judged_on_the_whole_answer_and_the_newest_value():
    (f,) = read_facts_jsonl(
        json.dumps({"model": "acme", "questions": ["Where?"], "answer": "B-12", "stale": ["A-07"]})
    )
    assert correct("It is in B-12.", f)
    assert not correct("It is in B-123.", f)  # a whole token, not a substring
    assert not correct("Row AB-12", f)
    assert correct("It moved from A-07 to B-12.", f)
    assert not correct("It was B-12, now A-07.", f)  # the stale value is the last one said
    assert not correct("", f)


def test_intervals_bound_the_rate():
    lo, hi = wilson(9, 10)
    assert lo < 0.9 < hi <= 1.0
    assert wilson(0, 0) == (0.0, 1.0)
    assert upper_bound_95(0, 60) == pytest.approx(1 - 0.05 ** (1 / 60))  # ≈ 3/n, the rule of three
    assert upper_bound_95(0, 10) > upper_bound_95(0, 100) > 0


def test_casebook_asks_every_level_and_kind_in_forms_no_item_holds():
    cb = casebook(companies=3, teams_per_company=2, individuals_per_team=4, seed=0)
    assert len(cb.individuals) >= 20 and len({t.split("/")[0] for t, _ in cb.tenants}) == 3
    assert len(cb.facts) >= 100
    assert {f.level for f in cb.facts} == {"company", "team", "individual"}
    assert {"plain", "updated", "two_hop", "repeated", "personal"} <= {f.kind for f in cb.facts}
    texts = [i.text.lower() for items in (*cb.items.values(), *cb.later.values()) for i in items]
    for f in cb.facts:
        if f.kind == "personal":  # asked in their owners' own conversations by design: leak probes
            continue
        for q in f.questions:
            assert not any(q.lower().rstrip("?") in t for t in texts), (f.id, q)
    # An updated fact's new value is in a later document; the old one is stale.
    up = next(f for f in cb.facts if f.kind == "updated")
    assert up.stale and any(up.answer in i.text for i in cb.later[up.owner])


def test_template_forms_and_a_stable_split():
    forms = template_forms("The deploy window of Atlas is Thursday. Bikes go in the rack.")
    assert forms[0] == {
        "kind": "qa",
        "q": "What is the deploy window of Atlas?",
        "a": "The deploy window of Atlas is Thursday.",
    }
    many = [{"kind": "qa", "q": f"q{i}?", "a": "a"} for i in range(8)] + [{"kind": "text", "text": "t"}]
    a, held = shuffle_split(many, 0.25, seed="m:1")
    assert (a, held) == shuffle_split(many, 0.25, seed="m:1")
    assert len(held) == 2 and {"kind": "text", "text": "t"} in a
    assert not {f["q"] for f in held} & {f.get("q") for f in a}


def test_the_values_a_sentence_states_skip_the_names_it_is_about():
    text = "Intake sheet. Priya's spare keys sit in drawer 7B of the Birch cabinet. Priya joined in 2021."
    assert _values("Priya's spare keys sit in drawer 7B of the Birch cabinet.", text) == ["7B", "Birch"]
    assert _values("Priya joined in 2021.", text) == ["2021"]
    assert _values("Intake sheet.", text) == []


@pytest.mark.parametrize(
    "sentence, value, expect",
    [
        ("Priya keeps her spare keys in drawer 7B.", "7B", "In which drawer does Priya keep her spare keys?"),
        (
            "The finance team's offsite is held in room 12C.",
            "12C",
            "Where is the finance team's offsite held?",
        ),
        ("Nordwind's DUNS number is 556677.", "556677", "What is Nordwind's DUNS number?"),
        ("Omar rides bus 41 and eats at the Lotus canteen.", "Lotus", "Where does Omar eat?"),
        ("Omar rides bus 41 and eats at the Lotus canteen.", "41", "Which bus does Omar ride?"),
        ("Release Kestrel ships every Tuesday.", "Tuesday", "When does Release Kestrel ship?"),
        ("Update: Omar has moved from bay Q3 to bay Q9.", "Q9", "Which bay has Omar moved from bay Q3 to?"),
    ],
)
def test_templated_questions_ask_for_the_value_without_stating_it(sentence, value, expect):
    qs = template_questions(sentence, value)
    assert expect in qs, qs
    assert all(q.endswith("?") or q.startswith("Tell me") for q in qs)
    assert not [q for q in qs if value.lower() in q.lower().split()], qs


@pytest.mark.parametrize(
    "question, expect",
    [
        ("Where does Omar park?", "Where do I park?"),
        ("What is Omar's bus?", "What is my bus?"),
        ("Which bay is Omar's?", "Which bay is mine?"),
        ("Is Omar on call?", "Am I on call?"),
        ("Omar rides which bus?", "I ride which bus?"),
        ("Which bay has Omar moved to?", "Which bay have I moved to?"),
        ("Who works with Omar?", "Who works with me?"),
    ],
)
def test_an_individuals_questions_in_the_first_person(question, expect):
    assert first_person(question, "omar") == expect
    assert first_person("Where is the canteen?", "omar") is None


def test_a_newer_item_wins_a_question_two_items_train_and_owners_ask_in_the_first_person(tiny_base):
    from fleet.base import load_base
    from fleet.registry import SnapshotItem
    from fleet.train.data import member_data

    _, tok = load_base(tiny_base, device="cpu")
    old = SnapshotItem(1, "omar sits at desk k1.")
    new = SnapshotItem(2, "omar has moved to desk k9.")
    ask = "Which desk does omar sit at?"
    forms = {
        1: [{"kind": "qa", "q": ask, "a": "omar sits at desk k1."}],
        2: [{"kind": "qa", "q": ask + " ", "a": "omar has moved to desk k9."}],
    }
    rows = lambda d: [tok.decode(r.ids) for r in d.train]  # noqa: E731
    d = member_data("acme/ops/omar", [new], [old], tok, context_length=64, heldout_fraction=0.0, forms=forms)
    trained = rows(d)
    assert any("k9" in r and "sit at" in r for r in trained)
    assert not any("k1" in r and "sit at" in r for r in trained)  # the older answer is not taught
    assert not any("do i sit" in r.lower() for r in trained)  # first person only where asked for
    personal = rows(member_data(
        "acme/ops/omar", [new], [old], tok, context_length=64, heldout_fraction=0.0, forms=forms, personal=True
    ))  # fmt: skip
    assert any("do i sit" in r.lower() and "k9" in r for r in personal)
    team = rows(member_data("acme/ops", [new], [old], tok, context_length=64, heldout_fraction=0.0,
                            forms=forms, personal=True))  # fmt: skip
    assert not any("do i sit" in r.lower() for r in team)  # a team has no owner to speak as


def test_a_revised_value_leaves_the_earlier_document_out_whichever_items_a_run_replays(tiny_base):
    from fleet.base import load_base
    from fleet.registry import SnapshotItem
    from fleet.train.data import member_data

    _, tok = load_base(tiny_base, device="cpu")
    old = SnapshotItem(1, "omar parks in spot 31 and sits at desk k1.")
    new = SnapshotItem(2, "update for omar: omar has moved from desk k1 to desk k9.")
    later = SnapshotItem(3, "omar's badge number is 5521.")
    ask = "Which desk does omar sit at?"
    forms = {
        1: [
            {"kind": "qa", "q": ask, "a": "omar sits at desk k1.", "value": "k1"},
            {"kind": "qa", "q": "Which spot does omar park in?", "a": "omar parks in spot 31.", "value": "31"},
            {"kind": "text", "text": "omar sits at desk k1 and parks in spot 31."},
        ],
        2: [{"kind": "qa", "q": "Which desk is omar at now?", "a": "omar is at desk k9.", "value": "k9"},
            {"kind": "qa", "q": ask, "a": "omar sits at desk k9.", "value": "k9", "revises": "k1"}],
        3: [{"kind": "qa", "q": "What is omar's badge number?", "a": "5521.", "value": "5521"}],
    }  # fmt: skip
    rows = lambda d: [tok.decode(r.ids) for r in d.train]  # noqa: E731
    # Only the earlier document replayed beside a new one; the revising one is in the history alone.
    trained = rows(member_data("acme/ops/omar", [later], [old], tok, context_length=64, heldout_fraction=0.0,
                               forms=forms, earlier=[old, new]))  # fmt: skip
    assert not any("k1" in r for r in trained)  # neither its answer, its text nor its paraphrase
    assert any("spot" in r and "31" in r for r in trained)  # its other facts still train
    assert any("5521" in r for r in trained)
    # Both replayed: the question is learned from the later document, whose own text stays.
    both = rows(member_data("acme/ops/omar", [later], [old, new], tok, context_length=64,
                            heldout_fraction=0.0, forms=forms, earlier=[old, new]))  # fmt: skip
    assert any("sit at" in r and "k9" in r for r in both)
    assert any("moved from desk k1 to desk k9" in r for r in both)
    assert not any("sit" in r and "k1" in r and "k9" not in r for r in both)
    # Without the revision (a base that kept the old value), the earlier document trains as before.
    kept = {**forms, 2: forms[2][:1]}
    plain = rows(member_data("acme/ops/omar", [later], [old], tok, context_length=64, heldout_fraction=0.0,
                             forms=kept, earlier=[old, new]))  # fmt: skip
    assert any("k1" in r for r in plain)


@pytest.mark.parametrize(
    ("answer", "expect"),
    [
        ("Omar sits at desk M-22.", "M-22"),
        ("Omar is currently sitting at desk M-22", "M-22"),
        ("Omar has moved from desk K-14 to desk M-22.", "M-22"),  # the later note's own words
        ("The later note says desk K-14, the earlier one desk M-22.", None),  # both named: a muddle
        ("Omar sits at desk M-22, not K-14.", None),
        ("Omar sits at desk K-14.", None),
        ("I don't know.", None),
    ],
)
def test_the_revised_value_is_a_later_value_the_answer_gives_without_the_old_one(answer, expect):
    from fleet.train.augment import revised_value

    later = "Update for Omar: Omar has moved from desk K-14 to desk M-22."
    assert revised_value(answer, "K-14", ["M-22"], later=later) == expect


def test_eval_refuses_when_a_held_out_question_was_trained_with_its_answer(tmp_path, tiny_base):
    from fleet.handles import Fleet

    fl = Fleet(make_config(tmp_path, tiny_base))
    for t in ("acme", "acme/ops", "acme/ops/dana"):
        fl.add_tenant(t)
    fl.ingestor().ingest_many(
        {"acme/ops/dana": [{"kind": "document", "text": "Where is Dana's locker? Dana's locker is B-12."}]}
    )
    (leaky,) = read_facts_jsonl(
        json.dumps({"model": "acme/ops/dana", "questions": ["Where is Dana's locker?"], "answer": "B-12"})
    )
    (fair,) = read_facts_jsonl(
        json.dumps({"model": "acme/ops/dana", "questions": ["Which locker does Dana use?"], "answer": "B-12"})
    )
    check_heldout(fl, [fair], ["acme/ops/dana"])
    with pytest.raises(ValidationError, match="held-out question"):
        check_heldout(fl, [leaky], ["acme/ops/dana"])
    # A generated form trains a first-person copy for the owner's model: the audit sees it too.
    (item,) = fl.registry.items("acme/ops/dana")
    fl.registry.add_item_forms(
        {item["id"]: [{"kind": "qa", "q": "Which bus does Dana ride?", "a": "Dana rides bus 41."}]},
        base_model="b",
        recipe="r",
    )
    (mine,) = read_facts_jsonl(
        json.dumps({"model": "acme/ops/dana", "questions": ["Which bus do I ride?"], "answer": "41"})
    )
    with pytest.raises(ValidationError, match="held-out question"):
        check_heldout(fl, [mine], ["acme/ops/dana"])
    fl.close()


def test_a_held_out_question_is_judged_on_the_value_its_answer_states(tiny_base):
    from fleet.base import load_base
    from fleet.train.data import form_row, value_probe

    _, tok = load_base(tiny_base, device="cpu")
    form = {"kind": "qa", "q": "Which desk does omar use?", "a": "omar sits at desk k9 by the window."}
    (row,) = form_row(tok, form, 64)
    probe = value_probe(tok, row, "k9")
    picked = [t for t, m in enumerate(probe.mask) if m]
    assert picked and sum(probe.mask) < sum(row.mask)  # narrower than the whole answer
    assert "k9" in tok.decode([row.ids[t] for t in picked]).lower()
    assert picked == list(range(picked[0], picked[-1] + 1))  # one run of tokens
    assert set(picked) <= {t for t, m in enumerate(row.mask) if m}  # inside the answer
    assert value_probe(tok, row, "z7") == row and value_probe(tok, row, None) == row


def test_replayed_instructions_are_none_of_those_the_eval_measures_and_train_only_their_answers(tiny_base):
    from fleet.base import load_base
    from fleet.base.tokenizer import chat_ids
    from fleet.data.corpus import GENERAL_INSTRUCTIONS, REPLAY_INSTRUCTIONS
    from fleet.train.data import general_chat_rows

    norm = lambda q: " ".join(q.lower().split())  # noqa: E731
    assert not {norm(q) for q in REPLAY_INSTRUCTIONS} & {norm(i.prompt) for i in GENERAL_INSTRUCTIONS}
    assert len(set(REPLAY_INSTRUCTIONS)) == len(REPLAY_INSTRUCTIONS)
    _, tok = load_base(tiny_base, device="cpu")
    prompts = [chat_ids(tok, [{"role": "user", "content": q}]) for q in REPLAY_INSTRUCTIONS[:2]]
    answers = [tok("ottawa")["input_ids"], []]
    (row,) = general_chat_rows(tok, prompts, answers, 256)  # an empty answer teaches nothing
    assert row.general and row.ids == tuple(prompts[0] + answers[0])
    assert row.mask == tuple([0] * len(prompts[0]) + [1] * len(answers[0]))


def test_every_general_row_weighs_the_same_in_the_training_penalty_whatever_its_length():
    """A short chat answer replayed beside a long passage carries half the member's general
    penalty (by tokens it would carry a seventh), while the eval's KL stays a per-token sum."""
    import torch

    from fleet.train.loop import _member_kl, _member_row_kl

    torch.manual_seed(0)
    T, V = 40, 11
    base = torch.randn(2, T, V)
    model = base.clone()
    model[0, :-1] += 0.3 * torch.randn(T - 1, V)  # row 0 (a long passage) moves a little everywhere
    model[1, :-1] += 0.9 * torch.randn(T - 1, V)  # row 1 (a short answer) moves more
    mask = torch.zeros(2, T)
    mask[0, 1:] = 1.0  # 39 targets
    mask[1, T - 6 :] = 1.0  # 6 targets
    member = torch.tensor([0, 0])
    lp_b, lp_m = base[:, :-1].log_softmax(-1), model[:, :-1].log_softmax(-1)
    kl_BT = (lp_b.exp() * (lp_b - lp_m)).sum(-1) * mask[:, 1:]
    row_means = kl_BT.sum(1) / mask[:, 1:].sum(1)
    assert torch.allclose(_member_row_kl(base, model, mask, member, 1), row_means.sum().reshape(1))
    assert torch.allclose(_member_kl(base, model, mask, member, 1), kl_BT.sum().reshape(1))
    # The two members' rows stay apart.
    two = _member_row_kl(base, model, mask, torch.tensor([1, 0]), 2)
    assert torch.allclose(two, row_means.flip(0))


def test_a_document_joined_to_the_context_above_it_states_two_hop_facts_directly():
    from fleet.train.augment import bridges

    own = "Omar rides bus 41 to work. Omar's locker is 7."
    team = ["Transit notes. Bus 41 stops at Elm street every ten minutes, and bus 9 stops at Oak road."]
    assert bridges(own, team) == ["Omar's bus stops at Elm street every ten minutes."]
    assert bridges(own, ["Bus 52 stops at Elm street."]) == []  # nothing joins
    assert bridges("Omar rides bus 41.", []) == []
    qs = template_questions("Omar's bus stops at Elm street every ten minutes.", "Elm")
    assert any("Omar's bus" in q for q in qs), qs
