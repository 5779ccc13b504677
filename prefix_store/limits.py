"""The store's own limits, in the lowest layer that needs them (`prefixserve.limits` re-exports them).

No imports: every module of both packages may use these without an import cycle.
"""

from __future__ import annotations

KIND_PREFIX_KV = "prefix_kv"  # past_key_values [n_layer, 2, n_head, P, head_dim]
KIND_NTK = "ntk"  # per layer and head Z [d, d] and k [d]; occupies no positions
KINDS = (KIND_PREFIX_KV, KIND_NTK)
VISIBILITIES = ("private", "public")
MAX_NAME_LEN = 128  # a prefix's (or training job's) display name, in characters
DEFAULT_MAX_PREFIX_LEN = 512  # positions a stored prefix may occupy, before the model's own cap
