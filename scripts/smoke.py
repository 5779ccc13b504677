"""Smoke test against a running deployment: upload a prefix, compile one, train one, generate, stream.

    python scripts/smoke.py [--base-url http://127.0.0.1:8000] [--api-key KEY]

Uses the SDK (`prefixserve_client`) and, to build a native prefix file for the upload, the project's
prefix format. Exits non-zero on the first failure.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from prefixserve_client import Client

from prefix_store.format import PrefixMeta, encode_prefix

EXAMPLES = [
    {"input": f"name : {n} | food : {f}", "output": f"{n} serves {f} food."}
    for n in ("Aromi", "Cotto", "Zizzi", "The Mill")
    for f in ("Italian", "French", "Indian")
]


def wait_ready(url: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = httpx.get(url + "/ready", timeout=5)
            if r.status_code == 200:
                return r.json()["model"]
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"{url} did not become ready within {timeout}s")
        time.sleep(2)


def step(what: str) -> None:
    print(f"== {what}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--ready-timeout", type=float, default=600)
    ap.add_argument("--train-timeout", type=float, default=900)
    args = ap.parse_args()
    model = wait_ready(args.base_url, args.ready_timeout)
    print(f"ready: {model['name']} ({model['n_layer']} layers, {model['n_embd']} wide)")
    with Client(args.base_url, args.api_key) as client:
        step("upload a native prefix file")
        head_dim = model["n_embd"] // model["n_head"]
        kv = torch.randn(model["n_layer"], 2, model["n_head"], 5, head_dim) * 0.5
        meta = PrefixMeta(
            id="pfx-smoke",
            model_fingerprint=model["fingerprint"],
            prefix_len=5,
            dtype="float32",
            owner="smoke",
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "smoke.safetensors"
            path.write_bytes(encode_prefix(kv, meta))
            uploaded = client.prefixes.upload(path, name="smoke-upload")
        print(f"   {uploaded.id} ({uploaded.prefix_len} positions, {uploaded.source})")

        step("compile a text prefix")
        text = client.prefixes.from_text("Describe the restaurant in one sentence.\n", name="smoke-text")
        print(f"   {text.id} ({text.prefix_len} positions)")

        step("train a prefix")
        job = client.prefixes.train(
            EXAMPLES, name="smoke-train", epochs=3, prefix_len=5, hidden=64, batch_size=4, learning_rate=5e-3
        )
        trained = job.wait(progress=True, poll_s=1.0, timeout=args.train_timeout)
        print(f"   {trained.id} (final loss {job.state.loss:.3f}, {job.state.total_steps} steps)")

        for prefix in (uploaded, text, trained):
            step(f"generate with {prefix.name}")
            result = client.generate(prefix.id, "name : Aromi | food : Italian", max_new_tokens=16)
            print(f"   {result.text!r} [{result.finish_reason}, {result.usage.completion_tokens} tokens]")

        step("stream")
        pieces = list(client.stream(trained.id, "name : Cotto | food : French", max_new_tokens=12))
        print(f"   {len(pieces)} pieces: {''.join(pieces)!r}")
        if not pieces:
            return 1
        listed = {p.id for p in client.prefixes.list()}
        assert {uploaded.id, text.id, trained.id} <= listed, "a prefix is missing from the list"
    print("smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
