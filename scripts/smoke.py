"""Smoke test against a running deployment: upload a prefix, compile one, train one, generate, stream.

    python scripts/smoke.py [--base-url http://127.0.0.1:8000] [--api-key KEY]

Needs only the SDK (`pip install ./client`: httpx + pydantic, no torch, no server code): the uploaded
prefix is a PEFT prefix-tuning adapter written here with the standard library. Exits non-zero on the
first failure.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prefixserve_client import Client

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


def write_peft_adapter(out: Path, model: dict, prefix_len: int, seed: int = 0) -> Path:
    """A PEFT prefix-tuning adapter for the served model (random values, std 0.5), saved as PEFT saves
    one: adapter_config.json and adapter_model.safetensors holding `prompt_embeddings [P, 2*L*C]` (F32)."""
    width = 2 * model["n_layer"] * model["n_embd"]
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": model["name"],
        "num_virtual_tokens": prefix_len,
        "num_layers": model["n_layer"],
        "num_attention_heads": model["n_head"],
        "token_dim": model["n_embd"],
        "num_transformer_submodules": 1,
    }
    rng = random.Random(seed)
    data = struct.pack(f"<{prefix_len * width}f", *(rng.gauss(0, 0.5) for _ in range(prefix_len * width)))
    tensor = {"dtype": "F32", "shape": [prefix_len, width], "data_offsets": [0, len(data)]}
    header = json.dumps({"prompt_embeddings": tensor}).encode()
    header += b" " * (-len(header) % 8)  # safetensors aligns the data to 8 bytes
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config))
    (out / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + data)
    return out


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
        step("upload a PEFT prefix-tuning adapter")
        with tempfile.TemporaryDirectory() as tmp:
            adapter = write_peft_adapter(Path(tmp) / "adapter", model, prefix_len=5)
            uploaded = client.prefixes.upload(adapter, name="smoke-upload")
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
