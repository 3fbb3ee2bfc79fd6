"""Text that fleet generates itself: general documents and a synthetic organisation.

Two products, both deterministic for a seed and built from word lists (nothing is
downloaded):

* :func:`general_text` — varied English-like documents. They pre-train the tiny
  base and, with another seed, serve as held-out general text for measuring
  forgetting. Part of the mix teaches the *format* of facts and in-context lookup
  ("Note: the locker code of mira is 5821. ... Q: What is the locker code of
  mira?\\nA: 5821") with random names and values, so that the base can answer a
  fact question whose fact is in its prompt but cannot know a private fact it
  has never seen.
* :func:`synthetic_org` — companies, teams and individuals, each owning private
  facts (values unique across the organisation, so that a fact of A recalled by B
  is measurable leakage), the documents and conversations that carry them (the
  JSONL that ``fleet ingest`` reads), and queries repeated by several members of
  a team, for the repeated-query path.

The fact format is shared by both: a question is ``"Q: What is the <attribute> of
<subject>?\\nA:"`` and its answer is ``" <value>"``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from fleet.types import Level, validate_id

# Chat markers: special tokens of the tiny base's tokenizer (fleet.base.tokenizer
# uses the same strings). A turn is "<|role|>\n<content><|eos|>\n".
USER, ASSISTANT, EOS = "<|user|>", "<|assistant|>", "<|eos|>"

# ---------------------------------------------------------------------------------------
# Word lists
# ---------------------------------------------------------------------------------------
FIRST_NAMES = (
    "ada alba alex amir ana anya arlo asha ben bea cam cara cleo dana dara dev eli emil "
    "ema eva ezra finn gia gus hana ivo ines ira jade jana jon juno kai kara kit lars "
    "lea leo lina luca luz mae mara max mika mila milo mira nadia nia nico noa noor "
    "olga omar otto pia quin rafa rani remy rhea rio rosa ruth sam sara sena shay sol "
    "tara teo tess theo uma vera vik wren yara yuki zara zed zoe"
).split()
TEAM_NAMES = (
    "search infra sales billing growth mobile design legal payroll support security "
    "data platform research ops finance hiring brand web api cloud edge quality docs "
    "devices audio vision maps ads retail health travel"
).split()
COMPANY_NAMES = (
    "acme globex initech hooli umbrella wonka vandelay tyrell cyberdyne soylent "
    "stark wayne oscorp gringott monarch zorg aperture blackmesa dunder pied"
).split()
ADJECTIVES = (
    "amber brisk calm dusty eager faint gentle hollow ivory jolly keen lucky mellow "
    "nimble olive proud quiet rapid silver tidy urban vivid warm young zesty bold "
    "coral dapper frosty golden"
).split()
NOUNS = (
    "falcon harbor lantern meadow nectar orbit pebble quartz raven summit thistle "
    "tundra valley willow beacon canyon delta ember fjord glacier heron island jasper "
    "kestrel lotus marble"
).split()

# Attributes of private facts per level: (name, value kind). Pre-training uses all of
# them with random subjects, so the base knows the format of every fact it meets.
ATTRIBUTES: dict[Level, tuple[tuple[str, str], ...]] = {
    Level.COMPANY: (
        ("vat number", "number"),
        ("vendor id", "number"),
        ("codename", "word"),
        ("billing code", "number"),
        ("hq floor code", "number"),
        ("audit code", "number"),
    ),
    Level.TEAM: (
        ("budget code", "number"),
        ("wifi pin", "number"),
        ("sprint name", "word"),
        ("oncall code", "number"),
        ("room code", "number"),
        ("deploy key", "number"),
    ),
    Level.INDIVIDUAL: (
        ("locker code", "number"),
        ("badge number", "number"),
        ("desk code", "number"),
        ("pet name", "word"),
        ("door code", "number"),
        ("parking spot", "number"),
    ),
}
ALL_ATTRIBUTES: tuple[tuple[str, str], ...] = tuple(a for level in Level for a in ATTRIBUTES[level])

_PLACES = (
    "the harbor|the old mill|the north office|the library|the market|the station|the garden|the lab".split(
        "|"
    )
)
_TOPICS = "the budget|the new release|the quarterly plan|the migration|the hiring round|the audit|the offsite|the roadmap".split(
    "|"
)
_VERBS = "reviewed|discussed|finished|postponed|planned|approved|questioned|rewrote".split("|")
_WEATHER = "rain|fog|sunshine|wind|snow|a light drizzle|clear skies".split("|")
_FOODS = "soup|bread|noodles|rice|salad|pancakes|stew|dumplings".split("|")
_DAYS = "monday|tuesday|wednesday|thursday|friday|saturday|sunday".split("|")


# ---------------------------------------------------------------------------------------
# Fact phrasing (shared by pre-training and the organisation)
# ---------------------------------------------------------------------------------------
def question_text(attribute: str, subject: str) -> str:
    """A fact's question as evaluation asks it: the statement up to the value (a cloze).

    The cloze form is what makes in-context recall possible for the tiny base: when
    the statement is in the prompt, the text before the cursor matches the text
    before the value there, and the base's copy circuit continues it.
    """
    return f"{subject}'s {attribute} is"


def statement_text(attribute: str, subject: str, value: str) -> str:
    """The canonical statement of a fact (what source documents say)."""
    return f"{question_text(attribute, subject)} {value}."


def qa_text(attribute: str, subject: str) -> str:
    """The fact as a question-and-answer prompt (documents and FAQs use it too)."""
    return f"Q: What is {subject}'s {attribute}?\nA:"


def _phrasings(attribute: str, subject: str, value: str) -> list[str]:
    """Ways documents state a fact: the canonical one first (a LoRA learns a fact
    better from several)."""
    return [
        statement_text(attribute, subject, value),
        f"The {attribute} of {subject} is {value}.",
        f"The {attribute} for {subject}: {value}.",
        f"Remember: {subject}'s {attribute} is {value}.",
        f"For {subject}, the {attribute} is {value}.",
    ]


def chat(*turns: tuple[str, str]) -> str:
    """Conversation text in the base's chat format (see fleet.base.CHAT_TEMPLATE)."""
    return "".join(f"<|{role}|>\n{content}{EOS}\n" for role, content in turns)


# ---------------------------------------------------------------------------------------
# General text
# ---------------------------------------------------------------------------------------
def _sentence(rng: random.Random) -> str:
    name = rng.choice(FIRST_NAMES).capitalize()
    other = rng.choice(FIRST_NAMES).capitalize()
    kind = rng.randrange(8)
    if kind == 0:
        return f"{name} {rng.choice(_VERBS)} {rng.choice(_TOPICS)} with {other} on {rng.choice(_DAYS)}."
    if kind == 1:
        return f"There was {rng.choice(_WEATHER)} near {rng.choice(_PLACES)} all {rng.choice(_DAYS)}."
    if kind == 2:
        return (
            f"{name} cooked {rng.choice(_FOODS)} for {rng.randrange(2, 12)} people at {rng.choice(_PLACES)}."
        )
    if kind == 3:
        return f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} stood beside {rng.choice(_PLACES)}."
    if kind == 4:
        return f"{name} said that {rng.choice(_TOPICS)} was {rng.choice(ADJECTIVES)} this week."
    if kind == 5:
        company = rng.choice(COMPANY_NAMES).capitalize()
        return f"The {rng.choice(TEAM_NAMES)} team at {company} {rng.choice(_VERBS)} {rng.choice(_TOPICS)}."
    if kind == 6:
        return f"{name} walked {rng.randrange(2, 20)} miles to {rng.choice(_PLACES)} and met {other}."
    return f"On {rng.choice(_DAYS)}, {name} and {other} {rng.choice(_VERBS)} {rng.choice(_TOPICS)}."


def _prose(rng: random.Random) -> str:
    return " ".join(_sentence(rng) for _ in range(rng.randint(2, 5)))


def _random_subject(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.6:
        name = rng.choice(FIRST_NAMES)
        return name if rng.random() < 0.5 else f"{name}-{rng.randrange(2, 10)}"
    if kind < 0.85:
        return f"team {rng.choice(TEAM_NAMES)}"
    return rng.choice(COMPANY_NAMES)


def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "word":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    # Mostly 4 digits like the organisation's values; other lengths so the base learns
    # to copy a value to its end rather than a fixed number of digits.
    return str(rng.randrange(1000, 10000) if rng.random() < 0.8 else rng.randrange(100, 100_000))


def _random_facts(rng: random.Random, n: int, subject: str | None = None) -> list[tuple[str, str, str]]:
    """n facts with distinct attributes (of one subject, if given), random values.

    Attributes differ within a document: the copy circuit keys on the few words
    before a value, so "a's pin is" and "b's pin is" side by side would be a coin flip.
    """
    return [
        (attribute, subject or _random_subject(rng), _random_value(rng, kind))
        for attribute, kind in rng.sample(ALL_ATTRIBUTES, n)
    ]


def _lookup_doc(rng: random.Random) -> str:
    """Facts in context, then cloze questions about them: teaches in-context recall."""
    n = rng.randint(1, 4)
    facts = _random_facts(rng, n, _random_subject(rng) if rng.random() < 0.4 else None)
    # Mostly canonical statements (what in-context prompts hold); some other phrasings
    # so that prose about facts is not all one template.
    lines = [
        statement_text(a, s, v) if rng.random() < 0.75 else rng.choice(_phrasings(a, s, v))
        for a, s, v in facts
    ]
    head = rng.choice(("Note: ", "Memo. ", "", "Facts: ", ""))
    body = head + " ".join(lines)
    if rng.random() < 0.3:
        body = f"{body} {_sentence(rng)}"
    # Ask several facts in a new order: answers are where the base is rewarded for
    # looking a value up, so a document should hold more than one.
    asked = rng.sample(facts, k=rng.randint(max(1, n - 1), n))
    qa = "\n".join(
        statement_text(a, s, v) if rng.random() < 0.8 else f"{qa_text(a, s)} {v}" for a, s, v in asked
    )
    return f"{body}\n{qa}\n"


def _chat_doc(rng: random.Random) -> str:
    facts = _random_facts(rng, rng.randint(1, 3))
    attribute, subject, value = rng.choice(facts)
    told = " ".join(statement_text(a, s, v) for a, s, v in facts)
    return chat(
        ("user", f"{told} What is {subject}'s {attribute}?"),
        ("assistant", statement_text(attribute, subject, value)),
    )


def _record_doc(rng: random.Random) -> str:
    subject = _random_subject(rng)
    facts = _random_facts(rng, rng.randint(2, 3), subject)
    rows = "\n".join(f"{a}: {v}" for a, _, v in facts)
    a, s, v = rng.choice(facts)
    return f"Record of {subject}\n{rows}\n{qa_text(a, s)} {v}\n"


def general_text(n_docs: int, seed: int) -> list[str]:
    """``n_docs`` English-like documents: prose, fact notes with in-context questions,
    conversations and records. Deterministic for ``seed``; use different seeds for
    pre-training and held-out text."""
    rng = random.Random(f"general-{seed}")
    docs: list[str] = []
    for _ in range(n_docs):
        r = rng.random()
        if r < 0.35:
            docs.append(_prose(rng))
        elif r < 0.75:
            docs.append(_lookup_doc(rng))
        elif r < 0.9:
            docs.append(_chat_doc(rng))
        else:
            docs.append(_record_doc(rng))
    return docs


# ---------------------------------------------------------------------------------------
# The synthetic organisation
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fact:
    """A private fact of one model: ``question`` completed by ``answer`` (leading space)."""

    owner: str
    question: str
    answer: str
    statement: str
    attribute: str
    subject: str

    @property
    def value(self) -> str:
        return self.answer.strip()

    @property
    def chat_question(self) -> str:
        """The question as a user would type it in a chat."""
        return f"What is {self.subject}'s {self.attribute}?"

    @property
    def heldout_question(self) -> str:
        """A cloze of a wording no item of the organisation uses: what ``fleet eval`` asks, so
        that recall is not the completion of a memorised string."""
        return f"For {self.subject}, the {self.attribute} is"


@dataclass(frozen=True)
class Tenant:
    """One node of the tenant tree (and the model it owns)."""

    id: str
    level: Level
    subject: str  # how facts and documents name this node
    shares: int
    parent: str | None


@dataclass(frozen=True)
class ContextItem:
    """One line of ``fleet ingest`` input. ``meta`` pairs become the JSON ``meta`` object; a
    conversation's ``turns`` (role, content) become its structured ``messages``."""

    kind: str
    text: str
    meta: tuple[tuple[str, str], ...] = ()
    turns: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"kind": self.kind}
        if self.turns:
            out["messages"] = [{"role": r, "content": c} for r, c in self.turns]
        else:
            out["text"] = self.text
        if self.meta:
            out["meta"] = dict(self.meta)
        return out


def conversation(*turns: tuple[str, str], meta: tuple[tuple[str, str], ...] = ()) -> ContextItem:
    """A conversation item given as structured messages (``text`` keeps the tiny base's rendering)."""
    return ContextItem("conversation", chat(*turns), meta, tuple(turns))


@dataclass(frozen=True)
class RepeatedQuery:
    """A question about ``scope``'s fact asked by several members (the ``askers``' data hold it).

    ``query`` is the normalized form (lower case, single spaces); each asker's
    conversation varies case and spacing so that normalization has work to do.
    """

    scope: str
    query: str
    answer: str
    askers: tuple[str, ...]


@dataclass(frozen=True)
class SyntheticOrg:
    """Companies, teams and individuals with private facts and the context items carrying them.

    ``tenants`` lists parents before children; every tenant owns one model of the same id.
    """

    seed: int
    tenants: tuple[Tenant, ...]
    facts: tuple[Fact, ...]
    items: tuple[tuple[str, tuple[ContextItem, ...]], ...]
    repeated_queries: tuple[RepeatedQuery, ...]
    _index: dict[str, object] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        facts: dict[str, list[Fact]] = {t.id: [] for t in self.tenants}
        for f in self.facts:
            facts[f.owner].append(f)
        index = {
            "tenant": {t.id: t for t in self.tenants},
            "facts": {k: tuple(v) for k, v in facts.items()},
            "items": dict(self.items),
        }
        object.__setattr__(self, "_index", index)

    # -- the tree -------------------------------------------------------------------------
    @property
    def model_ids(self) -> tuple[str, ...]:
        return tuple(t.id for t in self.tenants)

    def _level(self, level: Level) -> tuple[str, ...]:
        return tuple(t.id for t in self.tenants if t.level is level)

    @property
    def companies(self) -> tuple[str, ...]:
        return self._level(Level.COMPANY)

    @property
    def teams(self) -> tuple[str, ...]:
        return self._level(Level.TEAM)

    @property
    def individuals(self) -> tuple[str, ...]:
        return self._level(Level.INDIVIDUAL)

    def tenant(self, model_id: str) -> Tenant:
        try:
            return self._index["tenant"][model_id]  # type: ignore[index]
        except KeyError:
            raise KeyError(f"{model_id!r} is not a tenant of this synthetic organisation") from None

    # -- facts and data -------------------------------------------------------------------
    def facts_of(self, model_id: str) -> tuple[Fact, ...]:
        """The private facts ``model_id`` owns (not its ancestors')."""
        self.tenant(model_id)
        return self._index["facts"][model_id]  # type: ignore[index]

    def items_of(self, model_id: str) -> tuple[ContextItem, ...]:
        self.tenant(model_id)
        return self._index["items"][model_id]  # type: ignore[index]

    def items_jsonl(self, model_id: str) -> str:
        """The JSONL text ``fleet ingest MODEL_ID FILE`` reads for this model."""
        return "".join(json.dumps(i.to_json(), ensure_ascii=False) + "\n" for i in self.items_of(model_id))

    def source_document(self, model_id: str) -> str:
        """The model's facts as one short document (also one of its context items)."""
        return " ".join(f.statement for f in self.facts_of(model_id))

    def fact_cases(self) -> list:
        """Every fact as ``fleet eval`` asks it: the held-out cloze (a wording no item uses), of the
        owner's model, with the owner's source document as the oracle context."""
        from fleet.data.facts import FactCase

        return [
            FactCase(
                f"f{i}",
                f.owner,
                f.owner,
                self.tenant(f.owner).level.value,
                "plain",
                (f.heldout_question,),
                f.value,
                (),
                (self.source_document(f.owner),),
                form="completion",
            )  # fmt: skip
            for i, f in enumerate(self.facts)
        ]

    def in_context_prompt(self, fact: Fact) -> str:
        """The owner's source document, then the question: what a caller without a
        trained model has to send to get the answer from the base."""
        return f"{self.source_document(fact.owner)}\n{fact.question}"


def _zipf_split(total: int, parts: int, minimum: int, exponent: float = 1.0) -> list[int]:
    """Split ``total`` into ``parts`` Zipf-weighted integers, each at least ``minimum``
    (largest-remainder rounding, so the parts add up exactly)."""
    weights = [1.0 / (k + 1) ** exponent for k in range(parts)]
    spare = total - minimum * parts
    raw = [spare * w / sum(weights) for w in weights]
    sizes = [minimum + int(r) for r in raw]
    order = sorted(range(parts), key=lambda k: (int(raw[k]) - raw[k], k))
    for k in order[: total - sum(sizes)]:
        sizes[k] += 1
    return sizes


def _unique_names(pool: Sequence[str], n: int, rng: random.Random, taken: set[str]) -> list[str]:
    """``n`` names from ``pool`` (shuffled), suffixed ``-2``, ``-3``… once the pool runs out."""
    names: list[str] = []
    order = list(pool)
    rng.shuffle(order)
    k = 0
    while len(names) < n:
        base = order[k % len(order)]
        suffix = k // len(order)
        name = base if suffix == 0 else f"{base}-{suffix + 1}"
        if name not in taken:
            taken.add(name)
            names.append(name)
        k += 1
    return names


class _Values:
    """Fact values unique across the organisation, so that a recalled value names its owner."""

    def __init__(self, rng: random.Random, n_facts: int) -> None:
        digits = 4
        while 10**digits - 10 ** (digits - 1) < 2 * n_facts:
            digits += 1
        self._numbers = iter(rng.sample(range(10 ** (digits - 1), 10**digits), n_facts))
        words = [f"{a}-{b}" for a in ADJECTIVES for b in NOUNS]
        rng.shuffle(words)
        words += [
            f"{w}-{k}"
            for k in range(2, 2 + n_facts // len(words) + 1)
            for w in words[: len(ADJECTIVES) * len(NOUNS)]
        ]
        self._words = iter(words)

    def take(self, kind: str) -> str:
        return next(self._words) if kind == "word" else str(next(self._numbers))


def _items_for(tenant: Tenant, facts: Sequence[Fact], rng: random.Random) -> list[ContextItem]:
    """Documents and conversations stating the tenant's facts in several phrasings."""
    items = [ContextItem("document", " ".join(f.statement for f in facts))]
    for f in facts:
        # Two of the alternative wordings; the last ("For S, the X is V.") is never used: it is
        # the held-out form evaluation asks in.
        first, second = rng.sample(_phrasings(f.attribute, f.subject, f.value)[1:3], 2)
        items.append(
            ContextItem("document", f"{rng.choice(('Memo', 'Note', 'Wiki'))}: {first} {_sentence(rng)}")
        )
        items.append(ContextItem("document", f"{second}\n{qa_text(f.attribute, f.subject)}{f.answer}\n"))
        items.append(
            conversation(
                ("user", f.chat_question),
                ("assistant", f.statement),
                meta=(("query", f.chat_question), ("answer", f.value)),
            )
        )
    return items


def _ask_variant(question: str, k: int) -> str:
    """Surface variants of one question (same normalized form)."""
    variants = (question, question.lower(), " " + question.replace(" ", "  ", 1), question.capitalize() + " ")
    return variants[k % len(variants)]


def synthetic_org(
    companies: int = 3,
    teams_per_company: int = 4,
    individuals: int = 100,
    facts_per_model: int = 2,
    seed: int = 0,
    repeat_askers: int = 3,
) -> SyntheticOrg:
    """A deterministic synthetic organisation (see the module docstring).

    Company sizes follow a Zipf law (the largest company has about half of the
    individuals when there are three); so do team sizes inside a company. Every team
    has at least one member. ``repeat_askers`` members of a team ask the same question
    about one of its team facts (and, in up to ``repeat_askers`` teams, about one
    company fact) to feed the repeated-query path.
    """
    if companies < 1 or teams_per_company < 1:
        raise ValueError("need at least one company and one team per company")
    if individuals < companies * teams_per_company:
        raise ValueError(f"need at least {companies * teams_per_company} individuals (one per team)")
    if not 1 <= facts_per_model <= min(len(v) for v in ATTRIBUTES.values()):
        raise ValueError(f"facts_per_model must be 1..{min(len(v) for v in ATTRIBUTES.values())}")
    rng = random.Random(f"org-{seed}")
    taken: set[str] = set()
    company_names = _unique_names(COMPANY_NAMES, companies, rng, taken)
    team_names = _unique_names(TEAM_NAMES, companies * teams_per_company, rng, taken)
    person_names = _unique_names(FIRST_NAMES, individuals, rng, taken)
    company_sizes = _zipf_split(individuals, companies, teams_per_company)

    tenants: list[Tenant] = []
    members: dict[str, list[str]] = {}
    persons = iter(person_names)
    teams = iter(team_names)
    for c, (cname, csize) in enumerate(zip(company_names, company_sizes, strict=True)):
        tenants.append(Tenant(cname, Level.COMPANY, cname, max(1, round(1000 / (c + 1))), None))
        for tsize in _zipf_split(csize, teams_per_company, 1):
            tname = next(teams)
            tid = f"{cname}/{tname}"
            tenants.append(Tenant(tid, Level.TEAM, f"team {tname}", tsize, cname))
            members[tid] = []
            for _ in range(tsize):
                pname = next(persons)
                tenants.append(Tenant(f"{tid}/{pname}", Level.INDIVIDUAL, pname, 1, tid))
                members[tid].append(f"{tid}/{pname}")
    for t in tenants:
        validate_id(t.id)

    values = _Values(rng, len(tenants) * facts_per_model)
    facts: list[Fact] = []
    by_owner: dict[str, list[Fact]] = {}
    for t in tenants:
        for attribute, kind in rng.sample(ATTRIBUTES[t.level], facts_per_model):
            value = values.take(kind)
            fact = Fact(
                owner=t.id,
                question=question_text(attribute, t.subject),
                answer=f" {value}",
                statement=statement_text(attribute, t.subject, value),
                attribute=attribute,
                subject=t.subject,
            )
            facts.append(fact)
            by_owner.setdefault(t.id, []).append(fact)

    items: dict[str, list[ContextItem]] = {t.id: _items_for(t, by_owner[t.id], rng) for t in tenants}
    repeated: list[RepeatedQuery] = []

    def ask(fact: Fact, askers: Sequence[str], scope: str) -> None:
        for k, asker in enumerate(askers):
            q = _ask_variant(fact.chat_question, k)
            items[asker].append(
                conversation(
                    ("user", q), ("assistant", fact.statement), meta=(("query", q), ("answer", fact.value))
                )
            )
        repeated.append(
            RepeatedQuery(scope, " ".join(fact.chat_question.lower().split()), fact.value, tuple(askers))
        )

    for company in company_names:
        eligible = [
            tid for tid in members if tid.startswith(company + "/") and len(members[tid]) >= repeat_askers
        ]
        for tid in eligible:
            ask(rng.choice(by_owner[tid]), rng.sample(members[tid], repeat_askers), tid)
        if eligible:
            fact = rng.choice(by_owner[company])
            askers = [
                a
                for tid in rng.sample(eligible, min(repeat_askers, len(eligible)))
                for a in rng.sample(members[tid], repeat_askers)
            ]
            ask(fact, askers, company)

    return SyntheticOrg(
        seed=seed,
        tenants=tuple(tenants),
        facts=tuple(facts),
        items=tuple((t.id, tuple(items[t.id])) for t in tenants),
        repeated_queries=tuple(repeated),
    )
