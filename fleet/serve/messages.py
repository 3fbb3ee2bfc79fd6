"""What the ingress sends a model replica and what comes back: small frozen dataclasses (they
cross Ray Serve handles pickled), so that both sides name the same fields.

- ``ReplicaRequest``: one completion to run (the stack's adapter versions, prompt ids, sampling,
  stop strings, log-probs, and for a stream resumed on another replica the tokens and text
  already sent);
- ``Completion``: a whole answer (``ModelServer.generate``);
- ``StreamStart`` → ``StreamDelta``\\* → ``StreamEnd``: a stream (``ModelServer.stream``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from fleet.registry import StackEntry


@dataclass(frozen=True)
class ReplicaRequest:
    entries: tuple[StackEntry, ...]
    """The stack's versions, company first (the replica falls back to earlier ones it may serve)."""
    prompt_ids: tuple[int, ...]
    max_tokens: int
    company: str = ""
    """Whose request it is: the batcher's fair share across companies."""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    """Top-k log-probabilities per returned token (legacy completions), or None."""
    echo: bool = False
    resume_ids: tuple[int, ...] = ()
    """Tokens a stream already generated on a replica that went away."""
    resume_text: str = ""
    """Text already sent for them."""

    @classmethod
    def of(cls, entries: Sequence[StackEntry], prompt_ids: Sequence[int], max_tokens: int, **kw: Any):
        return cls(
            tuple(entries),
            tuple(int(t) for t in prompt_ids),
            int(max_tokens),
            stop=tuple(kw.pop("stop", None) or ()),
            **kw,
        )

    def resumed(self, ids: Sequence[int], text: str) -> ReplicaRequest:
        """The same request, to continue on another replica after ``ids`` (``text`` sent)."""
        return replace(self, resume_ids=tuple(int(t) for t in ids), resume_text=text)


@dataclass(frozen=True)
class Completion:
    served_by: str
    """The stack that actually served (an earlier version when the active one could not load)."""
    fallbacks: int
    text: str
    finish_reason: str
    completion_tokens: int
    logprobs: dict[str, Any] | None = None
    ttft_s: float | None = None


@dataclass(frozen=True)
class StreamStart:
    served_by: str
    fallbacks: int


@dataclass(frozen=True)
class StreamDelta:
    text: str
    ids: tuple[int, ...]
    """The tokens behind ``text`` (and any held back while a stop string may be starting)."""


@dataclass(frozen=True)
class StreamEnd:
    text: str
    finish_reason: str
    completion_tokens: int


StreamEvent = StreamStart | StreamDelta | StreamEnd
