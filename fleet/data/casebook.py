"""A synthetic organisation for measuring what fleet is for, on a real base: the casebook.

Companies, teams and individuals whose context states facts in ordinary prose and chat, and the
questions their models should then answer *without* that context — asked in forms that never
occur in the training data:

- **individual** facts (a locker, a badge, a parking spot), asked in the third person and, of
  the owner's own model, in the first person ("What's the number on my badge?");
- **updated** facts: a later note changes a value (a desk move); the new value must win and the
  old one must not be given;
- **two-hop** facts spanning two documents: an individual's note says which project they work on,
  the team's wiki says when that project deploys ("On which day does Dana's project ship?");
- **team** and **company** facts, asked of members' models (their stacks carry the parents'
  adapters);
- **repeated** queries: several members of a team ask the same question and get the same answer in
  conversations; the team's model learns it, and a member who never asked is asked;
- **personal** repeated queries ("what is my badge number?") answered differently for each asker:
  they must stay personal (never promoted), and are the teammate leakage probe.

Everything is deterministic for a seed; values are unique across the organisation, so a value
recalled by the wrong model is measurable leakage. ``facts_jsonl`` writes the facts file that
``fleet eval --facts`` reads (the format is in the README).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from fleet.data.facts import FactCase
from fleet.data.synth import COMPANY_NAMES, FIRST_NAMES, NOUNS, TEAM_NAMES, ContextItem, conversation

OFFICES = ("Harbor", "Lantern", "Summit", "Meadow", "Quarry", "Beacon")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
HALLS = ("Juniper", "Cedar", "Maple", "Willow", "Aspen", "Birch")
_FILLER = (
    "Coffee is free on the fourth floor.",
    "Visitors sign in at the front desk.",
    "The printer on the east wing jams on thick paper.",
    "Lunch orders close at eleven.",
    "Fire drills happen on the first day of each quarter.",
    "Bicycles go in the rack by the loading dock.",
)


@dataclass(frozen=True)
class Casebook:
    seed: int
    tenants: tuple[tuple[str, float], ...]  # (id, shares), parents before children
    items: dict[str, tuple[ContextItem, ...]]  # what is ingested first
    later: dict[str, tuple[ContextItem, ...]]  # what arrives after the first cycle (updates)
    facts: tuple[FactCase, ...]
    personal: tuple[tuple[str, str, str], ...]  # (asker, question, own answer): must stay personal
    names: dict[str, str] = field(default_factory=dict)  # model id → how documents name it

    @property
    def model_ids(self) -> tuple[str, ...]:
        return tuple(t for t, _ in self.tenants)

    @property
    def individuals(self) -> tuple[str, ...]:
        return tuple(t for t, _ in self.tenants if t.count("/") == 2)

    def facts_jsonl(self) -> str:
        return "".join(json.dumps(f.to_json(), ensure_ascii=False) + "\n" for f in self.facts)

    def visible(self, model_id: str, *, later: bool = True) -> list[str]:
        """Texts of every item the model's stack has learned from (its own and its ancestors')."""
        parts = model_id.split("/")
        out = []
        for k in range(1, len(parts) + 1):
            mid = "/".join(parts[:k])
            for it in self.items.get(mid, ()) + (self.later.get(mid, ()) if later else ()):
                out.append(it.text)
        return out


class _Unique:
    """Values drawn without repetition across the organisation."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.used = rng, set()

    def take(self, make) -> str:
        while True:
            v = make(self.rng)
            if v not in self.used:
                self.used.add(v)
                return v


def casebook(
    *, companies: int = 3, teams_per_company: int = 2, individuals_per_team: int = 4, seed: int = 0
) -> Casebook:
    """The organisation: ``companies`` × ``teams_per_company`` × ``individuals_per_team`` people."""
    if individuals_per_team < 4:
        raise ValueError("a team needs at least 4 individuals (3 ask the repeated query, 1 does not)")
    rng = random.Random(f"casebook:{seed}")
    uniq = _Unique(rng)
    num = lambda r: str(r.randrange(1000, 10000))  # noqa: E731
    spot = lambda r: f"{r.choice('ABCDEFGH')}-{r.randrange(1, 100):02d}"  # noqa: E731
    desk = lambda r: f"{r.choice('DEKLMNPR')}{r.randrange(10, 100)}"  # noqa: E731
    tenants: list[tuple[str, float]] = []
    items: dict[str, list[ContextItem]] = {}
    later: dict[str, list[ContextItem]] = {}
    facts: list[FactCase] = []
    personal: list[tuple[str, str, str]] = []
    names: dict[str, str] = {}
    cos = rng.sample(COMPANY_NAMES, companies)
    people = iter(rng.sample(FIRST_NAMES, companies * teams_per_company * individuals_per_team))
    team_pool = iter(rng.sample(TEAM_NAMES, companies * teams_per_company))
    project_pool = iter(rng.sample(NOUNS, 2 * companies * teams_per_company))

    def fact(model, owner, level, kind, questions, answer, sources, stale=()):
        facts.append(
            FactCase(
                f"f{len(facts)}",
                model,
                owner,
                level,
                kind,
                tuple(questions),
                answer,
                tuple(stale),
                tuple(sources),
            )
        )

    for c_i, co in enumerate(cos):
        Co = co.capitalize()
        tenants.append((co, float(companies - c_i)))
        names[co] = Co
        vat, hall = uniq.take(num), uniq.take(lambda r: r.choice(HALLS) + " hall")
        co_doc = (
            f"{Co} staff handbook. {Co}'s VAT number is {vat}. The all-hands meeting of {Co} takes place "
            f"in the {hall}. {rng.choice(_FILLER)}"
        )
        items[co] = [ContextItem("document", co_doc)]
        members_of_co: list[str] = []
        for _ in range(teams_per_company):
            team = next(team_pool)
            tid = f"{co}/{team}"
            tenants.append((tid, 1.0))
            names[tid] = f"the {team} team"
            room = uniq.take(lambda r: f"{r.randrange(1, 9)}{r.choice('ABCDEF')}")
            budget = uniq.take(num)
            projects = [next(project_pool).capitalize() for _ in range(2)]
            days = rng.sample(DAYS, 2)
            team_doc = (
                f"Wiki of the {team} team at {Co}. The {team} team's stand-up is held in room {room}. "
                f"The {team} team's budget code is {budget}. Project {projects[0]} deploys every "
                f"{days[0]}, and project {projects[1]} deploys every {days[1]}. {rng.choice(_FILLER)}"
            )
            items[tid] = [ContextItem("document", team_doc)]
            wifi = uniq.take(lambda r: f"{r.choice(NOUNS)}-{r.randrange(10, 100)}")
            members = []
            for k in range(individuals_per_team):
                p = next(people)
                P = p.capitalize()
                pid = f"{tid}/{p}"
                members.append(pid)
                tenants.append((pid, 1.0))
                names[pid] = P
                v = {
                    "locker": uniq.take(num),
                    "badge": uniq.take(num),
                    "spot": uniq.take(spot),
                    "desk": uniq.take(desk),
                    "new_desk": uniq.take(desk),
                }
                proj = k % 2
                office = rng.choice(OFFICES)
                doc1 = (
                    f"Onboarding notes for {P}: {P}'s locker at the {office} office is number "
                    f"{v['locker']}. {P}'s badge number is {v['badge']}. {P} works on project {projects[proj]}."
                )
                doc2 = f"{P} parks in spot {v['spot']} of the north garage and sits at desk {v['desk']}. {rng.choice(_FILLER)}"
                upd = f"Update for {P}: {P} has moved from desk {v['desk']} to desk {v['new_desk']}."
                badge_chat = conversation(
                    ("user", "What is my badge number?"), ("assistant", f"Your badge number is {v['badge']}.")
                )
                items[pid] = [ContextItem("document", doc1), ContextItem("document", doc2), badge_chat]
                later[pid] = [ContextItem("document", upd)]
                personal.append((pid, "What is my badge number?", v["badge"]))
                fact(pid, pid, "individual", "personal", ["What is my badge number?"], v["badge"], [doc1])
                fact(pid, pid, "individual", "plain",
                     [f"Could you remind me which locker number {P} has?", "Which number does my locker have?"],
                     v["locker"], [doc1])  # fmt: skip
                fact(pid, pid, "individual", "plain",
                     [f"What digits are printed on {P}'s badge?", "Tell me the digits on my badge."],
                     v["badge"], [doc1])  # fmt: skip
                fact(pid, pid, "individual", "plain",
                     [f"In which garage spot does {P} leave the car?", "Where do I park in the north garage?"],
                     v["spot"], [doc2])  # fmt: skip
                fact(pid, pid, "individual", "updated",
                     [f"At which desk does {P} sit now?", "Which desk am I at these days?"],
                     v["new_desk"], [doc2, upd], stale=[v["desk"]])  # fmt: skip
                fact(pid, pid, "individual", "two_hop",
                     [f"On which weekday does {P}'s project deploy?", "What day of the week does my project ship?"],
                     days[proj], [doc1, team_doc])  # fmt: skip
            # Three members ask the team's wifi password and get the same answer; the fourth never asks.
            for asker in members[:3]:
                items[asker].append(
                    conversation(
                        ("user", f"What's the wifi password in room {room}?"),
                        ("assistant", f"The wifi password is {wifi}."),
                    )
                )
            repeated_src = f"The wifi password in room {room} is {wifi}."
            asked_by = members[3]
            fact(asked_by, tid, "team", "repeated",
                 [f"Which password gets me onto the wifi in room {room}?"], wifi, [repeated_src])  # fmt: skip
            for m in (members[0], members[-1]):
                fact(m, tid, "team", "plain",
                     [f"In which room does the {team} team meet for stand-up?"], room, [team_doc])  # fmt: skip
                fact(m, tid, "team", "plain",
                     [f"Which code do I book {team} team expenses against?"], budget, [team_doc])  # fmt: skip
            members_of_co += members
        for m in (members_of_co[0], members_of_co[-1]):
            fact(m, co, "company", "plain", [f"What VAT number does {Co} file under?"], vat, [co_doc])
            fact(m, co, "company", "plain", [f"Where does the {Co} all-hands happen?"], hall, [co_doc])
    return Casebook(
        seed,
        tuple(tenants),
        {k: tuple(v) for k, v in items.items()},
        {k: tuple(v) for k, v in later.items()},
        tuple(facts),
        tuple(personal),
        names,
    )
