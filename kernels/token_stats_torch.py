"""Chunked torch backend of :func:`diffexit.kernels.token_stats`: the reference, and the CPU production path.

Rows are processed a chunk at a time. Each chunk is copied once into an fp32 buffer ``[rows, G * B]`` whose
columns form ``G`` blocks of ``B`` (the tail padded with ``-inf``, which changes no statistic). Peak extra memory
is two chunk-sized fp32 buffers, whatever the size of the input; the input is never copied as a whole, whatever
its strides.

Why blocks: on CPU, ``argmax`` and ``topk`` over long rows are over ten times slower than ``amax``, which is
vectorised (1.2 ms and 1.5 ms against 0.09 ms per million fp32 on one core). A block's maximum costs one
``amax`` pass; the argmax (first occurrence) and the runner-up then come from the ``[rows, G]`` block maxima
and the one ``[rows, B]`` block that holds the maximum:

- ``top1_id`` = first block whose maximum is the row maximum, then the first position in it holding that value;
- ``top2_logit`` = max(second largest value of that block, largest maximum among the other blocks).

``torch.topk`` does not order ties by index, so it is only used for values, never for the argmax.
"""

from __future__ import annotations

from math import prod

import torch
from torch import Tensor

# Elements per scratch buffer (32 MiB of fp32). Each large op ends in a barrier of torch's CPU threads, which
# costs milliseconds when other work shares the cores, so fewer, larger chunks are the robust choice: on 2 busy
# cores at V = 126464, 2^23 beat 2^19..2^21 by 1.5-3x with two threads and was within 30% of the best with one.
CHUNK_ELEMENTS = 1 << 23
# Columns per block for the blocked argmax / top-2 (see the module docstring).
BLOCK = 256


def token_stats_torch(logits: Tensor, temperature: float) -> tuple[Tensor, ...]:
    """Statistics of ``logits`` ``[..., V]`` (validated by the caller), in ``TokenStats`` field order.

    Returns ``(top1_id, top1_logit, top2_logit, logit_margin, top1_prob, top2_prob, prob_margin, entropy)``,
    each of shape ``logits.shape[:-1]``: int64 for ``top1_id``, float32 for the rest (entropy in nats).
    """
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    n_rows = prod(lead)
    top1_id = torch.empty(n_rows, dtype=torch.int64, device=logits.device)
    floats = torch.empty(7, n_rows, dtype=torch.float32, device=logits.device)
    block = min(vocab, BLOCK)
    n_blocks = -(-vocab // block)
    chunk_rows = max(1, min(n_rows, CHUNK_ELEMENTS // (n_blocks * block)))
    # Scratch for one chunk: the shifted logits, and their exponentials.
    buf = torch.empty(2, chunk_rows, n_blocks * block, dtype=torch.float32, device=logits.device)
    inv_t = 1.0 / temperature
    start = 0
    with torch.no_grad():
        for chunk in _chunks(logits, chunk_rows) if n_rows else ():
            n = prod(chunk.shape[:-1])
            end = start + n
            _chunk_stats(chunk, buf[0, :n], buf[1, :n], block, inv_t, top1_id[start:end], floats[:, start:end])
            start = end
    return (top1_id.view(lead), *(f.view(lead) for f in floats))


def _chunks(logits: Tensor, chunk_rows: int):
    """Yield views ``[..., V]`` of at most ``chunk_rows`` rows each that together hold every row of ``logits`` in
    row-major order, copying nothing.

    Leading dims that cannot be merged into one strided dim (a span sliced out of ``[B, N, V]`` logits, as every
    decoding step does) are split along the first one, as many indices per chunk as fit: one chunk per index
    would pay the per-op overhead ``B`` times (15 ms instead of 1 ms at ``[32, 16, 100]``).
    """
    try:
        rows = logits.view(-1, logits.shape[-1])
    except RuntimeError:
        inner = prod(logits.shape[1:-1])
        if inner > chunk_rows:
            for sub in logits.unbind(0):
                yield from _chunks(sub, chunk_rows)
        else:
            step = chunk_rows // inner
            for lo in range(0, logits.shape[0], step):
                yield logits[lo:lo + step]
        return
    for lo in range(0, rows.shape[0], chunk_rows):
        yield rows[lo:lo + chunk_rows]


def _chunk_stats(
    chunk: Tensor, x: Tensor, e: Tensor, block: int, inv_t: float, top1_id: Tensor, out: Tensor
) -> None:
    """Fill ``top1_id`` ``[n]`` and ``out`` ``[7, n]`` for ``chunk`` ``[..., V]`` holding ``n`` rows; ``x`` and ``e``
    ``[n, G*B]`` are scratch."""
    vocab = chunk.shape[-1]
    n = x.shape[0]
    # Splitting the scratch's row dim into the chunk's leading dims is always a view, so one copy gathers them all.
    x[:, :vocab].view(chunk.shape).copy_(chunk)
    x[:, vocab:].fill_(float("-inf"))
    blocks = x.view(n, -1, block)
    block_max = blocks.amax(-1)
    # amax propagates NaN, and +inf is the max wherever present, so these two mark every invalid row.
    top1 = block_max.amax(-1)
    # argmax takes the first of equal maxima, so ties (an all -inf row too) go to the lowest index.
    if blocks.shape[1] == 1:
        # One block (a small vocabulary): it is the winner, and there are no others to compare.
        first_block = torch.zeros(n, 1, dtype=torch.long, device=x.device)
        winner = blocks[:, 0]
        other_blocks = torch.full_like(top1, float("-inf"))
    else:
        first_block = block_max.argmax(-1, keepdim=True)
        winner = blocks.gather(1, first_block[:, :, None].expand(n, 1, block)).squeeze(1)
        other_blocks = block_max.scatter(1, first_block, float("-inf")).amax(-1)
    in_block = winner.argmax(-1, keepdim=True)
    ids = (first_block * block + in_block).squeeze(1)
    # The runner-up within the winning block: its max once the winner is masked out (an equal value elsewhere in
    # the block survives, as with topk); several times faster than topk(2) on CPU.
    second_in_block = (winner.scatter(1, in_block, float("-inf")).amax(-1) if block > 1
                       else torch.full_like(top1, float("-inf")))
    top2 = torch.maximum(second_in_block, other_blocks)

    # Softmax statistics relative to the row max: d = (z - max z), e = exp(d), S = sum e, A = sum e * d;
    # then log-sum-exp - max = log S and entropy = log S - A / S. Done in place in the scratch buffer.
    d = x.sub_(top1[:, None])
    if inv_t != 1.0:
        d.mul_(inv_t)
    torch.exp(d, out=e)
    s = e.sum(-1)
    # A masked entry has e * d = 0 * -inf = NaN, where its true term is 0: nansum drops exactly those (rows
    # that can hold any other NaN, invalid or all -inf, are overwritten below).
    a = e.mul_(d).nansum(-1)

    invalid = torch.isnan(top1) | (top1 == float("inf"))
    has_dist = ~invalid & (top1 > float("-inf"))
    nan = torch.tensor(float("nan"), device=x.device)
    top1_prob = 1.0 / s
    top2_prob = torch.exp((top2 - top1) * inv_t) / s
    if invalid.any():
        rows = invalid.nonzero().squeeze(1)
        bad = chunk.reshape(n, vocab)[rows].float()
        ids[rows] = (torch.isnan(bad) | (bad == float("inf"))).byte().argmax(-1)
    top1_id.copy_(ids)
    out[0] = torch.where(invalid, nan, top1)
    out[1] = torch.where(invalid, nan, top2)
    out[2] = torch.where(has_dist, top1 - top2, nan)
    out[3] = torch.where(has_dist, top1_prob, nan)
    out[4] = torch.where(has_dist, top2_prob, nan)
    out[5] = torch.where(has_dist, top1_prob - top2_prob, nan)
    out[6] = torch.where(has_dist, torch.log(s) - a / s, nan)
