"""The Llama family (Llama, Qwen2, Mistral) beside GPT-2: tiny random checkpoints written here (grouped-query
attention, Llama 3's rotary scaling, Qwen2's attention biases and tied head), each served with every
prefix and adapter kind in one mixed batch.

References: the HF model itself (bare rows; a KV prefix as its cache, the row's tokens at positions
P..P+T-1), PEFT's own LoRA layers, HF with a bottleneck added by forward hooks at the sublayer outputs,
HF with NTK-Attention written into its attention function (the paper's formula, independent of the
engine's code); and every row against the same request alone."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save as st_save
from transformers import AttentionInterface, AutoModelForCausalLM

from prefix_store.importers import import_peft, import_peft_lora
from prefix_store.kinds import LoraKind
from prefix_store.kinds.bottleneck import bottleneck
from prefix_store.state import BottleneckAdapter, NtkPrefix
from prefixserve.compile import bind_model
from prefixserve.engine.runner import compile_prefix
from prefixserve.errors import UnsupportedModel
from prefixserve.model import load_model
from prefixserve.tiny import TinyModelConfig, write_tiny_model

from .reference import prefix_cache
from .test_adapters import engine_for, greedy, peft_files, run

FAMILIES = ("llama", "qwen2", "mistral")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(directory, engine's model, HF model) of one tiny Llama-family checkpoint."""
    path = write_tiny_model(
        tmp_path_factory.mktemp(f"tiny-{request.param}"), TinyModelConfig(family=request.param)
    )
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, load_model(path), hf


@pytest.fixture(scope="module")
def peft_lora(family):
    """PEFT's own LoRA on every linear module of the model (random A and B, scaled to a trained size)."""
    _, _, hf = family
    torch.manual_seed(3)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False, task_type="CAUSAL_LM"
    )
    model = get_peft_model(copy.deepcopy(hf), config, adapter_name="l0")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.2)
    return model.eval()


def random_ntk(spec, seed: int = 1) -> NtkPrefix:
    g = torch.Generator().manual_seed(seed)
    lh, d = (spec.n_layer, spec.n_kv_head), spec.head_dim
    return NtkPrefix(torch.randn(*lh, d, d, generator=g) * 0.3, torch.rand(*lh, d, generator=g))


def random_bottleneck(spec, m: int, seed: int = 0) -> BottleneckAdapter:
    g = torch.Generator().manual_seed(seed)
    n, c = spec.n_layer, spec.n_embd

    def rnd(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    return BottleneckAdapter(
        {s: (rnd(n, c, m), rnd(n, m), rnd(n, m, c), rnd(n, c, s=0.05)) for s in ("attn", "mlp")}
    )


# ---- references ----------------------------------------------------------------------------------
def with_bottleneck(hf, adapter: BottleneckAdapter):
    """HF with the adapter added to each layer's attention output (after o_proj) and MLP output (after
    down_proj), before the residual additions, by forward hooks."""
    handles = []
    for layer, block in enumerate(hf.model.layers):
        for site, module in (("attn", block.self_attn), ("mlp", block.mlp)):
            parts = [t[layer] for t in adapter.sites[site]]

            def hook(mod, args, out, parts=parts):
                if isinstance(out, tuple):
                    return (out[0] + bottleneck(out[0], *parts), *out[1:])
                return out + bottleneck(out, *parts)

            handles.append(module.register_forward_hook(hook))
    return handles


def ntk_attention(ntk: NtkPrefix):
    """An HF attention function (no cache, causal) with NTK-Attention's terms, from the paper's formula:
    out = (sum_j exp(q.k_j s) v_j + phi(q) Z) / (sum_j exp(q.k_j s) + phi(q).k), phi = elu(x / D^1/4) + 1,
    each KV head's Z and k serving its query heads."""

    def attend(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        _, h, t, d = query.shape  # key, value [B, Hkv, T, D]
        g = h // key.shape[1]
        k, v = key.repeat_interleave(g, 1).double(), value.repeat_interleave(g, 1).double()
        q = query.double()
        s = q @ k.transpose(-1, -2) * scaling  # [B, H, T, T]
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        e = torch.exp(s - s.amax(-1, keepdim=True))
        m = s.amax(-1, keepdim=True)  # the numerator and denominator are scaled by e^-m below
        z = ntk.z[module.layer_idx].repeat_interleave(g, 0).double()  # [H, D, D]
        kk = ntk.k[module.layer_idx].repeat_interleave(g, 0).double()  # [H, D]
        phi = torch.nn.functional.elu(q / d**0.25) + 1  # [B, H, T, D]
        num = e @ v + torch.exp(-m) * torch.einsum("bhtd,hde->bhte", phi, z)
        den = e.sum(-1, keepdim=True) + torch.exp(-m) * torch.einsum("bhtd,hd->bht", phi, kk)[..., None]
        return (num / den).to(query.dtype).transpose(1, 2).contiguous(), None

    return attend


# ---- tests ----------------------------------------------------------------------------------------
# whole prefills; prompts prefilled in chunks across steps; a pool so small (one longest row) that rows
# are preempted and recomputed
PREEMPTING = {"max_seq_len": 32, "kv_cache_tokens": 32, "block_size": 4}


@pytest.mark.parametrize(
    "config", [{}, {"max_tokens_per_step": 12}, PREEMPTING], ids=["whole", "chunked", "preempted"]
)
def test_a_mixed_batch_of_every_kind_matches_hf_peft_and_each_row_alone(family, peft_lora, config):
    _, model, hf = family
    spec = model.spec
    g = torch.Generator().manual_seed(7)
    kv = torch.randn(spec.prefix_shape(5), generator=g)  # [L, 2, Hkv, P, D]
    ntk = random_ntk(spec)
    states = {
        "kv": kv,
        "ntk": ntk,
        "l0": LoraKind.from_tensors(
            import_peft_lora(*peft_files(peft_lora, "l0"), bind_model(model), 1 << 30)
        ),
        "houlsby": random_bottleneck(spec, 16, seed=1),
    }
    prompt = [torch.randint(0, 400, (n,), generator=g).tolist() for n in (6, 9, 3, 7, 11, 8)]
    rows = [  # (id, prompt, max_new, prefix, adapter)
        ("bare", prompt[0], 6, None, None),
        ("kv", prompt[1], 5, "kv", None),
        ("ntk", prompt[2], 6, "ntk", None),
        ("lora", prompt[3], 7, None, "l0"),
        ("houlsby", prompt[4], 6, None, "houlsby"),
        ("kv+lora", prompt[5], 6, "kv", "l0"),
    ]
    engine = engine_for(model, states, **config)
    mixed = run(engine, rows)
    assert engine.scheduler.num_preemptions >= (1 if config is PREEMPTING else 0)
    for row in rows:
        alone = run(engine_for(model, states), [row])[row[0]]
        assert mixed[row[0]][0] == alone[0], row[0]
        for a, b in zip(mixed[row[0]][1], alone[1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, r=row[0]: f"{r}: {m}")

    def check(rid: str, forward) -> None:
        _, prompt_ids, max_new, *_ = next(r for r in rows if r[0] == rid)
        tokens, logits = greedy(forward, prompt_ids, max_new)
        assert mixed[rid][0] == tokens, f"{rid}: engine {mixed[rid][0]} != reference {tokens}"
        for a, b in zip(mixed[rid][1], logits, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, r=rid: f"{r}: {m}")

    def prefixed(m, ids):
        p = kv.shape[3]
        mask, pos = torch.ones(1, p + ids.shape[1], dtype=torch.long), torch.arange(p, p + ids.shape[1])[None]
        return m(input_ids=ids, attention_mask=mask, position_ids=pos, **prefix_cache(hf, kv)).logits[0, -1]

    check("bare", lambda ids: hf(input_ids=ids).logits[0, -1])
    check("kv", lambda ids: prefixed(hf, ids))
    check("lora", lambda ids: peft_lora(input_ids=ids).logits[0, -1])
    check("kv+lora", lambda ids: prefixed(peft_lora, ids))
    handles = with_bottleneck(hf, states["houlsby"])
    try:
        check("houlsby", lambda ids: hf(input_ids=ids).logits[0, -1])
    finally:
        for h in handles:
            h.remove()
    AttentionInterface.register("ntk_reference", ntk_attention(ntk))
    reference = copy.deepcopy(hf)
    reference.set_attn_implementation("ntk_reference")
    check("ntk", lambda ids: reference(input_ids=ids).logits[0, -1])


def test_text_prefixes_and_peft_prefix_tuning_run_as_hf_does(family):
    """A text compiled into a prefix continues exactly like the text itself; a PEFT prefix-tuning adapter
    (GQA: PEFT stores its K/V per KV head) imports to what PEFT's own forward computes."""
    _, model, hf = family
    ids = list(range(40, 52))
    kv = compile_prefix(model, token_ids=ids[:5])  # [L, 2, Hkv, 5, D]
    assert tuple(kv.shape) == model.spec.prefix_shape(5)
    out = run(engine_for(model, {"text": kv}), [("t", ids[5:], 4, "text", None)])["t"]
    expect, ref_logits = greedy(lambda x: hf(input_ids=x).logits[0, -1], ids, 4)
    assert out[0] == expect
    torch.testing.assert_close(out[1][0], ref_logits[0], rtol=1e-4, atol=1e-4)

    torch.manual_seed(5)
    config = PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    peft = get_peft_model(copy.deepcopy(hf), config).eval()
    with torch.no_grad():
        peft.prompt_encoder["default"].embedding.weight.normal_(0, 0.5)
    raw_config = json.dumps(peft.peft_config["default"].to_dict(), default=list).encode()
    weights = st_save({k: v.contiguous() for k, v in get_peft_model_state_dict(peft).items()})
    prefix = import_peft(raw_config, weights, bind_model(model), 1 << 30)
    assert tuple(prefix.shape) == model.spec.prefix_shape(4)
    out = run(engine_for(model, {"peft": prefix}), [("p", ids, 4, "peft", None)])["p"]
    expect, ref_logits = greedy(lambda x: peft(input_ids=x).logits[0, -1], ids, 4)
    assert out[0] == expect
    torch.testing.assert_close(out[1][0], ref_logits[0], rtol=1e-4, atol=1e-4)


def test_unsupported_llama_variants_are_named(tmp_path):
    path = write_tiny_model(tmp_path / "m", TinyModelConfig(family="llama"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModel, match="rope type 'dynamic' is not supported"):
        load_model(path)


def test_a_llama_checkpoint_served_over_http_with_a_peft_prefix(tmp_path):
    """`prefixserve serve` with PREFIXSERVE_MODEL naming a Llama-family directory: /ready names it, a PEFT
    prefix-tuning adapter made for it uploads and steers generation exactly as PEFT's forward does, and a
    text prefix compiles through the same forward."""
    import httpx

    from .helpers import start_server

    path = write_tiny_model(tmp_path / "tiny-qwen2", TinyModelConfig(family="qwen2"))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.manual_seed(5)
    peft = get_peft_model(
        copy.deepcopy(hf), PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    ).eval()
    with torch.no_grad():
        peft.prompt_encoder["default"].embedding.weight.normal_(0, 0.5)
    config = json.dumps(peft.peft_config["default"].to_dict(), default=list).encode()
    weights = st_save({k: v.contiguous() for k, v in get_peft_model_state_dict(peft).items()})
    proc, url = start_server(path, tmp_path / "data")
    try:
        ready = httpx.get(url + "/ready").json()
        model = ready["model"]
        assert (model["name"], model["family"], model["n_head"], model["n_kv_head"]) == (
            "tiny-qwen2",
            "llama",
            4,
            2,
        )
        files = {
            "adapter_config": ("adapter_config.json", config),
            "adapter_model": ("m.safetensors", weights),
        }
        up = httpx.post(url + "/prefixes", files=files, data={"name": "peft"}, timeout=60)
        assert up.status_code == 201, up.text
        body = {
            "prefix_id": up.json()["id"],
            "input": "name : Aromi",
            "max_new_tokens": 5,
            "ignore_eos": True,
        }
        r = httpx.post(url + "/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text
        tokenizer = load_model(path).tokenizer
        ids = tokenizer.encode("name : Aromi")
        expect, _ = greedy(lambda x: peft(input_ids=x).logits[0, -1], ids, 5)
        assert r.json()["text"] == tokenizer.decode(expect)
        text = httpx.post(url + "/prefixes", json={"name": "t", "text": "Answer briefly.\n"}, timeout=60)
        assert text.status_code == 201, text.text
        assert text.json()["prefix_len"] == len(tokenizer.encode("Answer briefly.\n"))
        r = httpx.post(url + "/generate", json={**body, "prefix_id": text.json()["id"]}, timeout=60)
        assert r.status_code == 200, r.text
    finally:
        proc.terminate()
        proc.wait(30)


def test_prefix_tuning_on_a_llama_matches_peft_and_every_kind_trains(family):
    """The worker's trainer on a Llama-family model: prefix tuning (MLP reparameterisation, P' and the MLP
    sized by the KV width as PEFT sizes them under grouped-query attention) follows PEFT's loss curve
    from the same init; LoRA on all seven modules and a bottleneck adapter train and lower the loss."""
    from prefixserve.training.synthetic import table_to_text
    from prefixserve.training.trainer import PrefixTrainer, TrainConfig

    from .test_training import peft_from, train_peft

    path, model, _ = family
    tok, pairs = model.tokenizer, table_to_text(12, seed=3)
    cfg = TrainConfig(
        prefix_len=4, hidden=32, epochs=2, batch_size=3, learning_rate=1e-2, warmup_steps=1, weight_decay=0.01
    )
    ours = PrefixTrainer(AutoModelForCausalLM.from_pretrained(path), tok, cfg)
    peft = peft_from(ours, AutoModelForCausalLM.from_pretrained(path))
    tensors, prog = ours.train(pairs)
    losses = train_peft(peft, tok, pairs, cfg)
    torch.testing.assert_close(torch.tensor(prog.losses), torch.tensor(losses), rtol=1e-5, atol=1e-5)
    assert tuple(tensors["past_key_values"].shape) == model.spec.prefix_shape(4)
    for kind, extra in (("lora", {"lora_modules": tuple(model.spec.lora_modules())}), ("adapter", {})):
        cfg = TrainConfig(kind=kind, epochs=3, batch_size=4, learning_rate=5e-3, **extra)
        _, prog = PrefixTrainer(AutoModelForCausalLM.from_pretrained(path), tok, cfg).train(pairs)
        assert sum(prog.losses[-3:]) < sum(prog.losses[:3]), (kind, prog.losses)
