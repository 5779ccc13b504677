"""The model runner: one frozen GPT-2, one batched forward pass per step, rows with different prefixes.

KV slots are allocated once: `k, v [n_layer, n_slots, n_head, max_seq_len, head_dim]`. A row owns one
slot; its prefix K/V sit at positions `0 .. P-1` and its tokens at `P .. P+T-1` (architecture.md
invariant 2), so slot position = absolute position and each row attends to its own prefix plus its
own tokens. Slots in use are kept dense (`0 .. n_used-1`): when a row leaves, the last row moves into
its slot, so decode attention runs over one contiguous view of the cache.

A step is flat over tokens: every linear layer runs once on `[N, C]` (decode tokens and prefill
chunks together, no padding); attention is the one place that looks at rows: decode rows in one
`scaled_dot_product_attention` over the slot view with a per-row length mask, each prefill chunk
against its own slot with a causal mask.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model import LayerWeights, LoadedModel, ModelSpec
from . import ntk_triton
from .ntk import NtkPrefix, ntk_combine
from .prefixes import PrefixState


@dataclass(frozen=True)
class RowInput:
    """One row of a step: `tokens` computed at slot positions `position .. position+len-1`."""

    request_id: str
    tokens: list[int]
    position: int
    # given with the first chunk: K/V [n_layer, 2, n_head, P, head_dim] or an NTK prefix (no positions)
    prefix: torch.Tensor | NtkPrefix | None = None
    open_slot: bool = False  # the row's first chunk: take a fresh slot (and place its prefix)
    sample: bool = True  # return logits for the row's last token


@dataclass
class StepOutput:
    """What one forward pass returns."""

    sample_ids: list[str]  # the rows that sample, in the order of `logits`
    logits: torch.Tensor  # [n_sample, V]
    row_ids: list[str]  # every row of the step, in the order of `finite`
    finite: torch.Tensor  # [B] bool: the row's last hidden state (and logits, if it samples) are finite


@dataclass
class _PrefillGroup:
    """Prefill chunks of one length and start position, consecutive in the step's tokens."""

    offset: int  # index of the group's first token in the step
    rows: int  # G
    length: int  # n tokens per row
    start: int  # position of each row's first token
    slots: slice | torch.Tensor  # the rows' slots: a range when contiguous (a view, no gather)
    mask: torch.Tensor  # [n, start + n] bool: causal with the offset `start`


@dataclass
class _NtkGroupRows:
    """The NTK rows of one prefill group."""

    rows: torch.Tensor  # [g] their indices within the group
    slots: torch.Tensor  # [g]
    tokens: torch.Tensor  # [g * n] their token indices in the step


@dataclass
class _NtkPlan:
    """Where a step's NTK rows are: their attention gets their prefix's terms added (ntk.py)."""

    decode_rows: torch.Tensor | None  # [R] indices of NTK rows among the decode rows
    decode_slots: torch.Tensor | None  # [R]
    decode_dense: bool  # every used slot decodes an NTK row, in slot order: read the slot view
    decode_lens: torch.Tensor | None  # [S_used] int32 positions per row, when decode_dense
    groups: list[_NtkGroupRows | None]  # per prefill group


@dataclass
class _Batch:
    """Device-side inputs of one step: N tokens, the Bd decode rows first, then prefill groups."""

    ids: torch.Tensor  # [N]
    pos: torch.Tensor  # [N]
    slot: torch.Tensor  # [N]
    num_decode: int  # Bd
    decode_span: int  # positions attended by the longest decode row
    decode_bias: torch.Tensor | None  # [S_used, 1, 1, span] additive mask: 0 or -inf
    decode_q_slots: torch.Tensor | None  # [Bd] slot of each decode row; None when Bd == S_used
    prefill_groups: list[_PrefillGroup]
    last_idx: torch.Tensor  # [B] token index of each row's last token
    sample_rows: torch.Tensor | None  # [n_sample] the rows (of B) whose logits are returned; None: all
    ntk: _NtkPlan | None = None  # None: no row has an NTK prefix


_GELU_K = 2.0 * math.sqrt(2.0 / math.pi)


def gelu_tanh_(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh-approximate GELU, in place: 0.5x(1 + tanh(u)) == x * sigmoid(2u).

    Same function as `F.gelu(x, approximate="tanh")` (within 5e-7 in fp32), about 3x faster on CPU.
    """
    u = torch.addcmul(x, x * x, x, value=0.044715)  # x + 0.044715 x^3
    return x.mul_(u.mul_(_GELU_K).sigmoid_())


def _activation(name: str):
    """In-place activation of a fresh matmul output."""
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return gelu_tanh_
    if name == "gelu":
        return F.gelu
    return F.relu


class ModelRunner:
    def __init__(self, model: LoadedModel, num_slots: int, max_seq_len: int) -> None:
        spec: ModelSpec = model.spec
        if max_seq_len > spec.n_positions:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's n_positions {spec.n_positions}")
        self.spec = spec
        self.w = model.weights
        self.device, self.dtype = model.device, model.dtype
        self.num_slots, self.max_seq_len = num_slots, max_seq_len
        shape = (spec.n_layer, 2, num_slots, spec.n_head, max_seq_len, spec.head_dim)
        self.kv = torch.zeros(shape, dtype=self.dtype, device=self.device)  # [L, 2, S, H, max_seq, D]
        self.k, self.v = self.kv[:, 0], self.kv[:, 1]  # views: [L, S, H, max_seq, D]
        self._act = _activation(spec.activation)
        self._slot_of: dict[str, int] = {}
        self._row_in: list[str] = []  # request id per used slot, dense
        self._filled: list[int] = []  # positions written per used slot
        self._ntk: list[bool] = []  # per used slot: the row has an NTK prefix
        # NTK prefixes live in their rows' slots too (allocated with the first NTK row):
        self.ntk_z: torch.Tensor | None = None  # [L, S, H, D, D]
        self.ntk_k: torch.Tensor | None = None  # [L, S, H, D]
        self.fused_ntk = ntk_triton.available(self.device)  # one Triton kernel per layer on CUDA

    # ---- slots ---------------------------------------------------------------------------------
    @property
    def num_used(self) -> int:
        return len(self._row_in)

    def open(self, request_id: str, prefix: PrefixState | None) -> int:
        """Take the next free slot for a row and place its prefix there. A prefix that does not fit
        raises before anything is recorded, so a failed open leaves the runner as it was."""
        if request_id in self._slot_of:
            raise RuntimeError(f"request {request_id!r} already holds slot {self._slot_of[request_id]}")
        if self.num_used >= self.num_slots:
            raise RuntimeError(f"all {self.num_slots} KV slots are in use")
        slot = self.num_used
        filled = self._place(slot, prefix)
        self._slot_of[request_id] = slot
        self._row_in.append(request_id)
        self._filled.append(filled)
        self._ntk.append(isinstance(prefix, NtkPrefix))
        return slot

    def _place(self, slot: int, prefix: PrefixState | None) -> int:
        """Copy a prefix into a free slot; returns the positions it fills."""
        if isinstance(prefix, NtkPrefix):
            self._place_ntk(slot, prefix)
            return 0
        if prefix is None:
            return 0
        s = self.spec
        want = (s.n_layer, 2, s.n_head, s.head_dim)
        got = tuple(prefix.shape)
        if len(got) != 5 or got[:3] + got[4:] != want or not 1 <= got[3] <= self.max_seq_len:
            raise ValueError(
                f"prefix K/V must be [{want[0]}, 2, {want[2]}, P, {want[3]}] with 1 <= P <="
                f" {self.max_seq_len}, got {list(got)}"
            )
        self.kv[:, :, slot, :, : got[3]] = prefix  # [L, 2, H, P, D]
        return got[3]

    def free(self, request_id: str, scrub: bool = False) -> None:
        """Release a row's slot; the last used slot moves into the hole so slots stay dense. An id
        without a slot (its open failed) is ignored.

        `scrub`: the row's numbers went bad, so zero what it leaves behind. Decode attention reads each
        slot up to the longest row's length and masks the rest by adding -inf, and NaN + -inf is NaN:
        stale non-finite K/V would reach whichever row takes the slot next.
        """
        slot = self._slot_of.pop(request_id, None)
        if slot is None:
            return
        stale, last = self._filled[slot], self.num_used - 1
        n = 0
        if slot != last:
            n = self._filled[last]
            self.kv[:, :, slot, :, :n] = self.kv[:, :, last, :, :n]  # [L, 2, H, n, D]
            moved = self._row_in[last]
            self._row_in[slot], self._filled[slot], self._ntk[slot] = moved, n, self._ntk[last]
            if self._ntk[slot]:
                self.ntk_z[:, slot], self.ntk_k[:, slot] = self.ntk_z[:, last], self.ntk_k[:, last]
            self._slot_of[moved] = slot
        if scrub and stale > n:
            self.kv[:, :, slot, :, n:stale] = 0  # [L, 2, H, stale - n, D]
        self._row_in.pop()
        self._filled.pop()
        self._ntk.pop()

    def _place_ntk(self, slot: int, prefix: NtkPrefix) -> None:
        if self.ntk_z is None:
            s = self.spec
            z_shape = (s.n_layer, self.num_slots, s.n_head, s.head_dim, s.head_dim)
            with torch.inference_mode(False):  # like the KV slots: updated in place outside steps too
                self.ntk_z = torch.zeros(z_shape, dtype=self.dtype, device=self.device)  # [L, S, H, D, D]
                self.ntk_k = torch.zeros(z_shape[:-1], dtype=self.dtype, device=self.device)  # [L, S, H, D]
        self.ntk_z[:, slot], self.ntk_k[:, slot] = prefix.z, prefix.k

    def reset(self) -> None:
        """Forget every row (after an error that left the step half done), zeroing what they wrote."""
        for slot, filled in enumerate(self._filled):
            self.kv[:, :, slot, :, :filled] = 0  # [L, 2, H, filled, D]
        self._slot_of.clear()
        self._row_in.clear()
        self._filled.clear()
        self._ntk.clear()

    # ---- one step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, rows: list[RowInput], inputs_embeds: torch.Tensor | None = None) -> StepOutput:
        """Run one forward pass: the sampling rows' logits, and which rows stayed finite.

        `inputs_embeds [N, C]` replaces the token embeddings (a soft prompt being compiled).
        """
        for row in rows:
            if row.open_slot:
                self.open(row.request_id, row.prefix)
        batch, order = self._prepare(rows)
        tok = self.w.wte[batch.ids] if inputs_embeds is None else inputs_embeds.to(self.device, self.dtype)
        x = tok + self.w.wpe[batch.pos]  # [N, C]
        for layer, lw in enumerate(self.w.layers):
            x = self._block(layer, lw, x, batch)
        h = x[batch.last_idx]  # [B, C]
        h = F.layer_norm(h, (self.spec.n_embd,), self.w.lnf_w, self.w.lnf_b, self.spec.layer_norm_eps)
        hs = h if batch.sample_rows is None else h[batch.sample_rows]  # [n_sample, C]
        logits = hs @ self.w.lm_head  # [n_sample, V]
        return StepOutput(
            sample_ids=[r.request_id for r in order if r.sample],
            logits=logits,
            row_ids=[r.request_id for r in order],
            finite=_finite_rows(h, logits, batch.sample_rows),
        )

    def _prepare(self, rows: list[RowInput]) -> tuple[_Batch, list[RowInput]]:
        slot_of = self._slot_of
        decode = sorted((r for r in rows if len(r.tokens) == 1), key=lambda r: slot_of[r.request_id])
        prefill = sorted(
            (r for r in rows if len(r.tokens) > 1),
            key=lambda r: (len(r.tokens), r.position, slot_of[r.request_id]),
        )
        ids: list[int] = []
        pos: list[int] = []
        slot: list[int] = []
        last_idx: list[int] = []
        sample_rows: list[int] = []
        starts: list[int] = []  # each row's first token index in the step
        for i, r in enumerate(decode + prefill):
            s, n = slot_of[r.request_id], len(r.tokens)
            starts.append(len(ids))
            if r.position + n > self.max_seq_len:
                raise RuntimeError(f"row {r.request_id!r} would write past slot capacity {self.max_seq_len}")
            ids += r.tokens
            pos += range(r.position, r.position + n)
            slot += [s] * n
            last_idx.append(len(ids) - 1)
            if r.sample:
                sample_rows.append(i)
            self._filled[s] = r.position + n
        dev = self.device
        lens = [r.position + 1 for r in decode]
        span = max(lens, default=0)
        groups = self._prefill_groups(prefill, len(decode))
        return _Batch(
            ids=torch.tensor(ids, device=dev),
            pos=torch.tensor(pos, device=dev),
            slot=torch.tensor(slot, device=dev),
            num_decode=len(decode),
            decode_span=span,
            decode_bias=self._decode_bias(slot[: len(decode)], lens, span) if decode else None,
            decode_q_slots=None
            if len(decode) == self.num_used
            else torch.tensor(slot[: len(decode)], device=dev),
            prefill_groups=groups,
            last_idx=torch.tensor(last_idx, device=dev, dtype=torch.long),
            sample_rows=None
            if len(sample_rows) == len(last_idx)
            else torch.tensor(sample_rows, device=dev, dtype=torch.long),
            ntk=self._ntk_plan(decode, groups, prefill, starts),
        ), decode + prefill

    def _ntk_plan(
        self, decode: list[RowInput], groups: list[_PrefillGroup], prefill: list[RowInput], starts: list[int]
    ) -> _NtkPlan | None:
        if not any(self._ntk):  # the common case: no NTK row anywhere, nothing to plan
            return None
        ntk_of = [self._ntk[self._slot_of[r.request_id]] for r in decode + prefill]
        if not any(ntk_of):
            return None
        dev = self.device
        nd = len(decode)
        rows = [i for i in range(nd) if ntk_of[i]]
        slots = [self._slot_of[decode[i].request_id] for i in rows]
        plan_groups: list[_NtkGroupRows | None] = []
        first = nd  # index of the group's first row in decode + prefill
        for g in groups:
            mine = [i for i in range(g.rows) if ntk_of[first + i]]
            if mine:
                tokens = [g.offset + i * g.length + j for i in mine for j in range(g.length)]
                plan_groups.append(
                    _NtkGroupRows(
                        torch.tensor(mine, device=dev),
                        torch.tensor(
                            [self._slot_of[prefill[first - nd + i].request_id] for i in mine], device=dev
                        ),
                        torch.tensor(tokens, device=dev),
                    )
                )
            else:
                plan_groups.append(None)
            first += g.rows
        dense = len(rows) == nd == self.num_used
        lens = [r.position + 1 for r in decode]
        return _NtkPlan(
            decode_rows=torch.tensor(rows, device=dev) if rows else None,
            decode_dense=dense,
            decode_lens=torch.tensor(lens, device=dev, dtype=torch.int32) if dense else None,
            decode_slots=torch.tensor(slots, device=dev) if rows else None,
            groups=plan_groups,
        )

    def _decode_bias(self, slots: list[int], lens: list[int], span: int) -> torch.Tensor:
        """Additive length mask over the used slots, built once per step. -> `[S_used, 1, 1, span]`."""
        used = self.num_used
        per_slot = [1] * used  # slots not decoding this step attend to position 0; their output is dropped
        for s, n in zip(slots, lens, strict=True):
            per_slot[s] = n
        n = torch.tensor(per_slot, device=self.device)  # [S_used]
        keep = torch.arange(span, device=self.device) < n[:, None]  # [S_used, span]
        bias = torch.zeros(used, span, device=self.device, dtype=self.dtype).masked_fill_(
            ~keep, float("-inf")
        )
        return bias[:, None, None, :]

    def _prefill_groups(self, prefill: list[RowInput], offset: int) -> list[_PrefillGroup]:
        groups: list[_PrefillGroup] = []
        for (n, start), members in itertools.groupby(prefill, key=lambda r: (len(r.tokens), r.position)):
            slots = [self._slot_of[r.request_id] for r in members]
            contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
            where = (
                slice(slots[0], slots[0] + len(slots))
                if contiguous
                else torch.tensor(slots, device=self.device)
            )
            qpos = torch.arange(start, start + n, device=self.device)  # [n]
            mask = torch.arange(start + n, device=self.device) <= qpos[:, None]  # [n, start + n]
            groups.append(_PrefillGroup(offset, len(slots), n, start, where, mask))
            offset += n * len(slots)
        return groups

    def _block(self, layer: int, lw: LayerWeights, x: torch.Tensor, b: _Batch) -> torch.Tensor:
        spec = self.spec
        n, c = x.shape
        h = F.layer_norm(x, (c,), lw.ln1_w, lw.ln1_b, spec.layer_norm_eps)
        qkv = torch.addmm(lw.attn_b, h, lw.attn_w).view(n, 3, spec.n_head, spec.head_dim)  # [N, 3, H, D]
        # K and V written in place with one indexed assignment: [N, 2, H, D] into [2, S, H, max_seq, D]
        self.kv[layer][:, b.slot, :, b.pos] = qkv[:, 1:]
        attn = self._attention(layer, qkv[:, 0], b).reshape(n, c)  # [N, C]
        x = torch.addmm(x.add_(lw.proj_b), attn, lw.proj_w)  # residual folded into the matmul: [N, C]
        h = F.layer_norm(x, (c,), lw.ln2_w, lw.ln2_b, spec.layer_norm_eps)
        h = self._act(torch.addmm(lw.fc_b, h, lw.fc_w))  # [N, 4C]
        return torch.addmm(x.add_(lw.out_b), h, lw.out_w)  # [N, C]

    def _attention(self, layer: int, q: torch.Tensor, b: _Batch) -> torch.Tensor:
        """Each row attends to its own slot: prefix K/V then its tokens. q `[N, H, D]` -> `[N, H, D]`.

        This is the one place attention is computed, so other prefix kinds add their term here.
        """
        scale = self.spec.attn_scale(layer)
        if b.ntk is not None and b.ntk.decode_dense:  # every row decodes with an NTK prefix
            if self.fused_ntk:
                used, span = self.num_used, b.decode_span
                k, v = self.k[layer, :used, :, :span], self.v[layer, :used, :, :span]  # [S, H, span, D]
                z, kv = self.ntk_z[layer, :used], self.ntk_k[layer, :used]  # [S, H, D, D], [S, H, D]
                return ntk_triton.ntk_decode(q, k, v, b.ntk.decode_lens, z, kv, scale)
            out, lse = self._decode_attention_lse(layer, q, b, scale)
            return self._ntk_attention(layer, q, out, b, scale, lse)
        if not b.prefill_groups:
            out = self._decode_attention(layer, q, b, scale)
        else:
            out = torch.empty_like(q)  # [N, H, D]
            if b.num_decode:
                out[: b.num_decode] = self._decode_attention(layer, q[: b.num_decode], b, scale)
            for g in b.prefill_groups:
                end = g.offset + g.rows * g.length
                out[g.offset : end] = self._prefill_attention(layer, q[g.offset : end], g, scale)
        if b.ntk is not None:
            out = self._ntk_attention(layer, q, out, b, scale)
        return out

    def _decode_attention_lse(
        self, layer: int, q: torch.Tensor, b: _Batch, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode attention over the dense slot view that also returns the log-sum-exp of the scores
        (one pass over K and V, as SDPA's). q `[S_used, H, D]` -> `[S_used, H, D]`, `[S_used, H]`."""
        used, span = self.num_used, b.decode_span
        k = self.k[layer, :used, :, :span]  # [S_used, H, span, D]
        v = self.v[layer, :used, :, :span]  # [S_used, H, span, D]
        # q scaled first: the product is the logit itself, which the prefix bound keeps within fp16
        s = (
            torch.matmul((q * scale).unsqueeze(2), k.transpose(-1, -2)).float() + b.decode_bias
        )  # [S, H, 1, span]
        lse = torch.logsumexp(s, -1, keepdim=True)  # [S_used, H, 1, 1]
        o = torch.matmul(torch.exp(s - lse).to(v.dtype), v)  # [S_used, H, 1, D]
        return o.squeeze(2), lse.view(used, -1)

    def _ntk_attention(
        self,
        layer: int,
        q: torch.Tensor,
        out: torch.Tensor,
        b: _Batch,
        scale: float,
        lse: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Add each NTK row's prefix terms (its slot's Z and k) to its tokens' attention over their own
        keys. q, out `[N, H, D]` -> `[N, H, D]`; lse `[N, H]` of `out`'s scores when decode_dense.

        Rows without an NTK prefix are left exactly as computed above.
        """
        plan, z, kv = b.ntk, self.ntk_z[layer], self.ntk_k[layer]  # z [S, H, D, D], kv [S, H, D]
        if plan.decode_dense:  # every used slot, in slot order: views, no gathers
            used = self.num_used
            return ntk_combine(out, lse, q, z[:used], kv[:used])
        if plan.decode_rows is not None:
            rows, slots = plan.decode_rows, plan.decode_slots  # [R]
            qd = q[rows]  # [R, H, D]
            k = self.k[layer][slots, :, : b.decode_span]  # [R, H, span, D]
            s = torch.matmul((qd * scale).unsqueeze(2), k.transpose(-1, -2)).squeeze(2)  # [R, H, span]
            lse_d = torch.logsumexp(s.float() + b.decode_bias[slots, 0], -1)  # [R, H]
            out[rows] = ntk_combine(out[rows], lse_d, qd, z[slots], kv[slots])
        for g, mine in zip(b.prefill_groups, plan.groups, strict=True):
            if mine is None:
                continue
            qs = q[g.offset : g.offset + g.rows * g.length].view(g.rows, g.length, *q.shape[1:])[mine.rows]
            k = self.k[layer][mine.slots, :, : g.start + g.length]  # [g, H, end, D]
            s = torch.einsum("gnhd,ghed->gnhe", qs * scale, k).float()  # [g, n, H, end]
            lse_g = torch.logsumexp(s.masked_fill(~g.mask[None, :, None, :], float("-inf")), -1)  # [g, n, H]
            o = out[mine.tokens].view(qs.shape)  # [g, n, H, D]
            zs, ks = z[mine.slots].unsqueeze(1), kv[mine.slots].unsqueeze(1)  # [g, 1, H, D, D], [g, 1, H, D]
            out[mine.tokens] = ntk_combine(o, lse_g, qs, zs, ks).flatten(0, 1)
        return out

    def _decode_attention(self, layer: int, q: torch.Tensor, b: _Batch, scale: float) -> torch.Tensor:
        """One query per decode row against the dense slot view. q `[Bd, H, D]` -> `[Bd, H, D]`.

        SDPA reads the strided slot view in place (bmm would copy it in bf16) with the step's
        additive length mask.
        """
        used, span = self.num_used, b.decode_span
        if b.decode_q_slots is not None:  # some used slots are prefilling: give them a dummy query
            qs = q.new_zeros(used, *q.shape[1:])  # [S_used, H, D]
            qs[b.decode_q_slots] = q
            q = qs
        k = self.k[layer, :used, :, :span]  # [S_used, H, span, D]
        v = self.v[layer, :used, :, :span]  # [S_used, H, span, D]
        o = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=b.decode_bias, scale=scale)
        o = o.squeeze(2)  # [S_used, H, D]
        return o if b.decode_q_slots is None else o[b.decode_q_slots]

    def _prefill_attention(self, layer: int, q: torch.Tensor, g: _PrefillGroup, scale: float) -> torch.Tensor:
        """A group of G chunks, causal over each row's slot. q `[G*n, H, D]` -> `[G*n, H, D]`."""
        end = g.start + g.length
        qs = q.view(g.rows, g.length, *q.shape[1:]).transpose(1, 2)  # [G, H, n, D]
        ks = self.k[layer][g.slots, :, :end]  # [G, H, end, D]
        vs = self.v[layer][g.slots, :, :end]  # [G, H, end, D]
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=g.mask, scale=scale)  # [G, H, n, D]
        return o.transpose(1, 2).reshape(-1, *q.shape[1:])


def _finite_rows(h: torch.Tensor, logits: torch.Tensor, sample_rows: torch.Tensor | None) -> torch.Tensor:
    """Which rows stayed finite: h `[B, C]` (each row's normalised last hidden state), logits
    `[n_sample, V]` of the rows `sample_rows` (None: all) -> `[B]` bool. NaN or Inf anywhere in a
    row's slot reaches its last token through attention and layer norm, so this sees every bad row,
    sampling or not. A float32 sum is one pass and non-finite exactly when a term is (short of
    overflowing float32, which no sane row does), cheaper than `isfinite().all()`."""
    ok = h.sum(-1, dtype=torch.float32).isfinite()  # [B]
    if logits.shape[0]:
        sampled = logits.sum(-1, dtype=torch.float32).isfinite()  # [n_sample]
        ok = ok & sampled if sample_rows is None else ok.index_put((sample_rows,), sampled & ok[sample_rows])
    return ok


def compile_prefix(
    model: LoadedModel, token_ids: list[int] | None = None, embeds: torch.Tensor | None = None
) -> torch.Tensor:
    """Run a text (token ids) or a soft prompt (`embeds [P, C]`) through the frozen model at
    positions 0..P-1 and return its per-layer K/V `[n_layer, 2, n_head, P, head_dim]`: the prefix
    that makes later tokens see exactly what they would see after that text or soft prompt."""
    n = len(token_ids) if token_ids is not None else embeds.shape[0]  # type: ignore[union-attr]
    runner = ModelRunner(model, num_slots=1, max_seq_len=n)
    ids = token_ids if token_ids is not None else [0] * n  # ids unused when embeds are given
    row = RowInput("compile", ids, 0, open_slot=True, sample=False)
    runner.execute([row], inputs_embeds=embeds)
    return runner.kv[:, :, 0, :, :n].clone()  # [L, 2, H, P, D]
