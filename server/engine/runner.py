"""The model runner: one frozen model, one batched forward pass per step, rows with different prefixes.

What a layer computes around attention is its family's (server/families/: GPT-2, the Llama family);
batching, the KV pool, attention and the prefix kinds are here, the same for every family.

Memory (architecture.md, "engine"): a row's own tokens live in a paged KV pool
`kv [n_layer, 2, num_blocks, block_size, n_kv_head, head_dim]`, found through the row's block table
(blocks.py; the scheduler hands blocks out). Its prefix is not copied anywhere: the resident prefix
(device pool) is read in place by every row that uses it. Positions follow invariant 2: a row's own
token i sits at position P + i after a prefix of length P (added position embeddings for GPT-2, a
rotation of its query and key for the Llama family; a prefix's keys are used as given).

A step is flat over tokens: every linear layer runs once on `[N, C]` (decode tokens and prefill
chunks together, no padding). Attention is the one place that looks at rows, as a merge of partial
states (prefix_store/attention.py): each token's attention over its row's own keys (causal; decode rows
read their blocks in place, by the C kernel on the CPU or the Triton kernel on CUDA; prefill chunks
gather them), merged with its prefix kind's part (prefix_store/kinds: KV prefixes attend with
the queries of all rows sharing a prefix stacked, Hydragen; NTK adds its terms). Rows without a
prefix take the first part as it is.

Weight-side adapters (LoRA, bottleneck adapters: prefix_store/kinds/weights.py) attach at the linear
layers: a row may carry one beside its prefix, and in a step with any, each layer runs the adapted path
(the family's `adapted`): every dense matmul still runs once for all tokens, and each adapter kind adds its
rows' deltas at its sites (grouped batched matmuls), leaving the other rows untouched.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from prefix_store.attention import Partial, attention_lse
from prefix_store.kinds import KIND_CLASSES, PrefixKind, kind_of
from prefix_store.kinds.weights import SITES
from prefix_store.spec import ModelSpec
from prefix_store.staging import StepInputs
from prefix_store.triton_env import runs_on as triton_runs_on

from ..model import LoadedModel
from .blocks import NULL_BLOCK, blocks_for
from .cpu_kernels import PagedDecode, load_paged_decode
from .graphs import CudaGraphs, Eager, PiecewiseGraphs
from .prefixes import PrefixState
from .triton_decode import TritonPagedDecode


@dataclass(frozen=True)
class Scores:
    """Log-probabilities of given next tokens: `logprobs [M]`, the `top` most likely `[M, k]` (float32)."""

    logprobs: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor


@dataclass(frozen=True)
class RowInput:
    """One row of a step: its own tokens `start .. start+len-1` (0 = its first input token)."""

    request_id: str
    tokens: list[int]
    start: int
    blocks: list[int]  # the row's block table, covering start + len(tokens) tokens
    # the resident prefix: K/V [n_layer, 2, n_kv_head, P, head_dim], NTK, or none. Rows given the same
    # object share its reads (one matmul per layer for all of them)
    prefix: PrefixState | None = None
    sample: bool = True  # return logits for the row's last token
    # scoring: the tokens that follow the chunk's first len(targets) tokens; each gets its
    # log-probability and the `top` most likely tokens' (StepOutput.scores)
    targets: list[int] = field(default_factory=list)
    top: int = 0
    adapter: PrefixState | None = None  # a weight-side adapter (LoRA, bottleneck), beside any prefix
    # the KV prefix's first slot in the KV pool when it is placed there (unified paging): a short one is
    # then read in place by the CPU decode kernel as the row's first keys (IN_KERNEL_PREFIX)
    prefix_slot: int | None = None


@dataclass
class StepOutput:
    """What one forward pass returns."""

    sample_ids: list[str]  # the rows that sample, in the order of `logits`
    logits: torch.Tensor  # [n_sample, V]
    row_ids: list[str]  # every row of the step, in the order of `finite`
    finite: torch.Tensor  # [B] bool: the row's last hidden state (and logits, if it samples) are finite
    scores: dict[str, Scores] = field(default_factory=dict)  # the rows with targets


@dataclass
class _Paged:
    """Rows whose own keys are read together: decode rows (one query each), or a prefill group
    (chunks of one length and start). Their blocks are gathered into `[R, S, H, D]` per layer."""

    offset: int  # index of the first token in the step
    rows: int  # R
    length: int  # tokens per row (1 for decode)
    table: torch.Tensor  # [R * nb] block ids, row by row (padded with the null block)
    # [R|1, 1, n, S] additive: 0 where a query may look, -inf elsewhere (None: decode rows that the CPU
    # kernel reads in place, by `lens`)
    bias: torch.Tensor | None
    lens: torch.Tensor | None = None  # [R] int32 own tokens per row (decode rows; the kernels)
    # decode rows on the in-place kernel: each row's in-pool prefix, (first slot [R] int64, length [R] int32)
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class _Batch:
    """Device-side inputs of one step: N tokens, the decode rows first, then prefill groups."""

    ids: torch.Tensor  # [N]
    pos: torch.Tensor  # [N] absolute positions (prefix length + own index)
    rope: object  # what the family's `rotate` reads for these positions (None: GPT-2)
    slots: torch.Tensor  # [N] where each token's K/V go in the flat pool (block * block_size + offset)
    parts: list[_Paged]
    last_idx: torch.Tensor  # [B] token index of each row's last token
    sample_rows: torch.Tensor | None  # [n_sample] the rows (of B) whose logits are returned; None: all
    kinds: list[tuple[PrefixKind, object]] = field(default_factory=list)  # (kind, its plan) per kind present
    # (kind, its plan) when every row decodes with a prefix of one kind that fuses (PrefixKind.fuses)
    fused: tuple[PrefixKind, object] | None = None
    adapters: list[tuple[PrefixKind, object]] = field(default_factory=list)  # weight-side (kind, plan)
    targets: dict[str, torch.Tensor] = field(default_factory=dict)  # scoring rows' targets [M] by request


SCORE_SLICE = 256  # prompt tokens scored per [M, V] block
# KV prefixes up to this long, placed in the KV pool, are read by the in-place decode kernel as a decode
# row's first keys (one softmax, nothing to merge); longer ones, which many rows may share, keep their
# kind's attention (Hydragen: read once per step for all the rows that share them)
IN_KERNEL_PREFIX = 64


class ModelRunner:
    def __init__(
        self,
        model: LoadedModel,
        num_blocks: int,
        block_size: int,
        paged_kernel: bool = True,
        graphs: bool = False,
        max_tokens: int = 512,
        pack: bool = True,
        quantize: str | None = None,
    ) -> None:
        spec: ModelSpec = model.spec
        self.spec = spec
        # the family's layers over its GEMMs: packed where it pays, or int8 (dense.py)
        self.f = model.forward(pack, quantize)
        self.device, self.dtype = model.device, model.dtype
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (spec.n_layer, 2, num_blocks, block_size, spec.n_kv_head, spec.head_dim)
        self.kv = torch.zeros(shape, dtype=self.dtype, device=self.device)  # [L, 2, NB, bs, Hkv, D]
        # each kind keeps its own stack cache; attention-side kinds attend, weight-side ones apply
        self.kinds: list[PrefixKind] = [cls() for cls in KIND_CLASSES if not cls.weight_side]
        self.adapters: list[PrefixKind] = [cls() for cls in KIND_CLASSES if cls.weight_side]
        for kind in self.adapters:  # (the sites the families' `adapted` call, in order)
            if unknown := set(kind.sites) - set(SITES):
                raise ValueError(f"kind {kind.name!r} declares sites {sorted(unknown)}; there are {SITES}")
        # the attention-side kinds whose decode steps run own and prefix attention in one kernel here
        self.fused_kinds = {type(k) for k in self.kinds if k.fuses(self.device)}  # (NTK on CUDA)
        self._gathered = [self.kv.new_empty(0, *shape[3:]) for _ in range(2)]  # K, V: [n, bs, H, D]
        # decode rows read their blocks in place (Triton on CUDA, C on the CPU), or they are gathered
        self._paged_decode = _in_place_decode(self.device, self.dtype) if paged_kernel else None
        self.inputs = StepInputs(self.device)  # each step's index tensors: one buffer, one upload
        # steps of up to max_tokens tokens replay each layer's dense pieces (CUDA graphs; on the CPU the
        # same pieces and buffers run eagerly)
        self.graphs = (
            PiecewiseGraphs(
                spec.n_layer,
                (spec.n_embd, spec.qkv_width, spec.q_width),
                self.f.pre,
                self.f.post,
                self.kv,
                CudaGraphs() if self.device.type == "cuda" else Eager(),
                max_tokens,
            )
            if graphs
            else None
        )

    @property
    def graphs_mode(self) -> str:
        """The dense pieces: `PiecewiseGraphs.mode` ("graphs", "eager", "failed"), or "off"."""
        return self.graphs.mode if self.graphs is not None else "off"

    @property
    def decode_kernel(self) -> str:
        """How decode rows read their K/V blocks: "triton" or "c" (in place), "gather" (copied out)."""
        kernel = self._paged_decode
        return "gather" if kernel is None else "triton" if isinstance(kernel, TritonPagedDecode) else "c"

    @property
    def block_bytes(self) -> int:
        """Bytes of one KV block across all layers."""
        return self.kv[:, :, 0].numel() * self.kv.element_size()

    def zero_blocks(self, blocks: list[int]) -> None:
        """Zero what a row leaves behind when its numbers went bad. Attention reads whole blocks and
        masks the positions past a row's length by adding -inf, and NaN + -inf is NaN: stale non-finite
        K/V would reach whichever row takes the block next."""
        if blocks:
            self.kv[:, :, torch.tensor(blocks, device=self.device)] = 0

    # ---- one step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, rows: list[RowInput], inputs_embeds: torch.Tensor | None = None) -> StepOutput:
        """Run one forward pass: the sampling rows' logits, and which rows stayed finite.

        `inputs_embeds [N, C]` replaces the token embeddings (a soft prompt being compiled).
        """
        batch, order = self._prepare(rows)
        embeds = None if inputs_embeds is None else inputs_embeds.to(self.device, self.dtype)
        x = self.f.embed(batch.ids, batch.pos, embeds)  # [N, C]
        bucket = self.graphs.bucket(x.shape[0]) if self.graphs is not None and not batch.adapters else None
        if batch.adapters:  # weight-side adapters in the step: each layer with its adapter sites
            for layer in range(self.spec.n_layer):
                x = self._adapted_block(layer, x, batch)
        elif bucket is not None:  # the dense pieces replayed, attention eager between them
            x = bucket.run(x, lambda layer, qkv, out: self._attend(layer, qkv, batch, out))
        else:
            for layer in range(self.spec.n_layer):
                x = self._block(layer, x, batch)
        h = self.f.norm(x[batch.last_idx])  # [B, C]
        hs = h if batch.sample_rows is None else h[batch.sample_rows]  # [n_sample, C]
        logits = self.f.lm_head(hs)  # [n_sample, V]
        return StepOutput(
            sample_ids=[r.request_id for r in order if r.sample],
            logits=logits,
            row_ids=[r.request_id for r in order],
            finite=_finite_rows(h, logits, batch.sample_rows),
            scores=self._score(x, order, batch.targets),
        )

    def _score(
        self, x: torch.Tensor, order: list[RowInput], targets: dict[str, torch.Tensor]
    ) -> dict[str, Scores]:
        """Log-probabilities of the scoring rows' targets from the final hidden states x `[N, C]`, in
        slices of SCORE_SLICE tokens (a `[M, V]` float32 block at a time)."""
        scores: dict[str, Scores] = {}
        first = 0
        for r in order:
            if r.targets:
                h = x[first : first + len(r.targets)]  # [M, C]
                target = targets[r.request_id]  # [M]
                parts = [self._log_probs(h[i : i + SCORE_SLICE], target[i : i + SCORE_SLICE], r.top)
                         for i in range(0, len(r.targets), SCORE_SLICE)]  # fmt: skip
                scores[r.request_id] = Scores(*(torch.cat(t) for t in zip(*parts, strict=True)))
            first += len(r.tokens)
        return scores

    def _log_probs(
        self, h: torch.Tensor, target: torch.Tensor, top: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Final hidden states h `[M, C]` -> `log_probs` of their logits."""
        return log_probs(self.f.lm_head(self.f.norm(h)), target, top)

    def _prepare(self, rows: list[RowInput]) -> tuple[_Batch, list[RowInput]]:
        self.inputs.begin()
        # decode rows ordered by adapter: each adapter's tokens are then one slice (weights.py)
        decode = sorted(
            (r for r in rows if len(r.tokens) == 1), key=lambda r: (r.adapter is not None, id(r.adapter))
        )
        prefill = sorted((r for r in rows if len(r.tokens) > 1), key=lambda r: (len(r.tokens), r.start))
        order = decode + prefill
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        last_idx: list[int] = []
        sample_rows: list[int] = []
        in_pool = [self._pool_prefix(r) for r in order]  # prefix positions read in place as leading keys
        members: dict[type, dict[int, list[int]]] = {}  # kind -> prefix (by identity) -> its token indices
        states: dict[type, dict[int, PrefixState]] = {}
        for i, r in enumerate(order):
            n, first = len(r.tokens), len(ids)
            kind = None if r.prefix is None else kind_of(r.prefix)
            p = 0 if kind is None else kind.length(r.prefix)
            if blocks_for(r.start + n, bs) > len(r.blocks):
                raise RuntimeError(
                    f"row {r.request_id!r}: {len(r.blocks)} blocks cannot hold {r.start + n} tokens"
                )
            ids += r.tokens
            pos += range(p + r.start, p + r.start + n)
            slots += [r.blocks[j // bs] * bs + j % bs for j in range(r.start, r.start + n)]
            last_idx.append(len(ids) - 1)
            if r.sample:
                sample_rows.append(i)
            for state in (None if in_pool[i] else r.prefix, r.adapter):
                if state is not None:
                    key, k = id(state), kind_of(state)
                    members.setdefault(k, {}).setdefault(key, []).extend(range(first, first + n))
                    states.setdefault(k, {})[key] = state
        inputs = self.inputs
        parts = ([self._decode_part(decode, in_pool[: len(decode)])] if decode else []) + self._prefill_parts(
            prefill, len(decode), in_pool[len(decode) :]
        )
        for k in (*self.kinds, *self.adapters):
            if type(k) not in members:
                k.idle()
        kinds, adapters = (
            [(k, k.plan(members[type(k)], states[type(k)], inputs)) for k in ks if type(k) in members]
            for ks in (self.kinds, self.adapters)
        )
        decoding = not prefill and len(kinds) == 1
        fused = kinds[0] if decoding and self._fusing(kinds[0][0], members, len(decode)) else None
        batch = _Batch(
            ids=inputs.put(ids),
            pos=inputs.put(pos),
            rope=None,
            slots=inputs.put(slots),
            parts=parts,
            last_idx=inputs.put(last_idx),
            sample_rows=None if len(sample_rows) == len(last_idx) else inputs.put(sample_rows),
            kinds=kinds,
            fused=fused,
            adapters=adapters,
            targets={r.request_id: inputs.put(r.targets) for r in order if r.targets},
        )
        inputs.upload()  # every index tensor of the step, in one transfer
        batch.rope = self.f.positions(batch.pos)
        self._masks(parts)
        return batch, order

    def _fusing(self, kind: PrefixKind, members: dict[type, dict[int, list[int]]], tokens: int) -> bool:
        """Whether a step's one attention-side kind fuses here and all of its `tokens` attend to it."""
        return type(kind) in self.fused_kinds and sum(map(len, members[type(kind)].values())) == tokens

    def _pool_prefix(self, r: RowInput) -> int:
        """Positions of the row's prefix read in place as its first keys (0: none): a KV prefix of at
        most IN_KERNEL_PREFIX positions placed in the KV pool, on the in-place kernel's path (decode rows:
        the kernel reads it; prefill rows: its blocks lead the row's gathered blocks). One softmax over
        prefix and own keys, nothing to merge."""
        if self._paged_decode is None or r.prefix_slot is None:
            return 0
        p = kind_of(r.prefix).length(r.prefix)
        return p if p <= IN_KERNEL_PREFIX else 0

    def _decode_part(self, decode: list[RowInput], in_kernel: list[int]) -> _Paged:
        """Decode rows: one query each over its own keys `0 .. start` (the new token included), after
        the `in_kernel[i]` positions of its prefix that the kernel reads in place. Its mask (when the
        blocks are gathered) is made from `lens` once they are on the device (`_masks`)."""
        lens = [r.start + 1 for r in decode]
        nb = blocks_for(max(lens), self.block_size)
        table = self.inputs.put([b for r in decode for b in _padded(r.blocks, nb)])  # [R * nb]
        part = _Paged(0, len(decode), 1, table, None, self.inputs.put(lens, torch.int32))  # lens [R]
        if any(in_kernel):
            slots = [r.prefix_slot if n else 0 for r, n in zip(decode, in_kernel, strict=True)]
            part.prefix = (self.inputs.put(slots), self.inputs.put(in_kernel, torch.int32))  # [R], [R]
        return part

    def _prefill_parts(self, prefill: list[RowInput], offset: int, in_pool: list[int]) -> list[_Paged]:
        """Prefill chunks grouped by (length, start): causal over the row's own keys `0 .. start+i`,
        after the `in_pool[i]` positions of its prefix read in place (their blocks lead its table)."""
        parts: list[_Paged] = []
        dev, bs = self.device, self.block_size
        rows = zip(prefill, in_pool, strict=True)
        for (n, start), group in itertools.groupby(rows, key=lambda rp: (len(rp[0].tokens), rp[0].start)):
            members, lead = zip(*group, strict=True)  # the group's rows, and each one's prefix positions [R]
            nb = blocks_for(start + n, bs)
            pb = blocks_for(max(lead), bs)  # leading prefix blocks per row (0: no row has one)
            table = [
                b
                for r, p in zip(members, lead, strict=True)
                for b in _padded(self._prefix_blocks(r, p), pb) + _padded(r.blocks, nb)
            ]  # [R * (pb + nb)]
            qpos = torch.arange(start, start + n, device=dev)  # [n]
            keep = torch.arange(nb * bs, device=dev) <= qpos[:, None]  # [n, S]
            if pb:  # each row's own prefix positions first: [R, n, pb * bs + S]
                lens = torch.tensor(lead, device=dev)[:, None, None]  # [R, 1, 1]
                ahead = (torch.arange(pb * bs, device=dev) < lens).expand(-1, n, -1)
                keep = torch.cat([ahead, keep.expand(len(members), -1, -1)], dim=2)[:, None]  # [R, 1, n, S']
            else:
                keep = keep[None, None]  # [1, 1, n, S]
            parts.append(_Paged(offset, len(members), n, self.inputs.put(table), self._bias(keep)))
            offset += n * len(members)
        return parts

    def _prefix_blocks(self, r: RowInput, positions: int) -> list[int]:
        """The blocks holding the first `positions` positions of a row's in-pool prefix (none for 0)."""
        if not positions:
            return []
        first = r.prefix_slot // self.block_size  # placed prefixes start on a block (arena.py)
        return list(range(first, first + blocks_for(positions, self.block_size)))

    def _masks(self, parts: list[_Paged]) -> None:
        """After the upload: the decode rows' masks, unless a kernel reads their blocks in place."""
        for part in parts:
            if part.bias is None and self._paged_decode is None:
                span = part.table.numel() // part.rows * self.block_size
                keep = torch.arange(span, device=self.device) < part.lens[:, None]  # [R, S]
                part.bias = self._bias(keep)[:, None, None, :]  # [R, 1, 1, S]

    def _bias(self, keep: torch.Tensor) -> torch.Tensor:
        """keep (bool) -> additive mask of the same shape: 0 where a query may look, -inf elsewhere."""
        bias = torch.zeros(keep.shape, device=self.device, dtype=self.dtype)
        return bias.masked_fill_(~keep, float("-inf"))

    def _block(self, layer: int, x: torch.Tensor, b: _Batch) -> torch.Tensor:
        """One layer, eagerly: x `[N, C]` -> `[N, C]` (updated in place)."""
        attn = x.new_empty(x.shape[0], self.spec.q_width)  # [N, H*D]
        self._attend(layer, self.f.pre(layer, x), b, attn)
        self.f.post(layer, x, attn)
        return x

    def _adapted_block(self, layer: int, x: torch.Tensor, b: _Batch) -> torch.Tensor:
        """One layer with the step's weight-side adapters at their sites (the family's `adapted`)."""
        return self.f.adapted(
            layer,
            x,
            lambda qkv, out: self._attend(layer, qkv, b, out),
            lambda site, inp, out: self._adapt(site, layer, inp, out, b),
        )

    @staticmethod
    def _adapt(site: str, layer: int, inp: torch.Tensor, out: torch.Tensor, b: _Batch) -> None:
        """Each weight-side kind with this site adds its rows' deltas to out."""
        for kind, plan in b.adapters:
            if site in kind.sites:
                kind.apply(site, layer, inp, out, plan)

    def _attend(self, layer: int, qkv: torch.Tensor, b: _Batch, out: torch.Tensor) -> None:
        """Rotate the step's queries and keys (rotary families), write its K and V into the pool, then
        each token's attention into out `[N, H*D]`. qkv `[N, H*D + 2*Hkv*D]`."""
        spec = self.spec
        n, h, hkv, d = qkv.shape[0], spec.n_head, spec.n_kv_head, spec.head_dim
        pool = self.kv[layer].view(2, -1, hkv, d)  # [2, NB * bs, Hkv, D]
        if h == hkv and b.rope is None:  # one write for K and V
            qkv = qkv.view(n, 3, h, d)  # [N, 3, H, D]
            pool[:, b.slots] = qkv[:, 1:].transpose(0, 1)  # K and V in place: [2, N, H, D]
            q = qkv[:, 0]
        else:
            q = qkv[:, : h * d].view(n, h, d)  # [N, H, D]
            k = qkv[:, h * d : (h + hkv) * d].view(n, hkv, d)  # [N, Hkv, D]
            if b.rope is not None:
                self.f.rotate(q, k, b.rope)
            pool[0, b.slots] = k
            pool[1, b.slots] = qkv[:, (h + hkv) * d :].view(n, hkv, d)
        self._attention(layer, q, b, out.view(n, h, d))

    def _attention(self, layer: int, q: torch.Tensor, b: _Batch, out: torch.Tensor) -> None:
        """Each token's attention: over its row's own keys, merged with its prefix's part.
        q `[N, H, D]` -> out `[N, H, D]`."""
        scale = self.spec.attn_scale(layer)
        if b.fused is not None:  # every row decodes with a prefix of one kind: its kernel does both parts
            kind, plan = b.fused
            k, v = self._gather(layer, b.parts[0])
            out.copy_(kind.fused_decode(layer, q, k, v, b.parts[0].lens, plan, scale))
            return
        lse = self._own_attention(layer, q, b, scale, out, with_lse=bool(b.kinds))
        for kind, plan in b.kinds:
            idx, part = kind.attend(layer, q, plan, scale)  # [T], Partial over T tokens
            out[idx] = Partial.softmax(out[idx], lse[idx]).merge(part).value().to(out.dtype)

    def _own_attention(
        self, layer: int, q: torch.Tensor, b: _Batch, scale: float, out: torch.Tensor, with_lse: bool
    ) -> torch.Tensor | None:
        """Causal attention over each row's own keys. q `[N, H, D]` -> out `[N, H, D]` and, when asked,
        the log-sum-exp of its scores `[N, H]` (float32)."""
        lse = torch.empty(q.shape[:2], device=q.device) if with_lse else None  # [N, H]
        for part in b.parts:
            end = part.offset + part.rows * part.length
            if part.bias is None:  # decode rows, blocks read in place (C or Triton kernel)
                self._paged_decode(
                    q[part.offset : end], *self.kv[layer], part.table.view(part.rows, -1), part.lens,
                    out[part.offset : end], None if lse is None else lse[part.offset : end], scale,
                    part.prefix,
                )  # fmt: skip
                continue
            qs = (
                q[part.offset : end].view(part.rows, part.length, *q.shape[1:]).transpose(1, 2)
            )  # [R, H, n, D]
            k, v = self._gather(layer, part)  # [R, H, S, D]
            if with_lse:
                o, part_lse = attention_lse(qs, k, v, part.bias, scale)  # [R, H, n, D], [R, H, n]
                lse[part.offset : end] = part_lse.transpose(1, 2).reshape(-1, q.shape[1])
            else:
                o = F.scaled_dot_product_attention(
                    qs, k, v, attn_mask=part.bias, scale=scale, enable_gqa=k.shape[1] != qs.shape[1]
                )
            out[part.offset : end] = o.transpose(1, 2).reshape(-1, *q.shape[1:])
        return lse

    def _gather(self, layer: int, part: _Paged) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' own K and V, block by block, into two reused buffers (a fresh tensor per call
        costs page faults as large as the copy): -> two `[R, Hkv, S, D]` views."""
        spec, n = self.spec, part.table.numel()
        out = []
        for i in (0, 1):  # K, V
            buf = self._gather_buffer(i, n)  # [n, bs, H, D]
            torch.index_select(self.kv[layer, i], 0, part.table, out=buf)
            out.append(buf.view(part.rows, -1, spec.n_kv_head, spec.head_dim).transpose(1, 2))
        return out[0], out[1]

    def _gather_buffer(self, i: int, blocks: int) -> torch.Tensor:
        """Buffer i (0: K, 1: V) for `blocks` gathered blocks -> `[blocks, bs, H, D]` (grown as needed)."""
        shape = self.kv.shape[3:]  # [bs, H, D]
        if self._gathered[i].shape[0] < blocks:
            self._gathered[i] = self.kv.new_empty(int(blocks * 1.25) + 1, *shape)
        return self._gathered[i][:blocks]


def _in_place_decode(device: torch.device, dtype: torch.dtype) -> TritonPagedDecode | PagedDecode | None:
    """The kernel that reads decode rows' K/V blocks in place: Triton's where Triton runs (CUDA, or the
    CPU under its interpreter), else the C kernel on the CPU in the dtypes it serves; None: the blocks
    are gathered."""
    if triton_runs_on(device):
        return TritonPagedDecode(max_prefix=IN_KERNEL_PREFIX)
    kernel = load_paged_decode() if device.type == "cpu" else None
    return kernel if kernel is not None and dtype in kernel.dtypes else None


def log_probs(
    logits: torch.Tensor, target: torch.Tensor, top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits `[M, V]`, target `[M]` -> the targets' log-probabilities `[M]`, and the `top` most likely
    tokens' ids and log-probabilities `[M, top]` (float32)."""
    lp = torch.log_softmax(logits.float(), -1)  # [M, V]
    best = lp.topk(top, -1)
    return lp.gather(1, target[:, None])[:, 0], best.indices, best.values


def _padded(blocks: list[int], n: int) -> list[int]:
    """A row's first `n` block ids, padded with the null block (its zeros are masked anyway)."""
    return blocks[:n] + [NULL_BLOCK] * (n - len(blocks[:n]))


def _finite_rows(h: torch.Tensor, logits: torch.Tensor, sample_rows: torch.Tensor | None) -> torch.Tensor:
    """Which rows stayed finite: h `[B, C]` (each row's normalised last hidden state), logits
    `[n_sample, V]` of the rows `sample_rows` (None: all) -> `[B]` bool. NaN or Inf anywhere in a
    row's keys or values reaches its last token through attention and layer norm, so this sees every
    bad row, sampling or not. A float32 sum is one pass and non-finite exactly when a term is (short
    of overflowing float32, which no sane row does), cheaper than `isfinite().all()`."""
    ok = h.sum(-1, dtype=torch.float32).isfinite()  # [B]
    if logits.shape[0]:
        sampled = logits.sum(-1, dtype=torch.float32).isfinite()  # [n_sample]
        ok = ok & sampled if sample_rows is None else ok.index_put((sample_rows,), sampled & ok[sample_rows])
    return ok


def compile_prefix(
    model: LoadedModel, token_ids: list[int] | None = None, embeds: torch.Tensor | None = None
) -> torch.Tensor:
    """Run a text (token ids) or a soft prompt (`embeds [P, C]`) through the frozen model at
    positions 0..P-1 and return its per-layer K/V `[n_layer, 2, n_kv_head, P, head_dim]`: the prefix
    that makes later tokens see exactly what they would see after that text or soft prompt."""
    n = len(token_ids) if token_ids is not None else embeds.shape[0]  # type: ignore[union-attr]
    block_size = 16
    nb = blocks_for(n, block_size)
    # the plain layout: a compile runs once per prefix, in whichever process asks (no packed copy for it)
    runner = ModelRunner(model, num_blocks=nb + 1, block_size=block_size, pack=False)
    ids = token_ids if token_ids is not None else [0] * n  # ids unused when embeds are given
    blocks = list(range(1, nb + 1))
    runner.execute([RowInput("compile", ids, 0, blocks, sample=False)], inputs_embeds=embeds)
    s = model.spec
    kv = runner.kv[:, :, 1:].reshape(s.n_layer, 2, nb * block_size, s.n_kv_head, s.head_dim)[:, :, :n]
    return kv.transpose(2, 3).clone()  # [L, 2, Hkv, P, D]
