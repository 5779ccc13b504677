"""Scale-out on Ray Serve (prefixserve.scale.ray_serve): a local Ray cluster started by the test, two
engine replicas of the tiny model (CPU), the same app as ingress, a real redis-server and a shared store
directory. Slow (a cluster start): one cluster for the module."""

from __future__ import annotations

import concurrent.futures
import json
import os
import time

import httpx
import pytest

from prefix_store.redis_server import RedisServer, free_port
from prefixserve.settings import ServerSettings

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
from prefixserve.scale.ray_serve import APP_NAME, ENGINE, build_application  # noqa: E402
from prefixserve.scale.replicas import KEY_PREFIX  # noqa: E402

pytestmark = pytest.mark.slow
PER_REPLICA = 4


class RayApp:
    def __init__(self, tmp_path) -> None:
        self.redis = RedisServer().start()
        self.port = free_port()
        self.settings = ServerSettings(
            model="tiny",
            data_dir=str(tmp_path / "data"),
            store_url=str(tmp_path / "store"),  # shared by the replicas (S3 in production: test_s3.py)
            redis_url=self.redis.url,
            auth="false",
            host="127.0.0.1",
            port=self.port,
            max_running=8,
            max_waiting=16,
            ray_replicas=2,
            replica_prefixes=PER_REPLICA,
            ray_max_ongoing_requests=24,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RayApp:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # (no reporting home from a test)
        ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)  # 2 replicas: a 2-core host
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        serve.run(build_application(self.settings, PER_REPLICA), name=APP_NAME, route_prefix="/")
        self.wait_for_replicas(2)
        return self

    def stop(self) -> None:
        serve.shutdown()
        ray.shutdown()
        self.redis.kill()

    def replicas(self) -> dict[str, dict]:
        """Each engine replica's last announcement in Redis (scale/replicas.py)."""
        import redis

        client = redis.Redis.from_url(self.redis.url)
        keys = list(client.scan_iter(match=KEY_PREFIX + "*"))
        return {k.decode().removeprefix(KEY_PREFIX): json.loads(client.get(k) or "{}") for k in keys}

    def wait_for_replicas(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = serve.status().applications.get(APP_NAME)
            ready = status is not None and status.status == "RUNNING"
            announced = len([r for r in self.replicas().values() if r]) == n
            if ready and announced and httpx.get(self.url + "/ready", timeout=5).status_code == 200:
                return
            time.sleep(0.5)
        raise AssertionError(f"{n} engine replicas were not up within {timeout}s: {self.replicas()}")

    def cold_loads(self) -> int:
        """Prefixes loaded into a device pool (misses of the device tier), summed over the replicas."""
        return sum(r["prefix_loads"].get("device_misses", 0) for r in self.replicas().values() if r)

    def prefix(self, text: str) -> str:
        r = httpx.post(self.url + "/prefixes", json={"text": text}, timeout=60)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def generate(self, prefix_id: str | None, **more) -> httpx.Response:
        body = {"prefix_id": prefix_id, "input": "the menu", "max_new_tokens": 4, **more}
        return httpx.post(self.url + "/generate", json=body, timeout=60)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    running = RayApp(tmp_path_factory.mktemp("ray")).start()
    yield running
    running.stop()


def test_requests_for_a_prefix_go_where_it_is_resident(app):
    """Six prefixes, five requests each, interleaved: each prefix is loaded into a device pool about
    once (cold loads ~ distinct prefixes, not requests), and both replicas serve some of them, so a
    prefix uploaded through the ingress is servable on either."""
    ids = [app.prefix(f"prefix number {i}") for i in range(6)]
    before = app.cold_loads()
    texts: dict[str, set[str]] = {pid: set() for pid in ids}
    for _ in range(5):
        for pid in ids:
            r = app.generate(pid)
            assert r.status_code == 200, r.text
            texts[pid].add(r.json()["text"])
            time.sleep(0.15)  # (Ray's router learns a replica's prefixes within 0.1 s)
    assert all(len(t) == 1 for t in texts.values())  # greedy: each prefix answers the same everywhere
    time.sleep(2)  # the replicas' counters reach Redis
    loads = app.cold_loads() - before
    assert len(ids) <= loads <= len(ids) + 2, loads
    served = [r for r in app.replicas().values() if r and r["prefix_loads"].get("device_misses", 0)]
    assert len(served) == 2  # both engine replicas loaded prefixes


def test_metrics_show_each_replicas_residency(app):
    text = httpx.get(app.url + "/metrics", timeout=10).text
    lines = [line for line in text.splitlines() if line.startswith("prefixserve_prefix_requests_info{")]
    assert len(lines) == 2 and all(f'max_prefixes="{PER_REPLICA}"' in line for line in lines)


def test_sse_streams_through_ray(app):
    pid = app.prefix("a streamed prefix")
    events, text = [], []
    body = {"prefix_id": pid, "input": "hello", "max_new_tokens": 6, "stream": True}
    with httpx.stream("POST", app.url + "/generate", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("event: "):
                events.append(line[7:])
            elif line.startswith("data: ") and events[-1] == "token":
                text.append(json.loads(line[6:])["text"])
    assert events.count("token") >= 1 and events[-1] == "done"
    assert "".join(text) == app.generate(pid, input="hello", max_new_tokens=6).json()["text"]


def test_killing_an_engine_replica_loses_no_request(app):
    """Requests in flight while one engine replica is killed end 200 or with a retryable 503, which the
    SDK retries to success; new requests go to the live replica; Ray starts a new one."""
    from prefixserve_client import Client

    pid = app.prefix("a prefix under load")
    client = Client(app.url, api_key="unused", max_retries=8)
    killed_at: list[float] = []
    stop_at = time.monotonic() + 8.0

    def sdk_load(worker: int) -> list[tuple[float, float]]:
        spans = []
        while time.monotonic() < stop_at:
            t0 = time.monotonic()
            client.generate(pid if worker % 2 else None, f"request {worker}", max_new_tokens=48)
            spans.append((t0, time.monotonic()))
        return spans

    def raw_load() -> list[int]:
        statuses = []
        while time.monotonic() < stop_at:
            statuses.append(app.generate(pid, max_new_tokens=48).status_code)
        return statuses

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        sdk = [pool.submit(sdk_load, i) for i in range(6)]
        raw = [pool.submit(raw_load) for _ in range(4)]
        time.sleep(2.0)
        victim = next(
            a for a in ray.util.list_named_actors(all_namespaces=True) if f"#{ENGINE}#" in a["name"]
        )
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        killed_at.append(time.monotonic())
        spans = [span for f in sdk for span in f.result(timeout=240)]  # raises if any SDK request failed
        statuses = [status for f in raw for status in f.result(timeout=240)]
    assert any(t0 < killed_at[0] < t1 for t0, t1 in spans)  # requests were in flight at the kill
    assert any(t0 > killed_at[0] for t0, _ in spans)  # and new ones were served after it
    assert set(statuses) <= {200, 503}  # without the SDK: done, or told to retry
    assert app.generate(pid).status_code == 200  # routed to a live replica
    app.wait_for_replicas(2)  # Ray replaced the killed one
