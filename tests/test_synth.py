"""fleet.data.synth: general text and the synthetic organisation."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.data.ingest import messages_text
from fleet.data.synth import (
    ATTRIBUTES,
    Level,
    general_text,
    question_text,
    statement_text,
    synthetic_org,
)
from fleet.types import level_of, validate_id


@pytest.fixture(scope="module")
def org():
    return synthetic_org()


def _normalize(query: str) -> str:
    return " ".join(query.lower().split())


def test_default_org_has_the_demo_shape(org):
    assert len(org.companies) == 3
    assert len(org.teams) == 12
    assert len(org.individuals) == 100
    sizes = sorted(
        (sum(1 for i in org.individuals if i.startswith(c + "/")) for c in org.companies), reverse=True
    )
    assert sizes[0] > sizes[-1]  # Zipf-ish: the largest company is clearly bigger
    for team in org.teams:
        assert any(i.startswith(team + "/") for i in org.individuals), f"{team} has no members"


def test_ids_follow_the_grammar_and_parents_come_first(org):
    seen: set[str] = set()
    for t in org.tenants:
        assert validate_id(t.id) == t.id
        assert level_of(t.id) is t.level
        if t.parent is None:
            assert t.level is Level.COMPANY
        else:
            assert t.parent in seen and t.id.startswith(t.parent + "/")
        assert t.shares >= 1
        seen.add(t.id)
    assert len(seen) == len(org.tenants)


def test_every_node_owns_facts_with_org_unique_values(org):
    values = [f.value for f in org.facts]
    assert len(values) == len(set(values)), "fact values must be unique across the organisation"
    subjects = [t.subject for t in org.tenants]
    assert len(subjects) == len(set(subjects))
    for mid in org.model_ids:
        facts = org.facts_of(mid)
        assert len(facts) == 2
        assert all(f.owner == mid for f in facts)
        assert len({f.attribute for f in facts}) == 2
        assert {f.attribute for f in facts} <= {a for a, _ in ATTRIBUTES[org.tenant(mid).level]}


def test_fact_shape_fits_a_byte_level_base(org):
    for f in org.facts:
        assert f.answer.startswith(" ") and f.answer.strip() == f.value
        assert f.statement == f"{f.question}{f.answer}."
        assert f.question == question_text(f.attribute, f.subject)
        assert f.statement == statement_text(f.attribute, f.subject, f.value)
        assert len((f.statement + f.question).encode()) < 100
        prompt = org.in_context_prompt(f)
        assert prompt.endswith("\n" + f.question) and f.statement in prompt


def test_items_carry_the_facts_and_parse_as_jsonl(org):
    for mid in org.model_ids:
        lines = org.items_jsonl(mid).splitlines()
        assert len(lines) >= 4
        items = [json.loads(line) for line in lines]
        assert {i["kind"] for i in items} == {"document", "conversation"}
        # conversations come as structured messages (rendered by each base's chat template)
        assert all(("messages" in i) == (i["kind"] == "conversation") for i in items)
        texts = [i["text"] if "text" in i else messages_text(i["messages"]) for i in items]
        assert all(isinstance(t, str) and t for t in texts)
        assert len(texts) == len(set(texts)), "duplicate items would be dropped by ingestion"
        assert all(set(i) <= {"kind", "text", "messages", "meta"} for i in items)
        blob = "\n".join(texts)
        for f in org.facts_of(mid):
            # several phrasings: the value appears at least three times
            assert blob.count(f.value) >= 3, (mid, f.value)
        assert org.source_document(mid) in texts


def test_private_values_stay_with_their_owner(org):
    """A model's items mention only its own facts and those its ancestors' members ask about."""
    owner_of = {f.value: f.owner for f in org.facts}
    for mid in org.model_ids:
        blob = org.items_jsonl(mid)
        for value, owner in owner_of.items():
            if f" {value}." in blob or f" {value}\n" in blob or f'{value}"' in blob:
                assert owner == mid or mid.startswith(owner + "/"), (value, owner, mid)


def test_repeated_queries_are_asked_by_enough_members(org):
    assert org.repeated_queries, "the repeated-query path needs something to find"
    scopes = {rq.scope for rq in org.repeated_queries}
    assert scopes & set(org.teams) and scopes & set(org.companies)
    for rq in org.repeated_queries:
        assert len(rq.askers) >= 3 and len(set(rq.askers)) == len(rq.askers)
        answer_owner = next(f.owner for f in org.facts if f.value == rq.answer)
        assert answer_owner == rq.scope
        variants = set()
        for asker in rq.askers:
            assert asker.startswith(rq.scope + "/")
            convs = [i for i in org.items_of(asker) if i.kind == "conversation"]
            asked = [dict(i.meta)["query"] for i in convs if _normalize(dict(i.meta)["query"]) == rq.query]
            assert asked, (asker, rq.query)
            variants.update(asked)
        assert len(variants) > 1, "surface variants exercise query normalization"


def test_org_is_deterministic_per_seed():
    a, b = synthetic_org(seed=7), synthetic_org(seed=7)
    assert a == b
    assert a.items_jsonl(a.individuals[0]) == b.items_jsonl(b.individuals[0])
    c = synthetic_org(seed=8)
    assert [f.value for f in c.facts] != [f.value for f in a.facts]


@settings(max_examples=15, deadline=None)
@given(
    companies=st.integers(1, 5),
    teams=st.integers(1, 4),
    extra=st.integers(0, 120),
    facts=st.integers(1, 3),
    seed=st.integers(0, 10_000),
)
def test_org_invariants_hold_for_any_shape(companies, teams, extra, facts, seed):
    n = companies * teams + extra
    org = synthetic_org(
        companies=companies, teams_per_company=teams, individuals=n, facts_per_model=facts, seed=seed
    )
    assert (len(org.companies), len(org.teams), len(org.individuals)) == (companies, companies * teams, n)
    assert len(org.facts) == facts * len(org.tenants)
    assert len({f.value for f in org.facts}) == len(org.facts)
    for t in org.tenants:
        validate_id(t.id)
        assert len(org.facts_of(t.id)) == facts


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError):
        synthetic_org(companies=3, teams_per_company=4, individuals=5)
    with pytest.raises(ValueError):
        synthetic_org(facts_per_model=99)
    with pytest.raises(KeyError):
        synthetic_org().facts_of("nobody")


def test_general_text_is_deterministic_varied_and_teaches_lookup():
    docs = general_text(400, seed=1)
    assert docs == general_text(400, seed=1)
    assert docs != general_text(400, seed=2)
    assert len(set(docs)) > 390
    # the mix: prose, in-context fact lookups (a statement restated), chats, records
    lookups = [
        d for d in docs if any(line.endswith(".") and line in d.split("\n")[0] for line in d.split("\n")[1:])
    ]
    assert len(lookups) > 80
    assert any(d.startswith("<|user|>") for d in docs)
    assert any(d.startswith("Record of ") for d in docs)
    assert sum(1 for d in docs if "'s " not in d) > 80  # plain prose
