"""The engine's CPU threads fitted to the cores other processes leave free (server/engine/threads.py):
the fit, the measure of other processes' load on the real /proc/stat, a governor that narrows its team
while a real competing process runs and widens it again after, and the numbers unchanged by the team's
width (a request's tokens never depend on how busy the machine was)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from prefixserve.dense import Dense
from prefixserve.engine import EngineConfig, EngineCore, SamplingParams
from prefixserve.engine.threads import ThreadGovernor, ThreadPolicy, others_load, read_sample
from prefixserve.settings import ServerSettings

linux = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs /proc/stat (Linux)")
CPUS = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()


def test_the_team_is_as_wide_as_the_free_cores():
    two = ThreadPolicy(cores=2, max_threads=2)
    assert [two.fit(x) for x in (0.0, 0.3, 0.5, 0.6, 1.0, 1.9, 7.0)] == [2, 2, 2, 1, 1, 1, 1]
    sixteen = ThreadPolicy(cores=16, max_threads=16)
    assert [sixteen.fit(x) for x in (0.0, 2.0, 2.7, 15.5)] == [16, 14, 13, 1]
    assert ThreadPolicy(cores=16, max_threads=8).fit(0.0) == 8  # never wider than asked
    assert ThreadPolicy(cores=2, max_threads=4, min_threads=4).fit(2.0) == 4  # a fixed team


def spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


@linux
def test_this_processes_own_work_is_not_counted_as_others():
    a = read_sample(CPUS)
    spin(0.6)
    b = read_sample(CPUS)
    assert b.own - a.own >= 0.6
    assert b.busy - a.busy >= 0.5  # /proc/stat saw the work (its ticks are 10 ms)...
    assert others_load(a, b) < 0.3 * len(CPUS) + 0.3  # ...and it is not counted as another's


def wait_for(governor: ThreadGovernor, done, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        governor.tick()
        if done(governor.threads):
            return True
        time.sleep(0.05)
    return False


@linux
@pytest.mark.skipif(len(CPUS) < 2, reason="one core: there is no narrower team")
def test_the_team_narrows_while_another_process_keeps_the_cores_busy_and_widens_after():
    cores = len(CPUS)
    governor = ThreadGovernor(ThreadPolicy(cores, cores), CPUS, interval_s=0.2)
    governor.tick()
    assert governor.threads == cores == torch.get_num_threads()
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        assert wait_for(governor, lambda n: n < cores), f"others {governor.others:.2f}: team still {cores}"
        assert torch.get_num_threads() == governor.threads
    finally:
        for p in burners:
            p.kill()
            p.wait()
    assert wait_for(governor, lambda n: n == cores), f"others {governor.others:.2f}: team still narrow"
    assert torch.get_num_threads() == cores


@pytest.mark.parametrize("rows", [1, 13, 64, 300])
def test_a_layers_numbers_do_not_depend_on_the_teams_width(rows):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(3072, 768, generator=g) * 0.02, torch.randn(768, generator=g)  # GPT-2's MLP proj
    x = torch.randn(rows, 3072, generator=g)
    width = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(torch.cat([d(x) for d in (Dense.of(w, b, pack=True), Dense.of(w, b, pack=False))]))
    finally:
        torch.set_num_threads(width)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def engine_logits(model, threads: int) -> list[torch.Tensor]:
    """Every step's logits of a mixed batch, the engine stepped on a thread of its own (as served)."""
    engine = EngineCore(model, EngineConfig(max_running=8, record_logits=True, cpu_threads=threads))
    g = torch.Generator().manual_seed(0)
    for n in (3, 40, 17, 90):
        prompt = torch.randint(0, model.spec.vocab_size, (n,), generator=g).tolist()
        engine.add_request(prompt, SamplingParams(max_new_tokens=5, ignore_eos=True))
    logits: list[torch.Tensor] = []

    def drive() -> None:
        while engine.has_work:
            logits.extend(x for out in engine.step() for x in out.logits)
        logits.append(torch.tensor([float(torch.get_num_threads()), engine.stats().cpu_threads]))

    t = threading.Thread(target=drive)
    t.start()
    t.join()
    return logits


def test_the_engine_steps_on_its_team_and_its_tokens_do_not_depend_on_the_width(tiny_model):
    one, two = engine_logits(tiny_model, 1), engine_logits(tiny_model, 2)
    assert one[-1].tolist() == [1.0, 1.0] and two[-1].tolist() == [2.0, 2.0]  # set on the engine's thread
    assert len(one) == len(two) == 4 * 5 + 1
    assert all(torch.equal(a, b) for a, b in zip(one[:-1], two[:-1], strict=True))


def test_a_negative_thread_count_is_refused():
    with pytest.raises(ValueError, match="PREFIXSERVE_CPU_THREADS: expected 0"):
        EngineConfig.from_settings(ServerSettings(cpu_threads=-1))
    with pytest.raises(ValueError, match="cpu_threads"):
        ThreadGovernor.for_this_process(-2)
    assert (
        EngineConfig.from_settings(ServerSettings.from_env({"PREFIXSERVE_CPU_THREADS": "3"})).cpu_threads == 3
    )
