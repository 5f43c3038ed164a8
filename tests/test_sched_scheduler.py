"""SchEDScheduler as a drop-in for diffusers' BlockRefinementScheduler inside a real LLaDA2Pipeline."""

import pytest
import torch
from diffusers import BlockRefinementScheduler, LLaDA2Pipeline

from diffexit.samplers import SchEDScheduler

VOCAB, MASK = 40, 39


@pytest.fixture
def model(tiny_llama):
    return tiny_llama


def run(model, scheduler, prompt, **kw):
    """Returns the pipeline's sequences and its number of forward passes (NFE)."""
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    pipe = LLaDA2Pipeline(model=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(input_ids=prompt, gen_length=16, block_length=8, num_inference_steps=8, mask_token_id=MASK,
               eos_early_stop=False, threshold=1.1, editing_threshold=None, **kw)
    # threshold > 1 and no editing: the stock top-k schedule alone
    handle.remove()
    return out.sequences, len(calls)


def test_never_firing_sched_equals_stock_scheduler(model):
    prompt = torch.randint(0, MASK, (2, 8), generator=torch.Generator().manual_seed(0))
    stock = BlockRefinementScheduler(block_length=8, num_inference_steps=8)
    seq_stock, calls_stock = run(model, stock, prompt)
    sched = SchEDScheduler.from_config(stock.config, schedule="constant", high=1e9, low=1e9)
    seq_sched, calls_sched = run(model, sched, prompt)
    assert torch.equal(seq_stock, seq_sched)
    assert calls_stock == calls_sched == 2 * 8
    assert all((h == -1).all() for h in sched.halt_steps)


def test_sched_halts_each_block_and_saves_forward_passes(model):
    prompt = torch.randint(0, MASK, (2, 8), generator=torch.Generator().manual_seed(0))
    stock = BlockRefinementScheduler(block_length=8, num_inference_steps=8)
    seq_stock, calls_stock = run(model, stock, prompt)
    sched = SchEDScheduler.from_config(stock.config, schedule="constant", high=0.0, low=0.0)
    seq_sched, calls_sched = run(model, sched, prompt)
    # Halting at the first step of each block: one forward pass per block, no extra pass to find it done.
    assert calls_sched == 2
    assert [h.tolist() for h in sched.halt_steps] == [[0, 0], [0, 0]]
    assert (seq_sched != MASK).all()
    # Fill-on-halt is the argmax of the halting step: the first block's tokens equal the model's argmax there.
    x = torch.full((2, 16), MASK)
    x[:, :8] = prompt
    first = model(x, position_ids=torch.arange(16)[None].expand(2, -1)).logits[:, 8:16].argmax(-1)
    assert torch.equal(seq_sched[:, :8], first)
    assert calls_sched < calls_stock


def test_config_round_trip(tmp_path):
    sched = SchEDScheduler(block_length=16, schedule="exp", high=6.0, low=1.0, k=8.0, stat="min", patience=2)
    sched.save_pretrained(tmp_path)
    loaded = SchEDScheduler.from_pretrained(tmp_path)
    drop = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}
    assert drop(loaded.config) == drop(sched.config)
    assert loaded.halting.schedule(0.5) == pytest.approx(sched.halting.schedule(0.5))
    assert loaded.halting.stat == "min" and loaded.halting.patience == 2


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="swap them"):
        SchEDScheduler(schedule="cosine", high=1.0, low=2.0)
    with pytest.raises(ValueError, match="stat"):
        SchEDScheduler(stat="max")
