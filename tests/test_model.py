"""Model loading and the offline tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefixserve.engine import EngineCore, SamplingParams
from prefixserve.errors import InvalidRequest, UnsupportedModel
from prefixserve.model import load_model, parse_device, parse_dtype


def test_tiny_model_command_writes_a_normal_hf_checkpoint(tmp_path):
    out = tmp_path / "tiny"
    done = subprocess.run(
        [sys.executable, "-m", "prefixserve.cli", "tiny-model", str(out), "--n-layer", "2"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(out) in done.stdout
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)  # no pickle anywhere
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "gpt2" and model.config.n_layer == 2
    text = "name : The Mill | food : Indian é ✓"
    ids = tok(text).input_ids
    assert tok.decode(ids) == text  # byte-level BPE round-trips any text
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == model.config.eos_token_id
    assert len(ids) < len(text.encode())  # merges were learned


def test_tiny_model_is_deterministic(tmp_path):
    from prefixserve.tiny import write_tiny_model

    a, b = write_tiny_model(tmp_path / "a"), write_tiny_model(tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert json.loads((a / "tokenizer.json").read_text()) == json.loads((b / "tokenizer.json").read_text())


def test_loaded_weights_are_frozen_and_laid_out_for_addmm(tiny_model):
    w = tiny_model.weights
    spec = tiny_model.spec
    assert w.lm_head.shape == (spec.n_embd, spec.vocab_size) and w.lm_head.is_contiguous()
    assert w.layers[0].attn_w.shape == (spec.n_embd, 3 * spec.n_embd)
    assert not any(t.requires_grad for t in (w.wte, w.lm_head, w.layers[0].fc_w))
    assert tiny_model.dtype == torch.float32 and tiny_model.device.type == "cpu"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_loads_and_generates(tiny_model_dir, tiny_model, dtype):
    model = load_model(tiny_model_dir, dtype=dtype)
    assert model.weights.wte.dtype == parse_dtype(dtype)
    engine = EngineCore(model)
    engine.prefixes.register("p", torch.randn(model.spec.prefix_shape(4)))  # fp32 in, cast to the model
    rid = engine.add_request("name : Aromi", SamplingParams(max_new_tokens=5), prefix_id="p")
    outs = engine.run_to_completion()[rid]
    assert len(outs) == 5 and outs[-1].finished


def test_bad_dtype_device_and_model_are_named(tmp_path, tiny_model_dir):
    with pytest.raises(InvalidRequest, match="expected one of float32, bfloat16, float16, got 'int8'"):
        parse_dtype("int8")
    with pytest.raises(InvalidRequest, match="expected 'cpu' or 'cuda"):
        parse_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidRequest, match="no CUDA device"):
            parse_device("cuda")
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg["model_type"] = "bert"
    bad = tmp_path / "not-supported"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        UnsupportedModel,
        match=r"model_type 'bert' is not supported; expected one of \['gpt2', 'llama', 'mistral', 'qwen2'\]",
    ):
        load_model(bad)


def test_fast_gelu_is_gpt2_gelu():
    from prefixserve.families.gpt2 import gelu_tanh_

    x = torch.linspace(-12, 12, 10001)
    ref = torch.nn.functional.gelu(x.double(), approximate="tanh")
    torch.testing.assert_close(gelu_tanh_(x.clone()).double(), ref, rtol=0, atol=2e-6)


def test_auto_model_falls_back_to_the_tiny_model_when_the_hub_is_unreachable(tmp_path):
    """No hub (nothing listens at HF_ENDPOINT) and no cached gpt2: one refused connection, then the
    tiny model, with the reason logged; no hub client retries."""
    from prefix_store.redis_server import free_port

    script = """
import logging, time
logging.basicConfig(level=logging.WARNING)
from prefixserve.loading import load_configured_model
from prefixserve.model import hub_model_available
from prefixserve.settings import ServerSettings
assert not hub_model_available("gpt2")
t = time.monotonic()
model = load_configured_model(ServerSettings(model="auto", data_dir=%r))
print(model.name, round(time.monotonic() - t, 1))
"""
    env = {
        "PATH": "/usr/bin:/bin",
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
    }
    run = subprocess.run(
        [sys.executable, "-c", script % str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[0] == str(tmp_path / "tiny-gpt2")
    assert (
        "the hub is unreachable and gpt2 is not cached" in run.stderr and "OFFLINE TINY MODEL" in run.stderr
    )
    print("fallback took", run.stdout.split()[1], "s")
