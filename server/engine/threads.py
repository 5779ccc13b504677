"""The CPU threads of the engine's forward pass, fitted to the cores other processes leave free.

torch runs each operator of a step on an OpenMP team, whose members meet at a barrier at the end of
every parallel region (hundreds per step). When other processes keep a core busy (the API process
streaming tokens, Redis, a training worker, a neighbour on the host), a team as wide as the machine
waits at every barrier for a member the kernel has descheduled, and the members that wait spin through
the very time slices the missing one needs. Measured at the serving level on 2 cores with one
competing thread (bench/serve.py --rotation): a 2-thread engine fell from ~320 to 41 tok/s; a 1-thread
engine kept 214.

`ThreadGovernor` samples, every `interval_s`, how much CPU time other processes took on the cores this
process may run on (/proc/stat less this process's own time) and sets the team to the cores left free:
at least 1, at most `max_threads`, changed once two samples in a row agree. Linux only (elsewhere the
team keeps `max_threads`). `torch.set_num_threads` sets the calling thread's OpenMP team, so the
governor is ticked from the engine's own thread.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PROC_STAT = Path("/proc/stat")
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system irq softirq steal (idle and iowait are not busy)


@dataclass(frozen=True)
class CpuSample:
    wall: float  # s, monotonic
    busy: float  # CPU-seconds all processes spent on the watched cores (since boot)
    own: float  # CPU-seconds this process spent (all its threads)


def read_sample(cpus: frozenset[int]) -> CpuSample | None:
    """The counters now, or None where /proc/stat cannot be read."""
    try:
        text = PROC_STAT.read_text()
    except OSError:
        return None
    ticks = 0
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if name[:3] != "cpu" or not name[3:].isdigit():
            continue
        if int(name[3:]) in cpus:
            values = rest.split()
            ticks += sum(int(values[i]) for i in BUSY_FIELDS if i < len(values))
    return CpuSample(time.monotonic(), ticks / os.sysconf("SC_CLK_TCK"), time.process_time())


def others_load(a: CpuSample, b: CpuSample) -> float:
    """Cores other processes kept busy on average between two samples."""
    wall = b.wall - a.wall
    return max(0.0, (b.busy - a.busy) - (b.own - a.own)) / wall if wall > 0 else 0.0


@dataclass(frozen=True)
class ThreadPolicy:
    cores: int  # cores this process may run on
    max_threads: int  # the widest team
    min_threads: int = 1  # = max_threads: a fixed team
    # others' load tolerated per core the team keeps: on 2 cores, others using up to half a core leave
    # the team at 2 (measured: 2 threads beside the API process's ~0.1-0.3 of a core beat 1)
    slack: float = 0.5

    def fit(self, others: float) -> int:
        """The team for `others` cores busy elsewhere."""
        free = math.floor(self.cores - others + self.slack)
        return max(self.min_threads, min(self.max_threads, free))


class ThreadGovernor:
    """Sets the calling thread's team: tick it from the engine's thread, between steps."""

    def __init__(self, policy: ThreadPolicy, cpus: frozenset[int], interval_s: float = 0.5) -> None:
        self.policy, self.cpus, self.interval_s = policy, cpus, interval_s
        self.threads = policy.max_threads
        self.others = 0.0  # cores other processes used over the last interval
        self._applied = False  # the team is set on the first tick (the engine's thread)
        self._last = read_sample(cpus) if policy.min_threads < policy.max_threads else None
        self._proposed = self.threads  # the last sample's fit (a change needs two in a row)

    @classmethod
    def for_this_process(cls, threads: int = 0, interval_s: float = 0.5) -> ThreadGovernor:
        """`threads` 0: a team fitted to the free cores among those this process may use (at most
        torch's count; fixed at it where /proc/stat cannot be read); n: always n threads."""
        if threads < 0:
            raise ValueError(f"cpu_threads: expected 0 (fitted) or a thread count, got {threads}")
        cpus = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()
        widest = threads or torch.get_num_threads()
        fixed = threads > 0 or not cpus or read_sample(cpus) is None
        policy = ThreadPolicy(len(cpus) or widest, widest, widest if fixed else 1)
        return cls(policy, cpus, interval_s)

    def tick(self) -> None:
        """Every `interval_s`, sample and refit the team (cheap otherwise: one clock read)."""
        if not self._applied:
            torch.set_num_threads(self.threads)
            self._applied = True
        last = self._last
        if last is None or time.monotonic() - last.wall < self.interval_s:
            return
        now = read_sample(self.cpus)
        if now is None:
            return
        self._last, self.others = now, others_load(last, now)
        fit = self.policy.fit(self.others)
        if fit != self.threads and fit == self._proposed:
            log.info(
                "engine threads %d -> %d: other processes keep %.1f of %d cores busy",
                self.threads, fit, self.others, self.policy.cores,
            )  # fmt: skip
            self.threads = fit
            torch.set_num_threads(fit)
        self._proposed = fit
