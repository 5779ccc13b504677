"""The store's own limits, in the lowest layer that needs them (`prefixserve.limits` re-exports them).

No imports: every module of both packages may use these without an import cycle.
"""

from __future__ import annotations

KIND_PREFIX_KV = "prefix_kv"  # past_key_values [n_layer, 2, n_head, P, head_dim]
KIND_NTK = "ntk"  # per layer and head Z [d, d] and k [d]; occupies no positions
KIND_LORA = "lora"  # weight side: low-rank updates of GPT-2's linear modules
KIND_ADAPTER = "adapter"  # weight side: bottleneck adapters (Houlsby, Pfeiffer; AdaMix averaged into one)
# (the list of kinds, and which attach at the linear layers, is the registered classes': kinds.KINDS)
ADAPTER_MAX_ABS = 1000.0  # the largest |value| a weight-side adapter file may hold (trained ones: << 10)
VISIBILITIES = ("private", "public")
MAX_NAME_LEN = 128  # a prefix's (or training job's) display name, in characters
DEFAULT_MAX_PREFIX_LEN = 512  # positions a stored prefix may occupy, before the model's own cap
MAX_JSON_DEPTH = 32  # deepest nesting of arrays/objects accepted anywhere (real documents need <= 4)
MIN_REQUEST_TOKENS = 2  # a request holds at least one input token and asks for at least one new token


def longest_usable_prefix(capacity: int) -> int:
    """The longest prefix a request can still run with in `capacity` positions (n_positions or the
    engine's max_seq_len): the engine's `_check_fits` needs prefix + input + max_new_tokens <= capacity."""
    return capacity - MIN_REQUEST_TOKENS
