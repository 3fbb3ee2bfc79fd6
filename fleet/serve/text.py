"""Token ids → text for one completion, incrementally, with stop strings: what a stream may send.

The engine thread never decodes text: it produces token ids, and each request turns its own ids
into text here, on the replica's event loop, at O(1) cost per token. Decoding the whole completion
again for every token (what a naive stream does) costs O(n²) per request and, for 64 streams,
more than the decode step itself.

Incremental decoding is vLLM's: decode a short window that starts a few tokens back
(``prefix``..end) and take what it adds over the same window without the new tokens. The window's
first tokens carry context (a SentencePiece tokenizer drops a leading space at the start of a
decode), and text ending in U+FFFD (an incomplete UTF-8 sequence that a later token completes) is
held back until it completes. The final text is one full decode, so it is exact whatever the
tokenizer does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_REPLACEMENT = "\ufffd"


class TextStream:
    """A completion's text as its tokens arrive: ``add`` tokens, read ``sendable``, check ``stopped``.

    ``stop`` strings end the completion (not included). Text that a stop string might still swallow
    (its last ``len(longest stop) - 1`` characters) is not sendable yet. ``ids``/``sent`` resume a
    completion that another replica began (its tokens so far and the text already sent).
    """

    def __init__(
        self, tokenizer: Any, stop: Sequence[str] = (), *, ids: Sequence[int] = (), sent: str = ""
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = [int(t) for t in ids]
        self.text = self._decode(self.ids) if self.ids else ""
        self._exact = True  # ``text`` is the full decode of ``ids`` (until tokens are added)
        self.sent = sent
        self.final: str | None = None  # the completion's text once a stop string was found
        self._prefix = max(0, len(self.ids) - 4)
        self._read = len(self.ids)
        # Resumed: the text sent holds no stop string, but the tokens' text past it may.
        self._checked = min(len(self.text), len(sent))
        if self.stop and self.ids:
            self._find_stop()

    @property
    def stopped(self) -> bool:
        return self.final is not None

    def add(self, tokens: Sequence[int]) -> None:
        """Append generated tokens; stops at (and keeps only the text before) the first stop string."""
        if self.stopped:
            return
        for token in tokens:
            self._exact = False
            self.ids.append(int(token))
            before = self._decode(self.ids[self._prefix : self._read])
            after = self._decode(self.ids[self._prefix :])
            if len(after) > len(before) and not after.endswith(_REPLACEMENT):
                self.text += after[len(before) :]
                self._prefix, self._read = self._read, len(self.ids)
            if self.stop and self._find_stop():
                return

    def sendable(self) -> str:
        """Text no stop string can still change that has not been sent yet; marks it sent."""
        if self.stopped:
            safe = self.final or ""
        else:
            safe = self.text[: len(self.text) - self._hold] if self._hold else self.text
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""
        delta = safe[len(self.sent) :]
        self.sent = safe
        return delta

    def finish(self) -> str:
        """The completion's exact final text (one full decode, cut at a stop string if one was found)."""
        if self.final is None:
            full = self.text if self._exact else self._decode(self.ids)
            hit = self._first_stop(full, 0)
            self.final = full if hit is None else full[:hit]
        return self.final

    def rest(self) -> str:
        """The final text that has not been sent (what a last message carries)."""
        final = self.finish()
        tail = final[len(self.sent) :] if final.startswith(self.sent) else ""
        self.sent = final if final.startswith(self.sent) else self.sent
        return tail

    # ------------------------------------------------------------------ internals
    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def _find_stop(self) -> bool:
        hit = self._first_stop(self.text, max(0, self._checked - self._hold))
        self._checked = len(self.text)
        if hit is None:
            return False
        self.final = self.text[:hit]
        return True

    def _first_stop(self, text: str, start: int) -> int | None:
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None
