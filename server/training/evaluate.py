"""Evaluating a prefix on (input, output) examples: greedy generation through the engine, then BLEU
(sacrebleu), ROUGE-L (rouge-score), exact match, and the mean per-token loss of the reference outputs.

The examples are what training sees: the input, the prefix's separator, and the output ended by EOS
(`trainer.encode_example`). Generation stops at EOS (or `max_new_tokens`); the loss is the engine's own
scoring (prompt log-probabilities) of `[x; sep; y; eos]` on y and eos, the tokens training's loss is
taken on, so an evaluation's loss of a trained prefix matches the trainer's validation loss.

Runs wherever a job runs (the training worker): an `EngineCore` of its own over the served model's
weights, with the one prefix registered, continuous-batching every example.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ..engine import EngineConfig, EngineCore, OfflineEngine, SamplingParams
from ..engine.prefixes import PrefixState
from ..errors import InvalidRequest
from ..model import LoadedModel, Tokenized
from .trainer import IGNORE, encode_example

METRICS = ("bleu", "rouge_l", "exact_match", "loss")
EVAL_ROWS = 8  # requests in the evaluation engine's batch


@dataclass(frozen=True)
class EvalConfig:
    metrics: tuple[str, ...] = METRICS
    max_new_tokens: int = 64  # generation per example (ends earlier at EOS)
    separator: str = ""  # between input and output: the prefix's own (a trained prefix's separator)

    def __post_init__(self) -> None:
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise InvalidRequest("metrics", f"expected some of {list(METRICS)}, got {list(self.metrics)}")


@dataclass
class Evaluation:
    """An evaluation's result, stored with the prefix."""

    job_id: str
    prefix_id: str
    tenant: str  # who asked (only they see it)
    n_examples: int
    metrics: dict[str, float]
    config: dict
    samples: list[dict] = field(default_factory=list)  # the first few: input, reference, prediction
    created_at: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def check_examples(pairs: list[tuple[str, str]], model: Tokenized, prefix_len: int, cfg: EvalConfig) -> None:
    """InvalidRequest for an example that cannot run: empty, or longer than the model's positions."""
    if not pairs:
        raise InvalidRequest("examples", "expected at least one example, got none")
    limit = model.spec.n_positions - prefix_len
    for i, (x, y) in enumerate(pairs):
        if not x.strip() or not y.strip():
            raise InvalidRequest(f"examples[{i}]", "input and output must not be empty")
        ids, _ = encode_example(model.tokenizer, x, y, cfg.separator)
        prompt = len(model.tokenizer.encode(x + cfg.separator, add_special_tokens=False))
        if max(len(ids), prompt + cfg.max_new_tokens) > limit:
            raise InvalidRequest(
                f"examples[{i}]",
                f"{len(ids)} tokens (input + separator + output + eos), or {prompt} + max_new_tokens"
                f" {cfg.max_new_tokens}, exceed the {limit} positions after the prefix",
            )


def evaluate(
    model: LoadedModel,
    prefix_id: str | None,
    prefix: PrefixState | None,
    pairs: list[tuple[str, str]],
    cfg: EvalConfig,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
) -> tuple[dict[str, float], list[str]]:
    """Generate for every example, score every reference; returns the metrics and the predictions."""
    core = EngineCore(model, EngineConfig(max_running=EVAL_ROWS, max_waiting=len(pairs) * 2 + 1))
    if prefix_id is not None:
        core.prefixes.register(prefix_id, prefix)
    engine = OfflineEngine(core)  # (its text made as the server's front-ends make it)
    score = SamplingParams(max_new_tokens=0, prompt_logprobs=0)
    wants_loss = "loss" in cfg.metrics
    room = core.max_seq_len - (0 if prefix is None else core.prefixes.length(prefix_id))
    spans: dict[str, int] = {}  # score request -> index of the first labelled token
    for i, (x, y) in enumerate(pairs):
        prompt = model.tokenizer.encode(x + cfg.separator, add_special_tokens=False)
        # (a held-out training example is only known to fit with its own output: generate what fits)
        greedy = SamplingParams(max_new_tokens=max(1, min(cfg.max_new_tokens, room - len(prompt))))
        engine.add_request(prompt, greedy, prefix_id=prefix_id, request_id=f"gen-{i}")
        if wants_loss:
            ids, labels = encode_example(model.tokenizer, x, y, cfg.separator)
            spans[f"loss-{i}"] = next(j for j, t in enumerate(labels) if t != IGNORE)
            engine.add_request(ids, score, prefix_id=prefix_id, request_id=f"loss-{i}")
    texts: dict[str, list[str]] = {}
    nll, count, done, total = 0.0, 0, 0, len(pairs) + len(spans)
    while engine.has_work:
        for out in engine.step():
            if out.error is not None:
                raise out.error
            texts.setdefault(out.request_id, []).append(out.text)
            if out.prompt_logprobs is not None:
                scored = out.prompt_logprobs[spans[out.request_id] :]
                nll -= sum(e.logprob for e in scored)
                count += len(scored)
            if out.finished:
                done += 1
                on_progress(done, total)
    predictions = ["".join(texts[f"gen-{i}"]).strip() for i in range(len(pairs))]
    metrics = compute_metrics(cfg.metrics, predictions, [y.strip() for _, y in pairs])
    if wants_loss:
        metrics["loss"] = nll / count
    return metrics, predictions


def compute_metrics(
    names: tuple[str, ...], predictions: list[str], references: list[str]
) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, 0-100), mean ROUGE-L F1 (0-1), exact-match rate (0-1)."""
    out: dict[str, float] = {}
    if "bleu" in names:
        import sacrebleu

        out["bleu"] = float(sacrebleu.corpus_bleu(predictions, [references]).score)
    if "rouge_l" in names:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"])
        f1 = [
            scorer.score(ref, pred)["rougeL"].fmeasure
            for pred, ref in zip(predictions, references, strict=True)
        ]
        out["rouge_l"] = sum(f1) / len(f1)
    if "exact_match" in names:
        out["exact_match"] = sum(p == r for p, r in zip(predictions, references, strict=True)) / len(
            references
        )
    return {k: v if math.isfinite(v) else 0.0 for k, v in out.items()}
