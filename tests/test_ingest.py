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


@pytest.fixture
def ingestor(tmp_path, counter):
    reg = Registry.open_url(f"sqlite:///{tmp_path / 'fleet.db'}")
    reg.add_tenants(
        [("acme", 1.0), ("acme/search", 1.0), ("acme/ads", 1.0), ("acme/ml", 1.0)]
        + [(f"acme/search/p{i}", 1.0) for i in range(4)]
        + [("acme/ads/q0", 1.0), ("acme/ml/r0", 1.0)],
        base_model="tiny",
        rank=8,
        alpha=16,
    )
    yield Ingestor(reg, counter, max_chars=1000, repeated_min=3)
    reg.close()


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
