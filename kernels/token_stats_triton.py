"""Triton backend of :func:`diffexit.kernels.token_stats`: one read of the logits, fp32 state, no softmax.

Each program owns ``BLOCK_R`` rows and sweeps the vocabulary in tiles of ``BLOCK_V`` columns. Every lane (one
column slot of the tile, so the entries ``v = lane (mod BLOCK_V)``) keeps its own running state, updated with
elementwise operations only:

- ``m1``, ``i1``: the largest value seen and its index (strict ``>``, so the earliest index wins a tie);
- ``m2``: the second largest value, with multiplicity;
- ``s = sum exp(d)`` and ``a = sum exp(d) * d`` with ``d = (x - m1) / T``, rescaled whenever ``m1`` grows:
  a new maximum multiplies the old terms by ``e = exp((m1_old - x) / T)`` and shifts their ``d`` by the same
  exponent, so ``a' = e * (a + log(e) * s)`` and ``s' = e * s + 1`` (one ``exp`` per element either way);
- the first index holding a NaN or ``+inf``.

Lanes are merged once, after the sweep: the row maximum and its lowest index, the runner-up (the winning lane's
``m2`` or another lane's ``m1``), and ``S``, ``A`` rescaled to the row maximum. Then ``log S`` is
``logsumexp(z) - max z`` and the entropy is ``log S - A / S``. Merging lanes once instead of reducing every tile
keeps the loop free of cross-warp traffic.

Rows and strides: the leading dims are merged wherever their strides allow, and the kernel addresses row ``r`` as
``(r // n_inner) * stride_outer + (r % n_inner) * stride_inner``, with any vocabulary stride, so a transposed or
sliced 3-D ``[B, L, V]`` view launches once and is never copied. Leading dims that still do not fit two strided
dims (rare: 4-D or more, permuted) are split in Python, one launch per index of the outermost dim, still copy-free.

``TRITON_INTERPRET=1`` is read at each call, not at import: Triton decides between compiling and interpreting
when a kernel is wrapped, so the kernel is wrapped lazily, once per mode. Tests can then switch the interpreter
on for CPU tensors within one process.
"""

from __future__ import annotations

import contextlib
from math import prod

import torch
import triton
import triton.language as tl
from torch import Tensor

from .interpreter import interpreting

# Elements per tile (rows x columns). Each lane holds six 32-bit values of state, so 2048 lanes over 8 warps is
# 8 lanes and 48 registers of state per thread, leaving room for several programs per SM to hide memory latency.
TILE = 2048
# Larger than any vocabulary index; marks "no index yet" in the min-reductions.
NO_INDEX = tl.constexpr(2**31 - 1)


def _token_stats_kernel(
    x_ptr, out_ptr, id_ptr,
    n_rows, n_inner, vocab,
    stride_outer, stride_inner, stride_v, stride_out,
    inv_t,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    row_off = (rows64 // n_inner) * stride_outer + (rows64 % n_inner) * stride_inner
    lanes = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")

    m1 = tl.full((BLOCK_R, BLOCK_V), neg_inf, tl.float32)
    m2 = tl.full((BLOCK_R, BLOCK_V), neg_inf, tl.float32)
    i1 = tl.full((BLOCK_R, BLOCK_V), NO_INDEX, tl.int32)
    s = tl.zeros((BLOCK_R, BLOCK_V), tl.float32)
    a = tl.zeros((BLOCK_R, BLOCK_V), tl.float32)
    bad = tl.full((BLOCK_R, BLOCK_V), NO_INDEX, tl.int32)

    for v0 in range(0, vocab, BLOCK_V):
        cols = v0 + lanes
        mask = row_ok[:, None] & (cols < vocab)[None, :]
        ptrs = x_ptr + row_off[:, None] + cols.to(tl.int64)[None, :] * stride_v
        x = tl.load(ptrs, mask=mask, other=neg_inf).to(tl.float32)
        # Rows holding a NaN or +inf are overwritten at the end, so their state may go NaN meanwhile.
        invalid = (x != x) | (x == float("inf"))
        bad = tl.minimum(bad, tl.where(invalid, cols[None, :], NO_INDEX))

        grows = x > m1
        lo = tl.minimum(x, m1)
        hi = tl.maximum(x, m1)
        # d <= 0 is the smaller value's offset from the larger; -inf when either is -inf (masked, or no state).
        d = tl.where(lo == neg_inf, neg_inf, (lo - hi) * inv_t)
        e = tl.exp(d)
        ed = tl.where(e > 0, e * d, 0.0)
        a = tl.where(grows, e * a + ed * s, a + ed)
        s = tl.where(grows, e * s + 1.0, s + e)
        m2 = tl.where(grows, m1, tl.maximum(m2, x))
        i1 = tl.where(grows, cols[None, :], i1)
        m1 = tl.where(grows, x, m1)

    top1 = tl.max(m1, axis=1)
    top1_idx = tl.min(tl.where(m1 == top1[:, None], i1, NO_INDEX), axis=1)
    winner = i1 == top1_idx[:, None]
    top2 = tl.maximum(tl.max(m2, axis=1), tl.max(tl.where(winner, neg_inf, m1), axis=1))
    shift = (m1 - top1[:, None]) * inv_t
    scale = tl.where(m1 == neg_inf, 0.0, tl.exp(shift))
    s_row = tl.sum(scale * s, axis=1)
    a_row = tl.sum(tl.where(scale > 0, scale * (a + shift * s), 0.0), axis=1)
    first_bad = tl.min(bad, axis=1)

    is_bad = first_bad < NO_INDEX
    has_dist = (first_bad == NO_INDEX) & (top1 > neg_inf)
    nan = float("nan")
    top1_prob = 1.0 / s_row
    top2_prob = tl.exp((top2 - top1) * inv_t) / s_row
    ids = tl.where(is_bad, first_bad, tl.where(top1 > neg_inf, top1_idx, 0))
    tl.store(id_ptr + rows, ids.to(tl.int64), mask=row_ok)
    tl.store(out_ptr + rows, tl.where(is_bad, nan, top1), mask=row_ok)
    tl.store(out_ptr + stride_out + rows, tl.where(is_bad, nan, top2), mask=row_ok)
    tl.store(out_ptr + 2 * stride_out + rows, tl.where(has_dist, top1 - top2, nan), mask=row_ok)
    tl.store(out_ptr + 3 * stride_out + rows, tl.where(has_dist, top1_prob, nan), mask=row_ok)
    tl.store(out_ptr + 4 * stride_out + rows, tl.where(has_dist, top2_prob, nan), mask=row_ok)
    tl.store(out_ptr + 5 * stride_out + rows, tl.where(has_dist, top1_prob - top2_prob, nan), mask=row_ok)
    tl.store(out_ptr + 6 * stride_out + rows, tl.where(has_dist, tl.log(s_row) - a_row / s_row, nan), mask=row_ok)


_WRAPPED = {}


def _kernel():
    mode = interpreting()
    if mode not in _WRAPPED:
        if mode:
            from triton.runtime.interpreter import InterpretedFunction

            _WRAPPED[mode] = InterpretedFunction(_token_stats_kernel)
        else:
            _WRAPPED[mode] = triton.runtime.jit.JITFunction(_token_stats_kernel)
    return _WRAPPED[mode]


def token_stats_triton(logits: Tensor, temperature: float) -> tuple[Tensor, ...]:
    """Same contract as :func:`diffexit.kernels.token_stats_torch.token_stats_torch`, one kernel launch per
    row grid (see the module docstring)."""
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    n_rows = prod(lead)
    top1_id = torch.empty(n_rows, dtype=torch.int64, device=logits.device)
    floats = torch.empty(7, n_rows, dtype=torch.float32, device=logits.device)
    block_v = min(TILE, triton.next_power_of_2(vocab))
    start = 0
    # Launch on the logits' GPU, not on whichever one is current.
    with torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext():
        for view, n_inner, stride_outer, stride_inner in _row_grids(logits) if n_rows else ():
            rows = view.numel() // vocab
            block_r = min(TILE // block_v, triton.next_power_of_2(rows))
            _kernel()[(triton.cdiv(rows, block_r),)](
                view, floats[:, start:], top1_id[start:],
                rows, n_inner, vocab,
                stride_outer, stride_inner, view.stride(-1), floats.stride(0),
                1.0 / temperature,
                BLOCK_R=block_r, BLOCK_V=block_v, num_warps=8 if block_r * block_v >= TILE else 4,
            )
            start += rows
    return (top1_id.view(lead), *(f.view(lead) for f in floats))


def _row_grids(logits: Tensor):
    """Yield ``(view, n_inner, stride_outer, stride_inner)``: views whose rows, addressed as in the kernel,
    cover every row of ``logits`` in row-major order."""
    dims = []
    for size, stride in zip(logits.shape[:-1], logits.stride()[:-1], strict=True):
        if size == 1:
            continue
        if dims and dims[-1][1] == size * stride:
            dims[-1] = (dims[-1][0] * size, stride)
        else:
            dims.append((size, stride))
    if len(dims) <= 2:
        (_, stride_outer), (n_inner, stride_inner) = [(1, 0)] * (2 - len(dims)) + dims
        yield logits, n_inner, stride_outer, stride_inner
    else:
        for sub in logits.unbind(0):
            yield from _row_grids(sub)
