"""The durable store on S3 (s3fs), against moto's server mode: a local server speaking the S3 HTTP
protocol, standing in for AWS S3 / MinIO (which this machine cannot reach)."""

from __future__ import annotations

import httpx
import pytest

from prefix_store.redis_server import free_port
from prefix_store.service import PrefixService, StoreConfig
from prefixserve.compile import bind_model

from .helpers import ALICE, kv_for, settings_for
from .live import LiveServer

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")
A = {"Authorization": f"Bearer {ALICE}"}


class S3StandIn:
    """moto's S3 server on a loopback port; the AWS variables point botocore (s3fs) at it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.url = f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "stand-in",
            "AWS_SECRET_ACCESS_KEY": "stand-in",
            "AWS_DEFAULT_REGION": "us-east-1",
        }


@pytest.fixture
def s3(monkeypatch):
    stand_in = S3StandIn()
    stand_in.server.start()
    for key, value in stand_in.env().items():
        monkeypatch.setenv(key, value)
    httpx.post(stand_in.url + "/moto-api/reset")  # (moto keeps its buckets per process)
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec caches filesystems: none from another test
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("prefixes-bucket")
    yield stand_in
    stand_in.server.stop()
    s3fs.S3FileSystem.clear_instance_cache()


def test_two_services_on_one_bucket_see_each_others_prefixes(s3, tiny_model):
    """A prefix written through one service (one replica) is listed, loaded and deleted through another."""
    config = StoreConfig(url="s3://prefixes-bucket/store", max_prefix_len=64)
    one, two = (PrefixService(bind_model(tiny_model), config) for _ in range(2))
    try:
        meta = one.add_tensor(kv_for(tiny_model, 5), owner="alice", name="on-s3")
        assert two.visible(meta.id, "alice").name == "on-s3"
        assert [m.id for m in two.list("alice")] == [meta.id]
        assert bool((two.load_state(meta.id).kv.cpu() == kv_for(tiny_model, 5)).all())
        assert two.delete(meta.id)
        assert one.list("alice") == []
    finally:
        one.close()
        two.close()


def test_a_prefix_uploaded_to_one_server_generates_on_another(s3, tmp_path, tiny_model):
    settings = [
        settings_for(tmp_path / name, store_url="s3://prefixes-bucket/shared", engine_process=False)
        for name in ("one", "two")
    ]
    one, two = (LiveServer(s, tiny_model).start() for s in settings)
    try:
        made = httpx.post(one.url + "/prefixes", json={"text": "a shared prompt"}, headers=A, timeout=30)
        assert made.status_code == 201, made.text
        pid = made.json()["id"]
        body = {"prefix_id": pid, "input": "hello", "max_new_tokens": 4}
        a = httpx.post(one.url + "/generate", json=body, headers=A, timeout=30)
        b = httpx.post(two.url + "/generate", json=body, headers=A, timeout=30)
        assert a.status_code == b.status_code == 200, (a.text, b.text)
        assert a.json()["text"] == b.json()["text"]  # greedy: the same prefix gives the same text
    finally:
        one.stop()
        two.stop()


def test_s3_down_answers_503_and_resident_prefixes_keep_generating(s3, tmp_path, tiny_model):
    server = LiveServer(settings_for(tmp_path, store_url="s3://prefixes-bucket/outage"), tiny_model).start()
    try:
        made = httpx.post(server.url + "/prefixes", json={"text": "before the outage"}, headers=A, timeout=30)
        pid = made.json()["id"]
        body = {"prefix_id": pid, "input": "hello", "max_new_tokens": 3}
        assert httpx.post(server.url + "/generate", json=body, headers=A, timeout=30).status_code == 200
        s3.server.stop()  # S3 is gone
        down = httpx.post(server.url + "/prefixes", json={"text": "during it"}, headers=A, timeout=60)
        assert down.status_code == 503, down.text
        assert down.json()["error"]["type"] == "unavailable" and "Retry-After" in down.headers
        again = httpx.post(server.url + "/generate", json=body, headers=A, timeout=30)
        assert again.status_code == 200, again.text  # resident on the device / cached: still served
    finally:
        server.stop()
        s3.server.start()  # (the fixture stops it)
