"""From committed generation tokens to the answer a client sees: EOS, `max_tokens`, `stop` strings.

The same rules run for streamed and non-streamed requests, block by block as the decode commits
them, so the concatenated stream is exactly the non-streamed text (same request, same seed):

- the answer is the tokens before the first stop token (docs/concepts.md: stop tokens);
- `max_tokens` truncates the answer to that many tokens (it limits the answer, not the canvas);
- a `stop` string cuts the text at its first occurrence;
- while the answer may still grow, the text that could turn out to be the start of a stop string
  (or an incomplete multi-byte character) is held back from the stream.

Once the answer can no longer change (a stop token or string was committed, or `max_tokens` tokens
were), the tracker is `done` and the engine takes the sequence out of the decode.
"""

from __future__ import annotations

from typing import Callable, Sequence


class AnswerTracker:
    """Follows one sequence's committed tokens and tells what text is final and what to stream."""

    def __init__(self, decode: Callable[[list[int]], str], stop_ids: Sequence[int], max_tokens: int | None = None,
                 stop: Sequence[str] = ()):
        self.decode = decode
        self.stop_ids = set(stop_ids)
        self.max_tokens = max_tokens
        self.stop = [s for s in stop if s]
        self.sent = ""  # text already handed out (a prefix of the final text)
        self.done = False
        self.text = ""  # the final text, once done
        self.finish_reason: str | None = None  # "stop" or "length", once done
        self.answer_ids: list[int] = []  # tokens behind the final text, once done

    def update(self, tokens: Sequence[int]) -> str:
        """`tokens`: the committed prefix of the generation. Returns the new text that is safe to send."""
        if self.done:
            return ""
        answer, reason = self._answer(tokens)
        text = self.decode(answer)
        cut = self._first_stop(text)
        if cut is not None:
            text, reason = text[:cut], "stop"
            answer = self._tokens_for(answer, text)
        if reason is not None:
            self._finish(text, reason, answer)
            return self._delta(text)
        return self._delta(text[: len(text) - self._held_back(text)])

    def finish(self, tokens: Sequence[int]) -> str:
        """The whole generation is decided: fix the final text and return what is left to send."""
        sent = self.update(tokens) if not self.done else ""
        if not self.done:  # the canvas ran out before any stop token: the answer is cut by length
            answer, _ = self._answer(tokens)
            self._finish(self.decode(answer), "length", answer)
        return sent + self._delta(self.text, force=True)

    # --- helpers -------------------------------------------------------------------------------
    def _answer(self, tokens: Sequence[int]) -> tuple[list[int], str | None]:
        tokens = list(tokens)
        stop_at = next((i for i, t in enumerate(tokens) if t in self.stop_ids), None)
        answer = tokens if stop_at is None else tokens[:stop_at]
        if self.max_tokens is not None and len(answer) > self.max_tokens:
            return answer[: self.max_tokens], "length"
        if stop_at is not None:
            return answer, "stop"
        if self.max_tokens is not None and len(answer) == self.max_tokens:
            return answer, "length"
        return answer, None

    def _first_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self, text: str) -> int:
        """Characters at the end of `text` that may still become (part of) a stop string."""
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:k]):
                    held = k
                    break
        # an incomplete multi-byte character decodes to U+FFFD until its other bytes arrive
        while held < len(text) and text[len(text) - held - 1] == "\ufffd":
            held += 1
        return held

    def _tokens_for(self, answer: list[int], text: str) -> list[int]:
        """The shortest prefix of `answer` whose text covers `text` (the tokens a stop string kept)."""
        lo, hi = 0, len(answer)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.decode(answer[:mid])) >= len(text):
                hi = mid
            else:
                lo = mid + 1
        return answer[:lo]

    def _finish(self, text: str, reason: str, answer: list[int]) -> None:
        self.done, self.text, self.finish_reason, self.answer_ids = True, text, reason, list(answer)

    def _delta(self, text: str, force: bool = False) -> str:
        if text.startswith(self.sent):
            delta = text[len(self.sent):]
        elif force:  # a tokenizer that re-merges across blocks; send what lies past the sent length
            delta = text[len(self.sent):]
        else:
            return ""
        self.sent += delta
        return delta
