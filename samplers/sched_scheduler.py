"""SchED halting for diffusers' ``LLaDA2Pipeline``, as a drop-in ``BlockRefinementScheduler``.

    pipe.scheduler = SchEDScheduler.from_config(pipe.scheduler.config, schedule="cosine", high=7.5, low=2.5)

Within each block the stock scheduler commits tokens by confidence. This one also aggregates the top-1 minus
top-2 logit margin over the block's still-masked positions (per sample); once it reaches a threshold that
falls with the block's progress, every remaining mask of that sample's block is filled with the current
argmax. When no mask is left in the block, the block ends without the extra forward pass the stock loop
would spend discovering that.
"""

from __future__ import annotations

from typing import Optional

import torch
from diffusers import BlockRefinementScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_block_refinement import BlockRefinementSchedulerOutput

from ..common.schedules import ThresholdSchedule
from ..dllm.halting import SchED
from ..dllm.statistics import BLOCK, check_stat
from ..kernels import token_stats


class SchEDScheduler(BlockRefinementScheduler):
    """``BlockRefinementScheduler`` with SchED early halting per block.

    Args (beyond ``BlockRefinementScheduler``'s):
        schedule: threshold kind, ``constant | linear | cosine | exp | step``.
        high, low: the threshold at block progress 0 and 1, in logits of margin.
        k: decay rate, used by ``exp`` only.
        stat: ``mean | median | quantile | min`` over the block's masked positions (the ``block`` surface of
            :data:`diffexit.dllm.statistics.STATISTICS`).
        q: the quantile for ``stat="quantile"``.
        min_progress: never halt a block before this progress.
        patience, max_change_ratio: SchED's stability gate (see :class:`diffexit.dllm.SchED`).
    """

    @register_to_config
    def __init__(
        self,
        block_length: int = 32,
        num_inference_steps: int = 32,
        threshold: float = 0.95,
        editing_threshold: Optional[float] = None,
        minimal_topk: int = 1,
        schedule: str = "cosine",
        high: float = 7.5,
        low: float = 2.5,
        k: float = 4.0,
        stat: str = "mean",
        q: float = 0.1,
        min_progress: float = 0.0,
        patience: int = 0,
        max_change_ratio: float = 0.0,
    ):
        super().__init__(block_length=block_length, num_inference_steps=num_inference_steps, threshold=threshold,
                         editing_threshold=editing_threshold, minimal_topk=minimal_topk)
        check_stat(stat, BLOCK)
        self.halting = SchED(
            ThresholdSchedule(schedule, high, low, k=k if schedule == "exp" else None),
            stat=stat, q=q, min_progress=min_progress, patience=patience, max_change_ratio=max_change_ratio,
        )
        self._block_done = False
        # Per block: the step at which each sample halted (-1: not halted). Read it after a pipeline call.
        self.halt_steps: list[torch.Tensor] = []

    def step(self, model_output: torch.Tensor, timestep, sample: torch.LongTensor, *, mask_token_id=None,
             return_dict: bool = True, **kwargs):
        """As ``BlockRefinementScheduler.step``; samples that halt get their block's masks filled by argmax."""
        out = super().step(model_output, timestep, sample, mask_token_id=mask_token_id, return_dict=True, **kwargs)
        if mask_token_id is None:  # uniform-corruption mode has no masks to halt on
            return out if return_dict else out.to_tuple()
        step_index = int(timestep.item() if isinstance(timestep, torch.Tensor) else timestep)
        batch, block_length = sample.shape
        if step_index == 0:
            self.halting.start(batch, block_length, sample.device, self.num_inference_steps)
            self.halt_steps.append(torch.full((batch,), -1, dtype=torch.long))
        masked = sample == mask_token_id
        stats = token_stats(model_output)
        step = torch.full((batch,), step_index, dtype=torch.long, device=sample.device)
        decision = self.halting.decide(stats, masked, step, torch.arange(batch, device=sample.device))
        halt = decision.halt & masked.any(-1)
        prev, transfer = out.prev_sample, out.transfer_index
        if halt.any():
            fill = masked & halt[:, None]
            prev = torch.where(fill, stats.top1_id, prev)
            transfer = transfer | fill
            newly = halt.cpu() & (self.halt_steps[-1] < 0)
            self.halt_steps[-1][newly] = step_index
        self._block_done = not (prev == mask_token_id).any()
        out = BlockRefinementSchedulerOutput(
            prev_sample=prev, transfer_index=transfer, editing_transfer_index=out.editing_transfer_index,
            sampled_tokens=out.sampled_tokens, sampled_probs=out.sampled_probs, pred_logits=out.pred_logits,
        )
        return out if return_dict else out.to_tuple()

    def set_timesteps(self, num_inference_steps: int, device=None, block_length: Optional[int] = None) -> None:
        super().set_timesteps(num_inference_steps, device=device, block_length=block_length)
        self.halt_steps = []

    def check_block_should_continue(self, step_idx, masks_remaining, editing_enabled, editing_transfer_index,
                                    post_steps, max_post_steps, finished) -> bool:
        # Without editing, a block whose masks are all committed has nothing left to do: skip the forward
        # pass the stock loop spends finding that out.
        if masks_remaining and self._block_done and not editing_enabled:
            return False
        return super().check_block_should_continue(step_idx, masks_remaining, editing_enabled,
                                                   editing_transfer_index, post_steps, max_post_steps, finished)
