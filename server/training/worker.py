"""The training worker: takes jobs from the queue, trains, publishes the prefix, acks.

`prefixserve worker` runs it as its own process (N of them share one Redis consumer group); without
Redis the server runs the same code on a thread. Publishing is idempotent: the prefix id is derived
from the job id and the store never overwrites, so a job re-run after a crash yields one prefix.

After every epoch the worker stores a checkpoint (server/training/checkpoint.py) in the durable store; a
job taken over from a dead worker resumes from it, so its progress only goes back to the last epoch
boundary, and only together with a new `attempts` number. A Redis outage does not stop a running job:
progress saves and heartbeats are skipped until Redis is back, and the job's end is saved once it is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import torch
from transformers import GPT2LMHeadModel

from prefix_store.redis_health import RedisUnavailable
from prefix_store.service import PrefixService
from prefix_store.store import PrefixExists

from ..compile import BoundModel
from ..errors import PrefixServeError
from ..model import LoadedModel, load_hf_model
from ..settings import ServerSettings
from ..usage import UsageMeter
from .checkpoint import CheckpointMismatch, decode_checkpoint, encode_checkpoint
from .evaluate import METRICS, EvalConfig, Evaluation, evaluate
from .jobs import TERMINAL, Job, JobQueue, JobStatus, now
from .trainer import (
    Cancelled,
    Interrupted,
    PrefixTrainer,
    Progress,
    TrainConfig,
    TrainState,
    validation_split,
)

log = logging.getLogger(__name__)
SAMPLES = 5  # examples (input, reference, prediction) kept with an evaluation


@dataclass(frozen=True)
class WorkerConfig:
    max_attempts: int = 3  # a job that fails this many times ends `failed` with its error
    heartbeat_s: float = 5.0  # keeps a running job from being reclaimed (must be < the queue's reclaim_s)
    save_every_s: float = 1.0  # progress written to the job record at most this often
    poll_s: float = 1.0

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> WorkerConfig:
        """The training worker's, wherever it runs (a thread of the server, or `prefixserve worker`)."""
        return cls(save_every_s=settings.job_progress_s)


def read_pairs(data: bytes) -> list[tuple[str, str]]:
    """The stored dataset: JSONL of {"input", "output"} (validated at submission)."""
    return [(r["input"], r["output"]) for r in map(json.loads, data.decode().splitlines()) if r]


class Worker:
    def __init__(
        self,
        queue: JobQueue,
        service: PrefixService,
        config: WorkerConfig | None = None,
        name: str | None = None,
        hf_model: GPT2LMHeadModel | None = None,
        usage: UsageMeter | None = None,
    ) -> None:
        """`usage`: where the work of the jobs that succeed is counted (usage.py), once per job."""
        self.queue, self.service, self.usage = queue, service, usage
        self.config = config or WorkerConfig()
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}"
        self._hf = hf_model
        self._stop = threading.Event()

    def _loaded(self) -> LoadedModel:
        """The served model behind the store's binding (`prefixserve.compile.bind_model`)."""
        model = self.service.model
        if not isinstance(model, BoundModel):
            raise TypeError(
                f"the worker trains on a loaded model: expected a PrefixService over bind_model(model),"
                f" got one over {type(model).__name__}"
            )
        return model.loaded

    def _model(self) -> GPT2LMHeadModel:
        if self._hf is None:  # fp32 for training, on the GPU when there is one
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            self._hf = load_hf_model(self._loaded().name, torch.float32, device)
        return self._hf

    def run(self, stop: threading.Event) -> None:
        """Work until `stop` is set; a job in training then goes back to the queue for another worker."""
        self._stop = stop
        log.info("training worker %s started", self.name)
        while not stop.is_set():
            try:
                self.run_once()
            except RedisUnavailable as exc:  # logged once per outage by the queue's RedisHealth
                log.debug("worker %s: %s", self.name, exc)
                stop.wait(self.config.poll_s)
            except Exception:  # the queue itself failed unexpectedly: retry shortly
                log.exception("worker %s: queue error", self.name)
                stop.wait(self.config.poll_s)

    def run_once(self) -> bool:
        """Take one job and run it to an end; False when there was none."""
        claimed = self.queue.claim(self.name, self.config.poll_s)
        if claimed is None:
            return False
        delivery, job = claimed
        if job.status in TERMINAL:  # delivered again after it ended (e.g. acked late): nothing to do
            self.queue.ack(delivery)
            return True
        if self.queue.cancel_requested(job.id):
            self._end(delivery, job, JobStatus.CANCELLED)
            return True
        job.attempts += 1  # every run is a new attempt; runs a shutdown interrupted do not count as failures
        if job.attempts - job.interrupted > self.config.max_attempts:
            self._end(delivery, job, JobStatus.FAILED)
            return True
        resume = self._resume_state(job)
        # the new attempt number and where this attempt starts (the last checkpoint, or step 0) are
        # saved together: a job's progress never goes back without its attempt number going up
        job.progress = resume.progress.copy() if resume else Progress(total_steps=job.progress.total_steps)
        job.status = JobStatus.RUNNING
        job.started_at = job.started_at or datetime.now(UTC).isoformat(timespec="milliseconds")
        self.queue.save(job)
        self._run(delivery, job, resume)
        return True

    def _resume_state(self, job: Job) -> TrainState | None:
        """The job's last epoch checkpoint, if a previous attempt left one for this config."""
        try:
            raw = self.service.store.get_checkpoint(job.id)
            if raw is None:
                return None
            state = decode_checkpoint(raw, job.config)
        except (CheckpointMismatch, OSError) as exc:
            log.warning("job %s: ignoring its checkpoint (%s); training from the start", job.id, exc)
            return None
        log.info("job %s: attempt %d resumes after epoch %d", job.id, job.attempts, state.epochs_done)
        return state

    def _checkpoint(self, job: Job):
        def on_epoch(state: TrainState) -> None:
            try:
                self.service.store.put_checkpoint(job.id, encode_checkpoint(state, job.config))
            except (OSError, PrefixServeError) as exc:  # best effort (a full disk too): the job goes on
                log.warning(
                    "job %s: could not store the epoch %d checkpoint: %s", job.id, state.epochs_done, exc
                )

        return on_epoch

    def _run(self, delivery: str, job: Job, resume: TrainState | None) -> None:
        try:
            if job.kind == "evaluate":
                self._run_evaluation(delivery, job)
            else:
                self._run_training(delivery, job, resume)
        except Cancelled:
            self._end(delivery, job, JobStatus.CANCELLED)
        except Interrupted:  # shutting down: not the job's fault, so not a failed attempt
            job.interrupted += 1
            job.status = JobStatus.QUEUED
            self._until_done(lambda: self.queue.save(job))
            self.queue.release(delivery, job)
        except Exception as exc:
            log.exception("job %s failed (attempt %d)", job.id, job.attempts)
            job.error = f"{type(exc).__name__}: {exc}"
            if job.attempts >= self.config.max_attempts:
                self._end(delivery, job, JobStatus.FAILED)
            else:
                job.status = JobStatus.QUEUED
                self._until_done(lambda: self.queue.save(job))
                self.queue.release(delivery, job)

    def _run_training(self, delivery: str, job: Job, resume: TrainState | None) -> None:
        cfg = TrainConfig(**job.config)
        pairs = read_pairs(self.service.store.get_training_data(job.id))
        trainer = PrefixTrainer(self._model(), self._loaded().tokenizer, cfg)
        prefix, prog = trainer.train(
            pairs, self._progress(delivery, job), resume=resume, on_epoch=self._checkpoint(job)
        )
        self._record(job, prog)
        try:
            meta = self.service.add_tensors(
                prefix,
                job.tenant,
                job.name,
                job.visibility,
                "train",
                prefix_id=job.prefix_id_to_publish,
                input_suffix=cfg.separator,
            )
        except PrefixExists:  # a previous attempt published it and died before acking
            meta = self.service.meta(job.prefix_id_to_publish)
        job.prefix_id = meta.id
        trained, held_out = validation_split(len(pairs), cfg)
        if held_out:  # the held-out split, evaluated as an evaluation job would
            on_progress = self._progress(delivery, job)  # heartbeats, cancel and stop checks go on
            try:
                job.evaluation = self._evaluate(
                    job, meta.id, [pairs[i] for i in held_out], {}, lambda done, total: on_progress(prog)
                )
            except (Cancelled, Interrupted):
                raise
            except Exception as exc:  # the prefix is published: the job still succeeded
                log.exception("job %s: evaluating the held-out split failed", job.id)
                job.evaluation = {"error": f"{type(exc).__name__}: {exc}"}
        self._end(delivery, job, JobStatus.SUCCEEDED)
        evaluated = len(held_out) if job.evaluation and "error" not in job.evaluation else 0
        self._count(
            job,
            training_example_epochs=len(trained) * cfg.epochs,
            evaluation_examples=evaluated,
            stored_bytes=self.service.size(meta.id) or 0,
        )

    def _run_evaluation(self, delivery: str, job: Job) -> None:
        pairs = read_pairs(self.service.store.get_training_data(job.id))
        on_progress = self._progress(delivery, job)

        def progress(done: int, total: int) -> None:
            job.progress.step, job.progress.total_steps = done, total
            on_progress(job.progress)

        job.evaluation = self._evaluate(job, job.target, pairs, job.config, progress)
        job.prefix_id = job.target
        self._end(delivery, job, JobStatus.SUCCEEDED)
        self._count(job, evaluation_examples=len(pairs))

    def _count(self, job: Job, **counts: int) -> None:
        """A succeeded job's work in the tenant's usage: once per job, however often it was delivered
        (best effort: a store that cannot take it is logged, the job has succeeded)."""
        if self.usage is None:
            return
        try:
            self.usage.record_once(f"job:{job.id}", job.tenant, **counts)
            self.usage.flush()
        except Exception as exc:
            log.warning("job %s: could not count its usage: %s", job.id, exc)

    def _evaluate(
        self,
        job: Job,
        prefix_id: str,
        pairs: list[tuple[str, str]],
        config: dict,
        progress: Callable[[int, int], None],
    ) -> dict:
        """Evaluate a prefix, store the result with it (once per job) and return it."""
        meta = self.service.meta(prefix_id)
        cfg = EvalConfig(
            **{**config, "metrics": tuple(config.get("metrics", METRICS)), "separator": meta.input_suffix}
        )
        state = self.service.load_state(prefix_id)
        metrics, predictions = evaluate(self._loaded(), prefix_id, state, pairs, cfg, progress)
        result = Evaluation(
            job_id=job.id,
            prefix_id=prefix_id,
            tenant=job.tenant,
            n_examples=len(pairs),
            metrics=metrics,
            config={**asdict(cfg), "metrics": list(cfg.metrics)},
            samples=[
                {"input": x, "reference": y, "prediction": p}
                for (x, y), p in zip(pairs[:SAMPLES], predictions, strict=False)
            ],
            created_at=now(),
        ).to_dict()
        with contextlib.suppress(PrefixExists):  # a previous attempt stored it, then died: keep that one
            self.service.store.put_evaluation(prefix_id, job.tenant, job.id, json.dumps(result).encode())
        return result

    def _until_done(self, call) -> None:
        """Run a queue call that must not be lost (a job's end), retrying while Redis is unavailable;
        gives up only when the worker stops (the job then stays pending and is reclaimed)."""
        while True:
            try:
                return call()
            except RedisUnavailable:
                if self._stop.wait(self.config.poll_s):
                    raise

    def _progress(self, delivery: str, job: Job):
        last_save = last_beat = time.monotonic()

        def on_progress(prog: Progress) -> None:
            nonlocal last_save, last_beat
            if self._stop.is_set():
                raise Interrupted
            now = time.monotonic()
            try:  # Redis down: training goes on; these are retried at the next interval
                if now - last_beat >= self.config.heartbeat_s:
                    last_beat = now
                    self.queue.heartbeat(self.name, delivery)
                if now - last_save >= self.config.save_every_s or prog.step == prog.total_steps:
                    last_save = now
                    if self.queue.cancel_requested(job.id):
                        raise Cancelled
                    self._record(job, prog)
                    self.queue.save(job)
            except RedisUnavailable:
                pass

        return on_progress

    @staticmethod
    def _record(job: Job, prog: Progress) -> None:
        job.progress = prog.copy()

    def _end(self, delivery: str, job: Job, status: JobStatus) -> None:
        job.status = status
        if status == JobStatus.SUCCEEDED:
            job.progress.eta_s = 0.0
        self._until_done(lambda: self.queue.save(job))
        self._until_done(lambda: self.queue.ack(delivery))
        self.service.store.delete_checkpoint(job.id)
        log.info(
            "job %s %s (attempt %d)%s",
            job.id,
            status.value,
            job.attempts,
            f": {job.error}" if status == JobStatus.FAILED else "",
        )
