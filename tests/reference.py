"""The simple reference the engine is checked against: HF `generate`, one request at a time, with
the prefix given as `past_key_values` (how PEFT runs prefix tuning)."""

from __future__ import annotations

import torch
from transformers import DynamicCache, GPT2LMHeadModel


def prefix_cache(prefix: torch.Tensor) -> DynamicCache:
    """Canonical `[n_layer, 2, n_head, P, head_dim]` -> an HF cache holding it for a batch of one."""
    return DynamicCache(ddp_cache_data=[(p[0][None].clone(), p[1][None].clone()) for p in prefix])


@torch.inference_mode()
def hf_generate(
    hf: GPT2LMHeadModel, prompt_ids: list[int], prefix: torch.Tensor | None, max_new_tokens: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the logits `[V]` of each step, from HF generate with the prefix as cache."""
    p = 0 if prefix is None else prefix.shape[3]
    out = hf.generate(
        torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, p + len(prompt_ids), dtype=torch.long),
        past_key_values=None if prefix is None else prefix_cache(prefix),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=hf.config.eos_token_id,
    )
    return out.sequences[0, len(prompt_ids) :].tolist(), [step[0] for step in out.logits]


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
