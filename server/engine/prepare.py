"""Request validation and tokenization: what the API does before a request reaches the engine.

Pure CPU and stateless, so it runs wherever the request arrives: in the engine's own process
(`EngineCore.prepare`) or in an API process talking to an engine in another process.
"""

from __future__ import annotations

import itertools

from transformers import PreTrainedTokenizerBase

from ..errors import ContextTooLong, InvalidRequest
from ..limits import MAX_INPUT_CHARS
from ..model import ModelSpec
from .request import Request, SamplingParams, Tenancy


class RequestPreparer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, spec: ModelSpec, max_seq_len: int) -> None:
        self.tokenizer, self.spec, self.max_seq_len = tokenizer, spec, max_seq_len
        self._ids = itertools.count()
        self._texts: dict[int, str] = {}  # token id -> its text alone (log-probability answers)

    @classmethod
    def serving(
        cls, tokenizer: PreTrainedTokenizerBase, spec: ModelSpec, max_seq_len: int | None
    ) -> RequestPreparer:
        """The preparer of an engine configured for rows of `max_seq_len` positions (None or 0: the
        model's n_positions; never more): the engine and every front-end make it here, so they agree."""
        return cls(tokenizer, spec, min(max_seq_len or spec.n_positions, spec.n_positions))

    def prepare(
        self,
        input: str | list[int],
        params: SamplingParams | None,
        prefix_id: str | None,
        prefix_len: int,
        request_id: str | None = None,
        adapter_id: str | None = None,
        tenancy: Tenancy | None = None,
    ) -> Request:
        """Validate and tokenize (safe from any thread). `prefix_len`: the prefix's positions (0: none);
        `adapter_id`: a weight-side adapter carried beside the prefix; `tenancy`: whose request it is."""
        params = params or SamplingParams()
        params.validate(self.spec.vocab_size)
        tenancy = tenancy or Tenancy()
        tenancy.validate()
        prompt_ids = self._tokenize(input)
        self._check_fits(prefix_len, len(prompt_ids), params.max_new_tokens)
        rid = request_id or f"req-{next(self._ids)}"
        return Request(
            rid,
            prompt_ids,
            params,
            prefix_id=prefix_id,
            prefix_len=prefix_len,
            adapter_id=adapter_id,
            tenancy=tenancy,
        )

    def _tokenize(self, input: str | list[int]) -> list[int]:
        if isinstance(input, str):
            if len(input) > MAX_INPUT_CHARS:
                raise InvalidRequest(
                    "input", f"expected at most {MAX_INPUT_CHARS} characters, got {len(input)}"
                )
            ids = self.tokenizer.encode(input, add_special_tokens=False)
        else:
            ids = self.token_ids(input, "input")
        if not ids:
            raise InvalidRequest("input", "expected at least one input token, got an empty input")
        return ids

    def token_text(self, token_id: int) -> str:
        """One token's text on its own (cached: answers with log-probabilities name many tokens)."""
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def token_ids(self, ids: list[int], field: str) -> list[int]:
        """Token ids as given, each checked to be in the vocabulary (InvalidRequest naming `field`)."""
        vocab = self.spec.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(field, f"token ids must be integers in [0, {vocab}), got {bad[0]!r}")
        return list(ids)

    def _check_fits(self, prefix_len: int, input_len: int, max_new_tokens: int) -> None:
        total = prefix_len + input_len + max_new_tokens
        if total > self.spec.n_positions:
            raise ContextTooLong(
                prefix_len, input_len, max_new_tokens, self.spec.n_positions, "model's n_positions"
            )
        if total > self.max_seq_len:
            raise ContextTooLong(
                prefix_len, input_len, max_new_tokens, self.max_seq_len, "engine's max_seq_len"
            )
