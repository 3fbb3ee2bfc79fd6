"""fleet.data: private context in, and synthetic organisations to measure fleet with.

- ``Ingestor`` (``fleet ingest``: validated JSONL items into the registry, repeated queries
  promoted only when members agree), ``parse_jsonl``, ``IngestReport``, ``tokenizer_counter``;
- ``FactCase`` / ``read_facts_jsonl``: the facts file ``fleet eval --facts`` reads;
- ``synthetic_org`` (the tiny base's organisation, cloze facts) and ``casebook`` (chat questions
  in held-out forms, for a real base), both deterministic for a seed;
- ``general_passages`` / ``GENERAL_INSTRUCTIONS``: public-domain general text for replay and
  the forgetting measures.
"""

from __future__ import annotations

from fleet._lazy import lazy_exports

_EXPORTS = {
    "Ingestor": "fleet.data.ingest",
    "IngestReport": "fleet.data.ingest",
    "parse_jsonl": "fleet.data.ingest",
    "tokenizer_counter": "fleet.data.ingest",
    "FactCase": "fleet.data.facts",
    "read_facts_jsonl": "fleet.data.facts",
    "synthetic_org": "fleet.data.synth",
    "SyntheticOrg": "fleet.data.synth",
    "ContextItem": "fleet.data.synth",
    "casebook": "fleet.data.casebook",
    "Casebook": "fleet.data.casebook",
    "general_passages": "fleet.data.corpus",
    "GENERAL_INSTRUCTIONS": "fleet.data.corpus",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
