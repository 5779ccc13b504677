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
