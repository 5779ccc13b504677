"""Incremental detokenization with stop strings, one object per request.

Decoding only a small window of recent tokens each step keeps the cost per token constant; a token
that ends in the middle of a UTF-8 character is held until the character is complete. Text that
could still become the start of a stop string is held back from the stream, so a client never sees
part of a stop string. Front-ends only (frontend.py): the engine core makes token ids.
"""

from __future__ import annotations

from dataclasses import replace

from transformers import PreTrainedTokenizerBase

from .request import FinishReason, RequestOutput


class Detokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()) -> None:
        self._tok = tokenizer
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1  # chars that may start a stop string
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: tokens before it are already text
        self._read_offset = 0  # tokens up to here are in self.text
        self.text = ""  # all text so far (truncated at a stop string once one is found)
        self._sent = 0  # characters of self.text already streamed
        self.stopped = False

    def apply(self, out: RequestOutput) -> RequestOutput:
        """An engine's output (token ids) with its text; a stop string found here finishes it (STOP)."""
        reason = out.finish_reason
        for token in out.token_ids:
            if reason != FinishReason.EOS:  # the EOS token itself is not text
                self.add(token)
        if reason is None and self.stopped:
            reason = FinishReason.STOP
        return replace(out, text=self.emit(final=reason is not None), finish_reason=reason)

    def add(self, token_id: int) -> None:
        """Append one generated token; sets `stopped` when a stop string appears."""
        self._ids.append(token_id)
        prev = self._decode(self._prefix_offset, self._read_offset)
        new = self._decode(self._prefix_offset, len(self._ids))
        if len(new) <= len(prev) or new.endswith("\ufffd"):
            return  # an incomplete character: wait for the next token
        delta = new[len(prev) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._append(delta)

    def _decode(self, start: int, end: int) -> str:
        return self._tok.decode(self._ids[start:end], skip_special_tokens=False) if end > start else ""

    def _append(self, delta: str) -> None:
        search_from = max(0, len(self.text) - self._hold)
        self.text += delta
        hits = [i for s in self._stop if (i := self.text.find(s, search_from)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def emit(self, final: bool) -> str:
        """Text not yet streamed that can safely be shown now (everything, when final)."""
        if final and not self.stopped and self._read_offset < len(self._ids):
            # a trailing incomplete character: show what the tokenizer makes of it
            tail = self._decode(self._prefix_offset, len(self._ids))
            self._append(tail[len(self._decode(self._prefix_offset, self._read_offset)) :])
            self._read_offset = len(self._ids)
        end = len(self.text) if final or self.stopped else max(self._sent, len(self.text) - self._hold)
        out = self.text[self._sent : end]
        self._sent = end
        return out
