"""Ingestion: validation of whole files, dedup, token counts, repeated queries, the CLI."""

from __future__ import annotations

import json

import pytest

from fleet.base.tokenizer import build_tokenizer
from fleet.data.ingest import Ingestor, normalize_query, tokenizer_counter
from fleet.errors import NotFoundError, ValidationError
from fleet.registry import Registry


@pytest.fixture(scope="module")
def counter():
    return tokenizer_counter(build_tokenizer())


def _ingestor(url, counter):
    reg = Registry.open_url(url)
    reg.add_tenants(
        [("acme", 1.0), ("acme/search", 1.0), ("acme/ads", 1.0), ("acme/ml", 1.0)]
        + [(f"acme/search/p{i}", 1.0) for i in range(4)]
        + [("acme/ads/q0", 1.0), ("acme/ml/r0", 1.0)],
        base_model="tiny",
        rank=8,
        alpha=16,
    )
    return Ingestor(reg, counter, max_chars=1000, repeated_min=3)


@pytest.fixture
def ingestor(tmp_path, counter):
    ing = _ingestor(f"sqlite:///{tmp_path / 'fleet.db'}", counter)
    yield ing
    ing.registry.close()


@pytest.fixture
def db_ingestor(registry_url, counter):
    """The same on each database (SQLite, PostgreSQL)."""
    ing = _ingestor(registry_url, counter)
    yield ing
    ing.registry.close()


def _write(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_file_ingest_dedup_and_tokens(ingestor, tmp_path):
    f = _write(
        tmp_path / "a.jsonl",
        [
            {"kind": "document", "text": "The badge code of p0 is 4821."},
            {"kind": "feedback", "text": "héllo wörld", "meta": {"source": "thumbs-up"}},
            {"kind": "document", "text": "The badge code of p0 is 4821."},
            "",
        ],
    )
    r = ingestor.ingest_file("acme/search/p0", f)
    # byte-level tokenizer: one token per UTF-8 byte
    assert (r.inserted, r.duplicates, r.tokens) == (2, 1, 29 + len("héllo wörld".encode()))
    r = ingestor.ingest_file("acme/search/p0", f)
    assert (r.inserted, r.duplicates) == (0, 3)
    m = ingestor.registry.get_model("acme/search/p0")
    assert m.pending_tokens == m.total_tokens == 29 + 13


OK = {"kind": "document", "text": "the first line is fine"}


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([OK, "{not json"], r"bad.jsonl: line 2: not valid JSON"),
        ([OK, OK, {}, {"kind": "x", "text": "y"}], r"line 3: field 'kind' must be one of"),
        ([OK, {"kind": "document", "text": "   "}], r"line 2: field 'text' must be a non-empty string"),
        ([{"kind": "document", "text": 5}], r"line 1: field 'text'"),
        ([OK, {"kind": "document", "text": "x", "meta": []}], r"line 2: field 'meta' must be an object"),
        ([{"kind": "document", "text": "x", "extra": 1}], r"line 1: unknown field 'extra'"),
        ([OK, {"kind": "document", "text": "x" * 1001}], r"line 2: field 'text' has 1001 characters"),
        (
            [{"kind": "conversation", "text": "x", "meta": {"query": "q"}}],
            r"line 1: 'meta.query' and 'meta.answer'",
        ),
        ([OK, "[1, 2]"], r"line 2: expected a JSON object"),
        (["", "  "], r"no items"),
    ],
)
def test_malformed_file_stores_nothing(ingestor, tmp_path, lines, message):
    f = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValidationError, match=message):
        ingestor.ingest_file("acme/search/p1", f)
    assert ingestor.registry.items("acme/search/p1") == []


def test_unknown_model_and_missing_file(ingestor, tmp_path):
    f = _write(tmp_path / "a.jsonl", [{"kind": "document", "text": "x"}])
    with pytest.raises(NotFoundError):
        ingestor.ingest_file("acme/nobody", f)
    with pytest.raises(ValidationError, match="no such file"):
        ingestor.ingest_file("acme", tmp_path / "missing.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValidationError, match="not UTF-8"):
        ingestor.ingest_file("acme", tmp_path / "bin.jsonl")


def test_normalize_query():
    assert normalize_query("  Where is the  Wiki?? ") == normalize_query("where is the wiki")


def test_repeated_queries_reach_team_then_company(ingestor):
    reg = ingestor.registry
    q = lambda text: [{"kind": "conversation", "text": f"Q: {text}\nA: On the third floor."}]  # noqa: E731
    ingestor.ingest_items("acme/search/p0", q("Where is the wiki?"))
    ingestor.ingest_items("acme/search/p1", q("where is the WIKI"))
    assert reg.items("acme/search") == []  # two askers are not enough
    ingestor.ingest_items("acme/search/p2", q("Where is the wiki"))
    team_items = reg.items("acme/search")
    assert len(team_items) == 1 and "On the third floor." in team_items[0]["text"]
    assert team_items[0]["meta"]["source"] == "repeated-query"
    ingestor.ingest_items("acme/search/p3", q("where is the wiki?"))
    assert len(reg.items("acme/search")) == 1  # added once
    assert reg.get_model("acme/search").pending_tokens == team_items[0]["tokens"]
    # chat-format conversations count too; two more teams asking lifts it to the company
    chat = "<|user|>\nWhere is the wiki?<|eos|>\n<|assistant|>\nOn the third floor.<|eos|>\n"
    ingestor.ingest_items("acme/ads/q0", [{"kind": "conversation", "text": chat}])
    ingestor.ingest_items("acme/ml/r0", [{"kind": "conversation", "text": chat}])
    assert reg.items("acme") == []  # each team had one asker only
    ingestor.ingest_many({"acme/ads": q("Where is the wiki?"), "acme/ml": q("Where is the wiki?")})
    assert len(reg.items("acme")) == 1


def test_a_question_whose_answers_differ_stays_with_each_asker(db_ingestor):
    """Three members asking for *their* badge code must not teach the team one of them; answers
    that agree (after normalization) are promoted, in the first agreeing asker's words."""
    ing, reg = db_ingestor, db_ingestor.registry
    qa = lambda q, a: [{"kind": "conversation", "text": f"Q: {q}\nA: {a}"}]  # noqa: E731
    for who, code in (("p0", "4821"), ("p1", "7730"), ("p2", "1111")):
        ing.ingest_items(f"acme/search/{who}", qa("What is my badge code?", code))
    assert reg.items("acme/search") == []
    for who, answer in (("p0", "Room 4."), ("p1", "room 5"), ("p2", "ROOM 4"), ("p3", "room 4!")):
        ing.ingest_items(f"acme/search/{who}", qa("Where is stand-up?", answer))
    (item,) = reg.items("acme/search")
    assert item["meta"]["messages"] == [
        {"role": "user", "content": "Where is stand-up?"},
        {"role": "assistant", "content": "Room 4."},
    ]
    assert item["text"] == "user: Where is stand-up?\nassistant: Room 4." and item["meta"]["askers"] == 3
    # Teams of a company: the same rule one level up (acme/ads and acme/ml agree, acme/search not).
    ing.ingest_many({"acme/ads": qa("Who runs payroll?", "Kim"), "acme/ml": qa("who runs payroll", "kim.")})
    ing.ingest_items("acme/search", qa("Who runs payroll?", "Lee"))
    assert reg.items("acme") == []  # 2 of 3 agree; 3 are needed
    ing.ingest_items("acme/search/p0", qa("Who runs payroll?", "Kim"))
    assert reg.items("acme") == []  # an individual counts toward its team, not the company


def test_jsonl_lines_break_at_newline_only(ingestor, tmp_path):
    """U+2028, U+2029 and U+0085 are valid inside JSON strings; str.splitlines() would cut there."""
    text = "first\u2028second\u0085third\u2029fourth"
    f = tmp_path / "u.jsonl"
    f.write_text(
        json.dumps({"kind": "document", "text": text}, ensure_ascii=False) + "\r\n", encoding="utf-8"
    )
    assert ingestor.ingest_file("acme/search/p0", f).inserted == 1
    assert [i["text"] for i in ingestor.registry.items("acme/search/p0")] == [text]


_UNSTORABLE = [
    ('{"kind": "document", "text": "a\\u0000b"}', r"line 2: field 'text' holds a NUL character"),
    (
        '{"kind": "document", "text": "x", "meta": {"k\\u0000": 1}}',
        r"line 2: a key of field 'meta' holds a NUL",
    ),
    ('{"kind": "document", "text": "x", "meta": {"score": NaN}}', r"line 2: NaN is not a JSON number"),
    ('{"kind": "document", "text": "x", "meta": {"s": [-Infinity]}}', r"line 2: -Infinity is not a JSON"),
    ('{"kind": "document", "text": "x", "meta": {"s": {"t": 1e999}}}', r"line 2: field 'meta.s.t' is inf"),
]


def test_nul_and_non_finite_numbers_are_refused_with_the_line(db_ingestor, tmp_path):
    """What PostgreSQL cannot store (NUL in text, NaN in json) fails validation, naming the line."""
    f = tmp_path / "bad.jsonl"
    for line, message in _UNSTORABLE:
        f.write_text(json.dumps(OK) + "\n" + line + "\n")
        with pytest.raises(ValidationError, match=message):
            db_ingestor.ingest_file("acme/search/p1", f)
    with pytest.raises(ValidationError, match="NUL"):  # the bulk path (the demo's) refuses it too
        db_ingestor.ingest_items("acme/search/p1", [{"kind": "document", "text": "a\x00b"}])
    assert db_ingestor.registry.items("acme/search/p1") == []


_HOSTILE = r"""
import json, sys, time
from fleet.data.ingest import Ingestor
from fleet.registry import Registry

reg = Registry.open_url(sys.argv[1])
reg.add_tenants([("acme", 1.0), ("acme/t", 1.0), ("acme/t/p", 1.0)], base_model="b", rank=8, alpha=16)
ing = Ingestor(reg, lambda texts: [len(t) for t in texts], max_chars=250_000, repeated_min=2)
texts = [
    "Q:" + " " * 200_000,                                # the reported one: cubic in the spaces
    "Q:" + "\t \n" * 66_000 + "A:",
    "<|user|>\n" + "<|eos|>" * 28_000,
    "<|user|>\n" + "x <|eos|> <|assistant|>" * 8_000,
    "Q: a\n" * 20_000 + "<|user|>\nq<|eos|>\n<|assistant|>\na<|eos|>" * 2_000,
]
assert all(len(t) >= 150_000 for t in texts)
t0 = time.perf_counter()
r = ing.ingest_items("acme/t/p", [{"kind": "conversation", "text": t} for t in texts])
seconds = time.perf_counter() - t0
print(json.dumps({"inserted": r.inserted, "chars": sum(map(len, texts)), "seconds": seconds}))
"""


def test_hostile_conversations_are_parsed_in_linear_time(tmp_path):
    """Texts of 150,000-200,000 characters built to make a backtracking parser explode. Linear
    parsing ingests them in well under a second; the 10 s bound leaves room for a loaded machine,
    while the cubic regexes it replaced need hours for the first one alone. In a subprocess, so that
    a regex that never returns (it holds the GIL) fails the test instead of hanging it."""
    import subprocess
    import sys

    try:
        done = subprocess.run(
            [sys.executable, "-c", _HOSTILE, f"sqlite:///{tmp_path / 'h.db'}"],
            capture_output=True,
            text=True,
            timeout=120,  # only reached by a parser that backtracks
        )
    except subprocess.TimeoutExpired:
        pytest.fail("ingesting hostile conversations did not finish (a backtracking parser?)")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["inserted"] == 5 and out["chars"] >= 5 * 150_000
    assert out["seconds"] < 10, out


def test_conversations_as_messages_render_with_the_bases_chat_template(db_ingestor, tmp_path):
    """Structured messages are stored whole, counted and trained in the base template's rendering,
    and their exchanges count as repeated queries; malformed messages are refused by line."""
    from fleet.base.tokenizer import chat_ids
    from fleet.train.data import item_ids

    ing, reg = db_ingestor, db_ingestor.registry
    tok = build_tokenizer()
    ing.render_chat = lambda messages: tok.apply_chat_template(messages, tokenize=False)
    msgs = [
        {"role": "system", "content": "You help the search team."},
        {"role": "user", "content": "Where is the wiki?"},
        {"role": "assistant", "content": "On the third floor."},
    ]
    f = _write(
        tmp_path / "c.jsonl", [{"kind": "conversation", "messages": msgs, "meta": {"channel": "chat"}}]
    )
    report = ing.ingest_file("acme/search/p0", f)
    (item,) = reg.items("acme/search/p0")
    assert item["meta"]["messages"] == msgs and item["meta"]["channel"] == "chat"
    assert (
        item["text"]
        == "system: You help the search team.\nuser: Where is the wiki?\nassistant: On the third floor."
    )
    assert report.tokens == item["tokens"] == len(chat_ids(tok, msgs, add_generation_prompt=False))
    # Training reads the template's rendering, not the neutral text.
    (snap,) = reg.training_snapshot(["acme/search/p0"]).values()
    (ids,) = item_ids(snap.new_items, tok)
    assert ids == chat_ids(tok, msgs, add_generation_prompt=False)
    assert tok.decode(ids).count("<|assistant|>") == 1
    # Re-ingesting the same messages is a duplicate.
    assert ing.ingest_file("acme/search/p0", f).duplicates == 1
    # The exchange is a query: three agreeing askers teach the team, as structured messages too.
    for who in ("p1", "p2"):
        ing.ingest_items(f"acme/search/{who}", [{"kind": "conversation", "messages": msgs[1:]}])
    (team,) = reg.items("acme/search")
    assert team["meta"]["messages"] == msgs[1:] and team["meta"]["source"] == "repeated-query"
    bad = [
        ({"kind": "document", "messages": msgs}, "belongs to a conversation"),
        ({"kind": "conversation", "text": "x", "messages": msgs}, "not both"),
        ({"kind": "conversation", "messages": []}, "non-empty list"),
        ({"kind": "conversation", "messages": [{"role": "user"}]}, r"messages\[0\] must be an object"),
        ({"kind": "conversation", "messages": [{"role": "robot", "content": "hi"}]}, "role must be one of"),
        ({"kind": "conversation", "messages": [{"role": "user", "content": " "}]}, "non-empty string"),
        ({"kind": "conversation", "messages": [{"role": "assistant", "content": "hi"}]}, "at least one user"),
        ({"kind": "conversation", "messages": [{"role": "user", "content": "a\u0000b"}]}, "NUL"),
    ]
    for obj, match in bad:
        g = _write(tmp_path / "bad.jsonl", [{"kind": "document", "text": "fine"}, obj])
        with pytest.raises(ValidationError, match=f"line 2.*{match}|{match}"):
            ing.ingest_file("acme/search/p3", g)
    assert reg.items("acme/search/p3") == []
