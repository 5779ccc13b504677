"""Tenant fairness for the scheduler: Virtual Token Counters (Sheng et al., "Fairness in Serving Large
Language Models", OSDI 2024). Pure CPU bookkeeping, no tensors.

Each tenant has a counter of the service it has received: prompt tokens computed x `service_in` plus
tokens generated x `service_out`, divided by the tenant's weight. The scheduler admits from the tenant
with the lowest counter, preempts from the highest, and a tenant that becomes active again is lifted to
the lowest counter among the active ones, so nothing is banked while it was idle. A tenant is active
while it has a request in the engine (waiting or running). When no tenant is active every counter is
dropped: an idle engine owes no one anything, and the numbers stay small.
"""

from __future__ import annotations

from collections import Counter


class TenantCounters:
    def __init__(self, service_in: float = 1.0, service_out: float = 2.0) -> None:
        self.service_in, self.service_out = service_in, service_out
        self._counter: dict[str, float] = {}  # normalized service received (divided by the weight)
        self._weight: dict[str, float] = {}  # the weight the tenant's newest request carried
        self.live: Counter[str] = Counter()  # requests in the engine per tenant (waiting + running)

    def join(self, tenant: str, weight: float) -> None:
        """A request of `tenant` enters the engine."""
        self._weight[tenant] = weight
        if not self.live[tenant]:  # becomes active: lifted to the lowest active counter (no banking)
            active = [self._counter.get(t, 0.0) for t, n in self.live.items() if n and t != tenant]
            floor = min(active, default=0.0)
            self._counter[tenant] = max(self._counter.get(tenant, 0.0), floor)
        self.live[tenant] += 1

    def leave(self, tenant: str) -> None:
        """A request of `tenant` left the engine (finished, cancelled, failed, refused)."""
        self.live[tenant] -= 1
        if self.live[tenant] <= 0:
            del self.live[tenant]
        if not self.live:
            self._counter.clear()
            self._weight.clear()

    def charge_prompt(self, tenant: str, tokens: int) -> None:
        if tokens > 0:
            self._charge(tenant, tokens * self.service_in)

    def charge_output(self, tenant: str, tokens: int = 1) -> None:
        self._charge(tenant, tokens * self.service_out)

    def _charge(self, tenant: str, service: float) -> None:
        self._counter[tenant] = self._counter.get(tenant, 0.0) + service / self.weight(tenant)

    def snapshot(self) -> dict[str, float]:
        """Every tenant's counter now."""
        return dict(self._counter)

    def counter(self, tenant: str) -> float:
        return self._counter.get(tenant, 0.0)

    def weight(self, tenant: str) -> float:
        return self._weight.get(tenant, 1.0)
