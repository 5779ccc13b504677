"""Weight-side adapter kinds (LoRA, bottleneck adapters) served per row beside prefix rows.

References: PEFT itself for LoRA (its own LoRA layers, every step one mixed batch with `adapter_names=`),
HF GPT-2 with the bottleneck added by forward hooks at the sublayer outputs for adapters, HF with the
prefix as `past_key_values` (and PEFT's LoRA active, for a row carrying both) for composition; and
every row of a mixed batch against the same request alone."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save as st_save

from prefix_store.format import InvalidPrefixFile
from prefix_store.importers import import_peft_lora
from prefix_store.kinds import BottleneckKind, LoraKind
from prefix_store.kinds.bottleneck import bottleneck
from prefix_store.service import PrefixService, StoreConfig
from prefix_store.state import BottleneckAdapter, LoraAdapter, NtkPrefix
from prefixserve.compile import bind_model
from prefixserve.engine import EngineConfig, EngineCore, SamplingParams

from .helpers import collect
from .reference import prefix_cache

LORA_SPECS = {  # name -> (r, lora_alpha, target modules)
    "l0": (4, 8, ["c_attn", "c_proj", "c_fc"]),
    "l1": (2, 3, ["c_attn"]),
    "l2": (8, 16, ["c_fc", "c_proj"]),
}


# ---- building adapters ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def peft_model(hf_model):
    """A PEFT model with three LoRA adapters (random A and B, PEFT's own layers) on a copy of the model."""
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
    torch.manual_seed(3)
    model = None
    for name, (r, alpha, targets) in LORA_SPECS.items():
        config = LoraConfig(
            r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, fan_in_fan_out=True,
            task_type="CAUSAL_LM",
        )  # fmt: skip
        if model is None:
            model = get_peft_model(copy.deepcopy(hf_model), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    with torch.no_grad():  # PEFT's random init gives large deltas: scale them to a trained adapter's size
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.2)
    return model.eval()


def peft_files(peft_model, name: str) -> tuple[bytes, bytes]:
    """What PEFT's save_pretrained writes for one adapter: adapter_config.json, adapter_model.safetensors."""
    config = json.dumps(peft_model.peft_config[name].to_dict(), default=list).encode()
    weights = {k: v.contiguous() for k, v in get_peft_model_state_dict(peft_model, adapter_name=name).items()}
    return config, st_save(weights)


def lora_of(peft_model, tiny_model, name: str) -> LoraAdapter:
    config, weights = peft_files(peft_model, name)
    tensors = import_peft_lora(config, weights, bind_model(tiny_model), 1 << 30)
    return LoraKind.from_tensors(tensors)


def random_bottleneck(tiny_model, m: int, sites=("attn", "mlp"), seed: int = 0) -> BottleneckAdapter:
    g = torch.Generator().manual_seed(seed)
    spec = tiny_model.spec
    n, c = spec.n_layer, spec.n_embd

    def rnd(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    return BottleneckAdapter({s: (rnd(n, c, m), rnd(n, m), rnd(n, m, c), rnd(n, c, s=0.05)) for s in sites})


def random_ntk(tiny_model, seed: int = 1) -> NtkPrefix:
    g = torch.Generator().manual_seed(seed)
    spec = tiny_model.spec
    lh, d = (spec.n_layer, spec.n_head), spec.head_dim
    return NtkPrefix(torch.randn(*lh, d, d, generator=g) * 0.3, torch.rand(*lh, d, generator=g))


# ---- references ----------------------------------------------------------------------------------
def greedy(forward, prompt_ids: list[int], max_new: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and each step's logits from whole-sequence forwards: forward(ids [1, T]) -> [V]."""
    seq, logits = list(prompt_ids), []
    with torch.inference_mode():
        for _ in range(max_new):
            logits.append(forward(torch.tensor([seq])))
            seq.append(int(logits[-1].argmax()))
    return seq[len(prompt_ids) :], logits


def with_bottleneck(hf_model, adapter: BottleneckAdapter):
    """HF GPT-2 with the adapter added to each block's attention output and MLP output (before the
    residual additions), by forward hooks: the textbook form, independent of the engine's code."""
    handles = []
    for layer, block in enumerate(hf_model.transformer.h):
        for site, module in (("attn", block.attn), ("mlp", block.mlp)):
            if site not in adapter.sites:
                continue
            parts = [t[layer] for t in adapter.sites[site]]

            def hook(mod, args, out, parts=parts):
                if isinstance(out, tuple):
                    return (out[0] + bottleneck(out[0], *parts), *out[1:])
                return out + bottleneck(out, *parts)

            handles.append(module.register_forward_hook(hook))
    return handles


def engine_for(tiny_model, states: dict, **config) -> EngineCore:
    engine = EngineCore(tiny_model, EngineConfig(**{"max_running": 11, "record_logits": True, **config}))
    for sid, state in states.items():
        engine.prefixes.register(sid, state)
    return engine


def run(engine: EngineCore, rows: list[tuple]) -> dict[str, tuple]:
    """rows: (request id, prompt ids, max_new, prefix id, adapter id) -> id: (tokens, logits)."""
    for rid, prompt, max_new, pid, aid in rows:
        engine.add_request(prompt, SamplingParams(max_new_tokens=max_new), pid, rid, aid)
    return {rid: collect(outs)[:2] for rid, outs in engine.run_to_completion().items()}


# ---- tests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [512, 12])  # 12: prompts prefilled in chunks across steps
def test_a_mixed_batch_of_every_kind_matches_peft_hf_and_each_row_alone(
    tiny_model, hf_model, peft_model, budget
):
    g = torch.Generator().manual_seed(7)
    kv = torch.randn(tiny_model.spec.prefix_shape(5), generator=g)
    states = {
        "kv": kv,
        "ntk": random_ntk(tiny_model),
        **{name: lora_of(peft_model, tiny_model, name) for name in LORA_SPECS},
        "houlsby": random_bottleneck(tiny_model, 16, seed=1),
        "pfeiffer": random_bottleneck(tiny_model, 8, sites=("mlp",), seed=2),
    }
    prompt = [
        list(torch.randint(0, 400, (n,), generator=g).tolist()) for n in (6, 9, 3, 7, 11, 4, 8, 5, 10, 6)
    ]
    rows = [  # (id, prompt, max_new, prefix, adapter)
        ("bare", prompt[0], 6, None, None),
        ("kv", prompt[1], 5, "kv", None),
        ("ntk", prompt[2], 6, "ntk", None),
        ("l0", prompt[3], 7, None, "l0"),
        ("l1", prompt[4], 5, "l1", None),  # a LoRA named as the prefix is the row's adapter
        ("l2", prompt[5], 6, None, "l2"),
        ("houlsby", prompt[6], 6, None, "houlsby"),
        ("pfeiffer", prompt[7], 5, None, "pfeiffer"),
        ("kv+l0", prompt[8], 6, "kv", "l0"),  # composition: a prefix and an adapter on one row
        ("ntk+houlsby", prompt[9], 5, "ntk", "houlsby"),
        ("l0-again", prompt[1], 4, None, "l0"),  # two rows share an adapter
    ]
    mixed = run(engine_for(tiny_model, states, max_tokens_per_step=budget), rows)
    for row in rows:  # each alone, in an engine of its own
        alone = run(engine_for(tiny_model, states), [row])[row[0]]
        assert mixed[row[0]][0] == alone[0], row[0]
        for a, b in zip(mixed[row[0]][1], alone[1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, r=row[0]: f"{r}: {m}")

    def check(rid: str, forward) -> None:
        _, prompt_ids, max_new, *_ = next(r for r in rows if r[0] == rid)
        tokens, logits = greedy(forward, prompt_ids, max_new)
        assert mixed[rid][0] == tokens, f"{rid}: engine {mixed[rid][0]} != reference {tokens}"
        for a, b in zip(mixed[rid][1], logits, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, r=rid: f"{r}: {m}")

    check("bare", lambda ids: hf_model(input_ids=ids).logits[0, -1])
    for name in LORA_SPECS:
        check(name, lambda ids, n=name: peft_model(input_ids=ids, adapter_names=[n]).logits[0, -1])

    def prefixed(model, ids):
        p = kv.shape[3]
        mask, pos = torch.ones(1, p + ids.shape[1], dtype=torch.long), torch.arange(p, p + ids.shape[1])[None]
        return model(
            input_ids=ids, attention_mask=mask, position_ids=pos, **prefix_cache(hf_model, kv)
        ).logits[0, -1]

    check("kv", lambda ids: prefixed(hf_model, ids))
    peft_model.set_adapter("l0")
    check("kv+l0", lambda ids: prefixed(peft_model, ids))
    for name in ("houlsby", "pfeiffer"):
        handles = with_bottleneck(hf_model, states[name])
        try:
            check(name, lambda ids: hf_model(input_ids=ids).logits[0, -1])
        finally:
            for h in handles:
                h.remove()


# even: every adapter has two rows, so the engine's decode groups are one slice of the step (no gather)
@pytest.mark.parametrize(
    "names",
    [["l0", "__base__", "l1", "l2", "l0"], ["l2", "l0", "l1", "l0", "l1", "l2", "__base__"]],
    ids=["uneven", "even"],
)
def test_peft_mixed_batch_equals_the_engine_mixed_batch(tiny_model, peft_model, names):
    """One PEFT forward over a batch mixing its adapters and the base model (`adapter_names=`), step by
    step, against the engine's rows (equal-length prompts, so PEFT needs no padding)."""
    g = torch.Generator().manual_seed(11)
    prompts = torch.randint(0, 400, (len(names), 7), generator=g)
    states = {name: lora_of(peft_model, tiny_model, name) for name in LORA_SPECS}
    rows = [
        (f"r{i}", prompts[i].tolist(), 6, None, None if n == "__base__" else n) for i, n in enumerate(names)
    ]
    mixed = run(engine_for(tiny_model, states), rows)
    seqs = prompts.clone()
    with torch.inference_mode():
        for step in range(6):
            logits = peft_model(input_ids=seqs, adapter_names=names).logits[:, -1]  # [B, V]
            for i in range(len(names)):
                torch.testing.assert_close(mixed[f"r{i}"][1][step], logits[i], rtol=1e-4, atol=1e-4)
            seqs = torch.cat([seqs, logits.argmax(-1, keepdim=True)], dim=1)
    for i in range(len(names)):
        assert mixed[f"r{i}"][0] == seqs[i, 7:].tolist()


def test_peft_lora_import_folds_the_scaling_and_refuses_what_it_cannot_serve(tiny_model, peft_model):
    binding = bind_model(tiny_model)
    config, weights = peft_files(peft_model, "l0")
    lora = LoraKind.from_tensors(import_peft_lora(config, weights, binding, 1 << 30))
    assert sorted(lora.modules) == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]  # c_proj: both
    layer = peft_model.base_model.model.transformer.h[1].attn.c_attn
    a, b = lora.modules["attn.c_attn"]
    torch.testing.assert_close(a[1], layer.lora_A["l0"].weight.T.detach())
    torch.testing.assert_close(b[1], layer.lora_B["l0"].weight.T.detach() * (8 / 4))  # alpha / r
    cfg = json.loads(config)
    for change, expected in [
        ({"use_dora": True}, "use_dora must be False"),
        ({"rank_pattern": {"c_attn": 2}}, "rank_pattern"),
        ({"r": 0}, r"r \(a positive integer\)"),
        ({"peft_type": "IA3"}, "peft_type must be one of"),
    ]:
        with pytest.raises(InvalidPrefixFile, match=expected):
            import_peft_lora(json.dumps({**cfg, **change}).encode(), weights, binding, 1 << 30)
    sd = get_peft_model_state_dict(peft_model, adapter_name="l0")
    partial = {k: v.contiguous() for k, v in sd.items() if ".h.1.attn.c_attn" not in k}
    with pytest.raises(InvalidPrefixFile, match=r"attn.c_attn are missing for layers \[1\]"):
        import_peft_lora(config, st_save(partial), binding, 1 << 30)
    extra = {**{k: v.contiguous() for k, v in sd.items()}, "transformer.wte.weight": torch.zeros(2, 2)}
    with pytest.raises(InvalidPrefixFile, match="expected only LoRA weights"):
        import_peft_lora(config, st_save(extra), binding, 1 << 30)
    wrong = {
        k: (v[:, :3].contiguous() if k.endswith("lora_B.weight") else v.contiguous()) for k, v in sd.items()
    }
    with pytest.raises(InvalidPrefixFile, match="must have shape"):
        import_peft_lora(config, st_save(wrong), binding, 1 << 30)


def test_adapters_are_stored_validated_and_loaded_like_prefixes(tiny_model, peft_model, tmp_path):
    service = PrefixService(bind_model(tiny_model), StoreConfig(url=str(tmp_path)))
    try:
        config, weights = peft_files(peft_model, "l2")
        meta = service.add_peft(config, weights, owner="alice", name="l2")
        assert (meta.kind, meta.prefix_len, meta.source) == ("lora", 0, "peft")
        houlsby = random_bottleneck(tiny_model, 6)
        spec = tiny_model.spec
        made = service.add_tensors(BottleneckKind.to_tensors(houlsby), owner="alice", name="houlsby")
        assert made.kind == "adapter"
        data = service.store.get(made.id)
        assert service.add_file(data, owner="bob").kind == "adapter"  # a native file round trip
        for bad, expected in [
            (
                {
                    **BottleneckKind.to_tensors(houlsby),
                    "adapter.attn.up": torch.zeros(spec.n_layer, 5, spec.n_embd),
                },
                "must have shape",
            ),
            ({k: v * 1e5 for k, v in BottleneckKind.to_tensors(houlsby).items()}, "above the bound"),
            (
                {"lora_a.attn.c_attn": torch.zeros(spec.n_layer, spec.n_embd, 3)},
                "expected the tensors of one kind",
            ),
        ]:
            with pytest.raises(InvalidPrefixFile, match=expected):
                service.add_tensors(bad, owner="alice")
    finally:
        service.close()


def test_adapters_over_http_alone_composed_and_refused(live_server, peft_model):
    import httpx

    from .helpers import A, B, text_prefix

    server = live_server()
    config, weights = peft_files(peft_model, "l0")
    files = {
        "adapter_config": ("adapter_config.json", config),
        "adapter_model": ("m.safetensors", weights),
    }
    up = httpx.post(server.url + "/prefixes", files=files, data={"name": "lora"}, headers=A)
    assert up.status_code == 201, up.text
    lora = up.json()
    assert (lora["kind"], lora["prefix_len"], lora["source"]) == ("lora", 0, "peft")
    kv = text_prefix(server, A)["id"]

    def generate(**body):
        body = {"input": "name : Aromi", "max_new_tokens": 6, **body}
        return httpx.post(server.url + "/generate", json=body, headers=A, timeout=60)

    texts = {}
    for label, body in {
        "bare": {},
        "lora": {"prefix_id": lora["id"]},
        "kv": {"prefix_id": kv},
        "kv+lora": {"prefix_id": kv, "adapter_id": lora["id"]},
    }.items():
        r = generate(**body)
        assert r.status_code == 200, (label, r.text)
        texts[label] = r.json()["text"]
    assert texts["kv+lora"] not in (texts["kv"], texts["lora"])  # both steer the row
    scores = [
        httpx.post(
            server.url + "/score",
            json={"input": "name : Aromi", "continuation": " is a pub.", **steer},
            headers=A,
            timeout=60,
        )
        for steer in ({"prefix_id": kv}, {"prefix_id": kv, "adapter_id": lora["id"]})
    ]
    assert all(r.status_code == 200 for r in scores), [r.text for r in scores]
    assert scores[0].json()["total_logprob"] != scores[1].json()["total_logprob"]  # the adapter counts
    body = {"model": f"{kv}+{lora['id']}", "prompt": "name : Aromi", "max_tokens": 6, "temperature": 0}
    r = httpx.post(server.url + "/v1/completions", json=body, headers=A, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == texts["kv+lora"]
    for body, status, expected in [
        ({"adapter_id": kv}, 422, "adapter_id: pfx-"),  # a prefix is not an adapter
        (
            {"prefix_id": lora["id"], "adapter_id": lora["id"]},
            422,
            "beside adapter_id it must be a prefix",
        ),
    ]:
        r = generate(**body)
        assert r.status_code == status and expected in r.text, r.text
    other = httpx.post(
        server.url + "/generate", json={"input": "x", "adapter_id": lora["id"]}, headers=B, timeout=60
    )
    assert other.status_code == 404  # another tenant's private adapter is not found


def test_a_span_is_found_only_for_consecutive_tokens():
    from prefix_store.kinds.weights import _span

    assert _span([[3, 4], [5, 6]]) == (3, 7)
    assert _span([[3, 4], [6, 7]]) is None
    assert _span([[4, 3], [5, 6]]) is None


def test_stacking_pads_with_zeros_or_stacks_as_is():
    from prefix_store.kinds.weights import stacked

    a, b = torch.randn(3, 5, 2), torch.randn(3, 5, 4)
    padded = stacked([a, None, b], (5, 4), a)  # [L, G, 5, 4]
    assert padded.shape == (3, 3, 5, 4)
    assert torch.equal(padded[:, 0, :, :2], a) and not padded[:, 0, :, 2:].any() and not padded[:, 1].any()
    assert torch.equal(padded[:, 2], b)
    same = stacked([b, b.clone()], (5, 4), b)
    assert torch.equal(same, torch.stack([b, b], dim=1))
