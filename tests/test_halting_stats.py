"""SchED's span statistics on hand-made margins, including the EOS-padding trap."""

import pytest
import torch

from diffexit.dllm.halting import SchED, aggregate_margin, span_statistic
from diffexit.kernels import TokenStats
from diffexit.samplers import ThresholdSchedule

EOS = 1


def make_stats(margins, argmax, entropy=None):
    m = torch.tensor(margins, dtype=torch.float32)
    z = torch.zeros_like(m)
    return TokenStats(top1_id=torch.tensor(argmax), top1_logit=m, top2_logit=z, logit_margin=m, top1_prob=z,
                      top2_prob=z, prob_margin=z, entropy=torch.tensor(entropy, dtype=torch.float32)
                      if entropy is not None else z)


def test_margin_aggregates():
    margin = torch.tensor([[1.0, 2.0, 3.0, 10.0, 99.0]])
    masked = torch.tensor([[True, True, True, True, False]])
    assert aggregate_margin(margin, masked, "mean").item() == pytest.approx(4.0)
    assert aggregate_margin(margin, masked, "min").item() == 1.0
    assert aggregate_margin(margin, masked, "median").item() == 2.0  # lower median of 1, 2, 3, 10
    assert aggregate_margin(margin, masked, "quantile", q=0.0).item() == 1.0
    assert aggregate_margin(margin, masked, "quantile", q=1.0).item() == 10.0
    assert aggregate_margin(margin, masked, "quantile", q=0.5).item() == 2.0
    nothing = torch.zeros_like(masked)
    for stat in ("mean", "min", "median", "quantile"):
        assert aggregate_margin(margin, nothing, stat).item() == float("inf")


def test_eos_padding_trap():
    # Three answer positions the model is unsure of (margin 0.5) and twelve EOS-padding positions it is sure of.
    margins = [[0.5, 0.5, 0.5] + [12.0] * 12]
    argmax = [[7, 8, 9] + [EOS] * 12]
    stats, masked = make_stats(margins, argmax), torch.ones(1, 15, dtype=torch.bool)
    assert span_statistic(stats, masked, "mean").item() == pytest.approx((1.5 + 144) / 15)  # 9.7: fooled
    assert span_statistic(stats, masked, "min").item() == 0.5
    assert span_statistic(stats, masked, "quantile", q=0.1).item() == 0.5
    assert span_statistic(stats, masked, "mean_content", ignore_token_ids=[EOS]).item() == pytest.approx(0.5)
    rule = dict(schedule=ThresholdSchedule("constant", 7.5, 7.5))
    step, rows = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    assert SchED(stat="mean", **rule).decide(stats, masked, step, rows).halt.item()
    for stat in ("min", "quantile"):
        assert not SchED(stat=stat, **rule).decide(stats, masked, step, rows).halt.item()
    assert not SchED(stat="mean_content", ignore_token_ids=[EOS], **rule).decide(stats, masked, step, rows).halt.item()


def test_mean_content_falls_back_when_everything_is_padding():
    stats = make_stats([[3.0, 5.0]], [[EOS, EOS]])
    masked = torch.ones(1, 2, dtype=torch.bool)
    assert span_statistic(stats, masked, "mean_content", ignore_token_ids=[EOS]).item() == 4.0


def test_max_entropy_statistic_is_minus_the_worst_entropy():
    stats = make_stats([[1.0, 1.0, 1.0]], [[5, 6, 7]], entropy=[[0.1, 0.7, 2.0]])
    masked = torch.tensor([[True, True, False]])
    assert span_statistic(stats, masked, "max_entropy").item() == pytest.approx(-0.7)
    tight = SchED(ThresholdSchedule("constant", -0.5, -0.5), stat="max_entropy")
    loose = SchED(ThresholdSchedule("constant", -0.8, -0.8), stat="max_entropy")
    args = (stats, masked, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    assert not tight.decide(*args).halt.item() and loose.decide(*args).halt.item()


def test_mean_content_needs_ids():
    with pytest.raises(ValueError, match="ignore_token_ids"):
        SchED(stat="mean_content")
