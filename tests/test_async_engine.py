"""AsyncEngine: tokens streamed as they are produced, cancellation frees the slot, bounded queue."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest

from prefixserve.engine import (
    AsyncEngine,
    EngineConfig,
    EngineCore,
    FinishReason,
    SamplingParams,
)
from prefixserve.errors import EngineOverloaded, InvalidRequest

from .helpers import PROMPTS, collect, make_prefixes


@pytest.fixture
def engine(tiny_model):
    core = EngineCore(tiny_model, EngineConfig(max_running=4, max_waiting=3))
    for pid, kv in make_prefixes(tiny_model, [3, 6]).items():
        core.prefixes.register(pid, kv)
    eng = AsyncEngine(core)
    eng.start()
    yield eng
    eng.stop()


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def test_streams_one_output_per_token_and_matches_the_sync_engine(engine, tiny_model):
    async def main():
        streams = [
            engine.generate(PROMPTS[i], SamplingParams(max_new_tokens=8 + i), prefix_id=pid)
            for i, pid in enumerate(["p3", None, "p6"])
        ]

        async def drain(stream):
            return [o async for o in stream]

        return await asyncio.gather(*(drain(s) for s in streams))

    results = asyncio.run(main())
    sync = EngineCore(tiny_model)
    for pid, kv in make_prefixes(tiny_model, [3, 6]).items():
        sync.prefixes.register(pid, kv)
    for i, (pid, outs) in enumerate(zip(["p3", None, "p6"], results, strict=True)):
        assert len(outs) == 8 + i and all(len(o.token_ids) == 1 for o in outs)
        assert [o.finished for o in outs] == [False] * (7 + i) + [True]
        rid = sync.add_request(PROMPTS[i], SamplingParams(max_new_tokens=8 + i), prefix_id=pid)
        assert collect(outs)[0] == collect(sync.run_to_completion()[rid])[0]


def test_closing_the_stream_cancels_and_frees_the_slot(engine):
    async def main():
        stream = engine.generate(
            PROMPTS[0], SamplingParams(max_new_tokens=200, ignore_eos=True), prefix_id="p3"
        )
        got = [await anext(stream) for _ in range(3)]
        assert engine.core.num_running == 1
        await stream.aclose()  # what a disconnecting HTTP client does
        await wait_for(lambda: engine.core.num_running == 0 and not engine.core.has_work)
        return got

    got = asyncio.run(main())
    assert len(got) == 3 and engine.core.num_live == 0
    assert engine.core.prefixes.pins("p3") == 0


def test_cancelled_task_aborts_its_request(engine):
    async def main():
        async def consume():
            async for _ in engine.generate(PROMPTS[1], SamplingParams(max_new_tokens=200, ignore_eos=True)):
                pass

        task = asyncio.create_task(consume())
        await wait_for(lambda: engine.core.num_running == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_for(lambda: engine.core.num_live == 0 and engine.core.num_running == 0)

    asyncio.run(main())


def test_validation_errors_raise_before_streaming(engine):
    async def main():
        with pytest.raises(InvalidRequest, match="top_p"):
            async for _ in engine.generate("hi", SamplingParams(top_p=2.0)):
                pass

    asyncio.run(main())


def test_overload_is_refused_not_queued(engine):
    async def main():
        long = SamplingParams(max_new_tokens=150, ignore_eos=True)
        running = []
        for _ in range(4):  # fill the 4 slots
            running.append(engine.generate(PROMPTS[0], long))
            assert not (await anext(running[-1])).finished
        waiting = [engine.generate(PROMPTS[1], long) for _ in range(3)]  # the queue holds 3
        pending = [asyncio.ensure_future(anext(s)) for s in waiting]
        await wait_for(lambda: engine.core.scheduler.num_waiting == 3)
        with pytest.raises(EngineOverloaded, match="3 requests waiting, limit 3"):
            await anext(engine.generate(PROMPTS[0], long))
        assert not any(t.done() for t in pending)
        await running[0].aclose()  # a slot frees up: the first waiting request runs
        assert not (await pending[0]).finished
        for t in pending[1:]:
            t.cancel()
        await asyncio.gather(*pending[1:], return_exceptions=True)
        for s in running[1:] + waiting:
            await s.aclose()
        await wait_for(lambda: engine.core.num_live == 0)

    asyncio.run(main())


def test_stopping_the_engine_ends_open_streams(tiny_model):
    core = EngineCore(tiny_model)
    eng = AsyncEngine(core)
    eng.start()

    async def main():
        stream = eng.generate(PROMPTS[0], SamplingParams(max_new_tokens=200, ignore_eos=True))
        await anext(stream)
        eng.stop()
        with pytest.raises(Exception, match="engine stopped"):
            async for _ in stream:
                pass

    asyncio.run(main())
    assert FinishReason.CANCELLED.value == "cancelled"


def test_the_text_is_the_front_ends_and_a_stop_string_aborts_the_row_in_the_core(engine, tiny_model):
    """The core makes token ids only; the front-end makes the text, finds the stop string, ends the
    stream with STOP and aborts the row, so the core holds nothing once the stream has ended."""
    params = SamplingParams(max_new_tokens=60, ignore_eos=True)
    ids_only = EngineCore(tiny_model)  # the core alone: no text at all
    rid = ids_only.add_request(PROMPTS[0], params)
    assert {o.text for o in ids_only.run_to_completion()[rid]} == {""}
    sizes: list[int] = []
    engine.on_step = sizes.append

    async def main():
        full = "".join([o.text async for o in engine.generate(PROMPTS[0], params)])
        stop = full[len(full) // 2 : len(full) // 2 + 3]
        outs = [o async for o in engine.generate(PROMPTS[0], replace(params, stop=(stop,)))]
        await wait_for(lambda: engine.core.num_live == 0)
        return full, stop, outs

    full, stop, outs = asyncio.run(main())
    assert "".join(o.text for o in outs) == full[: full.index(stop)]
    assert outs[-1].finish_reason == FinishReason.STOP and len(outs) < 60
    assert set(sizes) == {1}  # one row sampled per step: the histogram counts rows, not outputs
    assert len(sizes) - 60 <= len(outs) + 2  # the row ended with its stream, not 60 tokens later
