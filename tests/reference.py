"""The simple references the engine is checked against: HF's own GPT-2 forward, one request at a
time, one whole-sequence forward per new token, with the prefix handed over as the KV cache (how PEFT
defines prefix tuning). No `generate`: its handling of a pre-filled cache differs between
transformers releases, and a reference must not move with them."""

from __future__ import annotations

import torch
from transformers import GPT2LMHeadModel

from prefixserve.model import hf_cache_kwargs


def prefix_cache(hf: GPT2LMHeadModel, prefix: torch.Tensor) -> dict:
    """Canonical `[n_layer, 2, n_head, P, head_dim]` -> the keyword handing HF a fresh cache that holds
    it for a batch of one (`cache=` or `past_key_values=`, whichever this transformers takes)."""
    return hf_cache_kwargs(hf, [(p[0][None].clone(), p[1][None].clone()) for p in prefix])


@torch.inference_mode()
def hf_greedy(
    hf: GPT2LMHeadModel,
    prompt_ids: list[int],
    prefix: torch.Tensor | None,
    max_new_tokens: int,
    soft_prompt: torch.Tensor | None = None,
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the logits `[V]` of each step from plain HF forwards over the whole sequence.

    `prefix` `[L, 2, H, P, D]`: prefix tuning, the K/V of P virtual tokens at positions 0..P-1 handed
    over as the KV cache, and the text at P.. (invariant 2). `soft_prompt` `[P, n_embd]`: prompt
    tuning, P input embeddings before the text's, which then also sits at P...
    """
    seq, logits = list(prompt_ids), []
    for _ in range(max_new_tokens):
        ids = torch.tensor([seq])  # [1, T]
        if prefix is not None:
            p = prefix.shape[3]
            out = hf(
                input_ids=ids,
                attention_mask=torch.ones(1, p + len(seq), dtype=torch.long),
                position_ids=torch.arange(p, p + len(seq))[None],
                **prefix_cache(hf, prefix),
            )
        elif soft_prompt is not None:
            out = hf(inputs_embeds=torch.cat([soft_prompt, hf.transformer.wte(ids[0])])[None])  # [1, P+T, C]
        else:
            out = hf(input_ids=ids)
        logits.append(out.logits[0, -1])  # [V]
        seq.append(int(logits[-1].argmax()))
    return seq[len(prompt_ids) :], logits


@torch.no_grad()
def ntk_logits(model: GPT2LMHeadModel, ids: list[int], z: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """A plain, unbatched implementation of NTK-Attention's formula on HF GPT-2's own modules, per
    head, with m the max score as written in the paper. z `[L, H, D, D]`, k `[L, H, D]` -> logits `[T, V]`.
    """
    tr, cfg = model.transformer, model.config
    n, c, h = len(ids), cfg.n_embd, cfg.n_head
    d = c // h
    x = tr.wte(torch.tensor(ids)) + tr.wpe(torch.arange(n))  # [T, C]: an NTK prefix takes no positions
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for layer, block in enumerate(tr.h):
        q, key, v = block.attn.c_attn(block.ln_1(x)).split(c, dim=-1)  # [T, C] each
        heads = []
        for i in range(h):
            qi, ki, vi = (t[:, i * d : (i + 1) * d] for t in (q, key, v))  # [T, D]
            scores = (qi @ ki.T / d**0.5).masked_fill(~causal, float("-inf"))  # [T, T]
            m = scores.max(dim=-1, keepdim=True).values  # [T, 1]
            e = torch.exp(scores - m)  # [T, T]
            f = torch.nn.functional.elu(qi / d**0.25) + 1  # phi(q) [T, D]
            num = e @ vi + (f @ z[layer, i]) * torch.exp(-m)  # [T, D]
            den = e.sum(-1, keepdim=True) + (f @ k[layer, i])[:, None] * torch.exp(-m)  # [T, 1]
            heads.append(num / den)
        x = x + block.attn.c_proj(torch.cat(heads, dim=-1))
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(tr.ln_f(x))  # [T, V]


def ntk_generate(
    model: GPT2LMHeadModel, ids: list[int], z: torch.Tensor, k: torch.Tensor, max_new_tokens: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding with `ntk_logits`, recomputing the whole sequence each step."""
    seq, tokens, logits = list(ids), [], []
    for _ in range(max_new_tokens):
        last = ntk_logits(model, seq, z, k)[-1]
        tokens.append(int(last.argmax()))
        logits.append(last)
        seq.append(tokens[-1])
    return tokens, logits
