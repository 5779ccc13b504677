"""The model runner: one frozen GPT-2, one batched forward pass per step, rows with different prefixes.

KV slots are allocated once: `k, v [n_layer, n_slots, n_head, max_seq_len, head_dim]`. A row owns one
slot; its prefix K/V sit at positions `0 .. P-1` and its tokens at `P .. P+T-1` (DESIGN.md
invariant 2), so slot position = absolute position and each row attends to its own prefix plus its
own tokens. Slots in use are kept dense (`0 .. n_used-1`): when a row leaves, the last row moves into
its slot, so decode attention runs over one contiguous view of the cache.

A step is flat over tokens: every linear layer runs once on `[N, C]` (decode tokens and prefill
chunks together, no padding); attention is the one place that looks at rows: decode rows in one
`scaled_dot_product_attention` over the slot view with a per-row length mask, each prefill chunk
against its own slot with a causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model import LayerWeights, LoadedModel, ModelSpec


@dataclass(frozen=True)
class RowInput:
    """One row of a step: `tokens` computed at slot positions `position .. position+len-1`."""

    request_id: str
    tokens: list[int]
    position: int
    prefix: torch.Tensor | None = None  # [n_layer, 2, n_head, P, head_dim], given with the first chunk
    open_slot: bool = False  # the row's first chunk: take a fresh slot (and place its prefix)
    sample: bool = True  # return logits for the row's last token


@dataclass
class _Batch:
    """Device-side index tensors for one step (N tokens; Bd decode rows first, then prefill chunks)."""

    ids: torch.Tensor  # [N]
    pos: torch.Tensor  # [N]
    slot: torch.Tensor  # [N]
    num_decode: int
    decode_slots: torch.Tensor | None  # [Bd] slot of each decode row (ascending)
    decode_lens: torch.Tensor | None  # [n_used] attended length per slot (1 for non-decode slots)
    decode_span: int  # max of decode_lens, known on the host (no device sync)
    decode_dense: bool  # decode rows are exactly slots 0..n_used-1
    prefills: list[tuple[int, int, int, int]]  # (token offset, length, slot, first position)
    sample_idx: torch.Tensor  # [n_sample] token index whose logits are returned


def _activation(name: str):
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
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
        shape = (spec.n_layer, num_slots, spec.n_head, max_seq_len, spec.head_dim)
        self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)  # [L, S, H, max_seq, D]
        self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)  # [L, S, H, max_seq, D]
        self._act = _activation(spec.activation)
        self._slot_of: dict[str, int] = {}
        self._row_in: list[str] = []  # request id per used slot, dense
        self._filled: list[int] = []  # positions written per used slot

    # ---- slots ---------------------------------------------------------------------------------
    @property
    def num_used(self) -> int:
        return len(self._row_in)

    def cache_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def _open(self, row: RowInput) -> int:
        if row.request_id in self._slot_of:
            raise RuntimeError(
                f"request {row.request_id!r} already holds slot {self._slot_of[row.request_id]}"
            )
        if self.num_used >= self.num_slots:
            raise RuntimeError(f"all {self.num_slots} KV slots are in use")
        slot = self.num_used
        self._slot_of[row.request_id] = slot
        self._row_in.append(row.request_id)
        self._filled.append(0)
        if row.prefix is not None:
            p = row.prefix.shape[3]
            self.k[:, slot, :, :p] = row.prefix[:, 0]  # [L, H, P, D]
            self.v[:, slot, :, :p] = row.prefix[:, 1]  # [L, H, P, D]
            self._filled[slot] = p
        return slot

    def free(self, request_id: str) -> None:
        """Release a row's slot; the last used slot moves into the hole so slots stay dense."""
        slot = self._slot_of.pop(request_id)
        last = self.num_used - 1
        if slot != last:
            n = self._filled[last]
            self.k[:, slot, :, :n] = self.k[:, last, :, :n]  # [L, H, n, D]
            self.v[:, slot, :, :n] = self.v[:, last, :, :n]
            moved = self._row_in[last]
            self._row_in[slot], self._filled[slot] = moved, n
            self._slot_of[moved] = slot
        self._row_in.pop()
        self._filled.pop()

    def reset(self) -> None:
        """Forget every row (after an error that left the step half done)."""
        self._slot_of.clear()
        self._row_in.clear()
        self._filled.clear()

    # ---- one step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, rows: list[RowInput]) -> tuple[list[str], torch.Tensor]:
        """Run one forward pass. Returns the sampling rows' ids and their logits `[n_sample, V]`."""
        for row in rows:
            if row.open_slot:
                self._open(row)
        batch, order = self._prepare(rows)
        x = self.w.wte[batch.ids] + self.w.wpe[batch.pos]  # [N, C]
        for layer, lw in enumerate(self.w.layers):
            x = self._block(layer, lw, x, batch)
        h = x[batch.sample_idx]  # [n_sample, C]
        h = F.layer_norm(h, (self.spec.n_embd,), self.w.lnf_w, self.w.lnf_b, self.spec.layer_norm_eps)
        logits = h @ self.w.lm_head  # [n_sample, V]
        return [r.request_id for r in order if r.sample], logits

    def _prepare(self, rows: list[RowInput]) -> tuple[_Batch, list[RowInput]]:
        decode = sorted((r for r in rows if len(r.tokens) == 1), key=lambda r: self._slot_of[r.request_id])
        prefill = [r for r in rows if len(r.tokens) > 1]
        ids: list[int] = []
        pos: list[int] = []
        slot: list[int] = []
        sample_idx: list[int] = []
        prefills: list[tuple[int, int, int, int]] = []
        for r in decode + prefill:
            s, n = self._slot_of[r.request_id], len(r.tokens)
            if r.position + n > self.max_seq_len:
                raise RuntimeError(f"row {r.request_id!r} would write past slot capacity {self.max_seq_len}")
            if n > 1:
                prefills.append((len(ids), n, s, r.position))
            ids += r.tokens
            pos += range(r.position, r.position + n)
            slot += [s] * n
            if r.sample:
                sample_idx.append(len(ids) - 1)
            self._filled[s] = r.position + n
        dev = self.device
        num_decode = len(decode)
        decode_slots = decode_lens = None
        dense, span = False, 0
        if num_decode:
            lens = [1] * self.num_used  # non-decode slots attend to position 0 only; their output is dropped
            for r in decode:
                lens[self._slot_of[r.request_id]] = r.position + 1
            dense, span = num_decode == self.num_used, max(lens)
            decode_slots = torch.tensor(slot[:num_decode], device=dev)
            decode_lens = torch.tensor(lens, device=dev)
        batch = _Batch(
            ids=torch.tensor(ids, device=dev),
            pos=torch.tensor(pos, device=dev),
            slot=torch.tensor(slot, device=dev),
            num_decode=num_decode,
            decode_slots=decode_slots,
            decode_lens=decode_lens,
            decode_span=span,
            decode_dense=dense,
            prefills=prefills,
            sample_idx=torch.tensor(sample_idx, device=dev, dtype=torch.long),
        )
        return batch, decode + prefill

    def _block(self, layer: int, lw: LayerWeights, x: torch.Tensor, b: _Batch) -> torch.Tensor:
        spec = self.spec
        n, c = x.shape
        h = F.layer_norm(x, (c,), lw.ln1_w, lw.ln1_b, spec.layer_norm_eps)
        qkv = torch.addmm(lw.attn_b, h, lw.attn_w).view(n, 3, spec.n_head, spec.head_dim)  # [N, 3, H, D]
        q, k, v = qkv.unbind(1)  # each [N, H, D]
        self.k[layer][b.slot, :, b.pos] = k  # K/V written in place: [N, H, D] into [S, H, max_seq, D]
        self.v[layer][b.slot, :, b.pos] = v
        attn = self._attention(layer, q, b).reshape(n, c)  # [N, C]
        x = x + torch.addmm(lw.proj_b, attn, lw.proj_w)  # [N, C]
        h = F.layer_norm(x, (c,), lw.ln2_w, lw.ln2_b, spec.layer_norm_eps)
        h = self._act(torch.addmm(lw.fc_b, h, lw.fc_w))  # [N, 4C]
        return x + torch.addmm(lw.out_b, h, lw.out_w)  # [N, C]

    def _attention(self, layer: int, q: torch.Tensor, b: _Batch) -> torch.Tensor:
        """Each row attends to its own slot: prefix K/V then its tokens. q `[N, H, D]` -> `[N, H, D]`.

        This is the one place attention is computed, so other prefix kinds add their term here.
        """
        out = torch.empty_like(q)  # [N, H, D]
        scale = self.spec.attn_scale(layer)
        if b.num_decode:
            out[: b.num_decode] = self._decode_attention(layer, q[: b.num_decode], b, scale)
        for off, n, slot, start in b.prefills:
            end = start + n
            qs = q[off : off + n].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            ks = self.k[layer, slot : slot + 1, :, :end]  # [1, H, end, D]
            vs = self.v[layer, slot : slot + 1, :, :end]  # [1, H, end, D]
            qpos = torch.arange(start, end, device=q.device)  # [n]
            mask = torch.arange(end, device=q.device) <= qpos[:, None]  # [n, end] causal with offset
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)  # [1, H, n, D]
            out[off : off + n] = o[0].transpose(0, 1)
        return out

    def _decode_attention(self, layer: int, q: torch.Tensor, b: _Batch, scale: float) -> torch.Tensor:
        """One query per decode row against the dense slot view. q `[Bd, H, D]` -> `[Bd, H, D]`."""
        used = self.num_used
        span = b.decode_span
        if b.decode_dense:
            qs = q.unsqueeze(2)  # [S_used, H, 1, D]
        else:  # some used slots are prefilling this step: give them a dummy query, drop their output
            qs = q.new_zeros(used, q.shape[1], 1, q.shape[2])  # [S_used, H, 1, D]
            qs[b.decode_slots] = q.unsqueeze(2)
        ks = self.k[layer, :used, :, :span]  # [S_used, H, span, D]
        vs = self.v[layer, :used, :, :span]  # [S_used, H, span, D]
        mask = torch.arange(span, device=q.device) < b.decode_lens[:, None]  # [S_used, span]
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask[:, None, None, :], scale=scale)
        o = o.squeeze(2)  # [S_used, H, D]
        return o if b.decode_dense else o[b.decode_slots]
