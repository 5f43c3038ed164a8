"""MuE's similarity exit: the relative change each block makes decides, with no heads; its per-step tolerances are
calibrated like the UEMs' thresholds and go through the same file and the same door."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from diffexit.samplers.early_exits import attach_early_exits
from diffexit.uem import enable_early_exit
from diffexit.uem.calibration import calibrate_similarity, exit_outcome, record_exits
from diffexit.uem.calibration_file import Calibration
from diffexit.uem.exit_config import EarlyExitConfig
from diffexit.uem.exit_rules import CalibratedThreshold, SimilarityExit
from diffexit.uem.digits.pipeline import DigitsDiTPipeline

LAYERS = 4


def by_hand(m, x, t, y):
    """Per block, each sample's ``||h_k - h_{k-1}|| / ||h_{k-1}||`` ``[L, B]`` and every exit's output
    ``[L, B, C, H, W]``, written out from the diffusers DiT source."""
    p, c = m.config.patch_size, m.out_channels
    h = m.pos_embed(x)
    cond = m.transformer_blocks[0].norm1.emb(t, y, hidden_dtype=h.dtype)
    shift, scale = m.proj_out_1(F.silu(cond)).chunk(2, dim=1)
    n = x.shape[-1] // p
    changes, outs = [], []
    for block in m.transformer_blocks:
        nxt = block(h, timestep=t, class_labels=y)
        changes.append(torch.stack([(nxt[i] - h[i]).norm() / h[i].norm() for i in range(len(h))]))
        h = nxt
        o = m.proj_out_2(m.norm_out(h) * (1 + scale[:, None]) + shift[:, None])
        outs.append(torch.einsum("nhwpqc->nchpwq", o.reshape(-1, n, n, p, p, c)).reshape(-1, c, n * p, n * p))
    return torch.stack(changes), torch.stack(outs)


@torch.no_grad()
def test_similarity_exit_stops_at_the_first_block_that_barely_changes_the_state(perturbed_dit):
    m = perturbed_dit()
    g = torch.Generator().manual_seed(2)
    x, t, y = torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 1000, (6,), generator=g), torch.arange(6)
    change, outs = by_hand(m, x, t, y)
    # The tolerance that spreads the samples over the most depths (half-way between observed changes).
    v = change[:-1].flatten().sort().values
    candidates = [float(a + b) / 2 for a, b in zip(v[:-1], v[1:])]

    def depths(tol):
        below = change[:-1] < tol
        return torch.where(below.any(0), below.int().argmax(0) + 1, LAYERS)

    tol = max(candidates, key=lambda c: len(set(depths(c).tolist())))
    want = depths(tol)
    assert len(set(want.tolist())) > 1
    early = enable_early_exit(m, None, SimilarityExit(tol))
    got = m(x, timestep=t, class_labels=y).sample
    assert early.last_depths.tolist() == want.tolist()
    torch.testing.assert_close(got, outs[want - 1, torch.arange(6)], rtol=1e-5, atol=1e-5)


def ddim():
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                         timestep_spacing="trailing")


@torch.no_grad()
def test_the_recorded_change_is_what_the_rule_reads(perturbed_dit):
    """At the first step the forward sees the recorded input, so its depths are those the recording predicts."""
    m = perturbed_dit()
    labels = torch.arange(6) % 10
    record = record_exits(m, None, ddim(), labels, steps=3, guidance_scale=2.0, seed=5, statistic="change")
    assert record.uncertainty.shape == (3, LAYERS, 6)
    tol = float(record.uncertainty[0, :-1].median())
    want, _ = exit_outcome(record.uncertainty[0], record.error[0], 1, tol)
    assert len(set(want.tolist())) > 1
    pipe = DigitsDiTPipeline(transformer=m, scheduler=ddim())
    pipe.set_progress_bar_config(disable=True)
    early = enable_early_exit(pipe, None, CalibratedThreshold([tol, 0.0, 0.0], statistic="change"))
    depths = []
    early.progress, early.depth_listener = 0.0, depths.append
    pipe(labels.tolist(), guidance_scale=2.0, generator=torch.Generator().manual_seed(5), num_inference_steps=1,
         output_type="pt")
    assert depths[0].tolist() == want.tolist()


@torch.no_grad()
def test_a_similarity_calibration_goes_through_the_door_and_refuses_other_weights(tmp_path, perturbed_dit):
    m = perturbed_dit()
    labels = torch.arange(8) % 10
    tight, loose = calibrate_similarity(m, ddim(), labels, labels, budgets=[1e-9, 10.0], steps=3,
                                        guidance_scale=2.0, seed=0)
    assert tight.statistic == loose.statistic == "change" and tight.uem == {}
    assert tight.figures["held_out"]["layer_ratio"] == 1.0 > loose.figures["held_out"]["layer_ratio"]
    path = loose.save(tmp_path / "similarity.json")
    assert Calibration.load(path).rule().statistic == "change"
    pipe = DigitsDiTPipeline(transformer=m, scheduler=ddim())
    pipe.set_progress_bar_config(disable=True)
    attached = attach_early_exits(pipe, EarlyExitConfig("similarity", calibration=str(path)))
    assert attached.steps == 3 and attached.rule.statistic == "change"
    pipe([1, 2], guidance_scale=2.0, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert pipe.scheduler.statistics.layer_ratio < 1.0
    other = DigitsDiTPipeline(transformer=perturbed_dit(seed=9), scheduler=ddim())
    with pytest.raises(ValueError, match="weights differ"):
        attach_early_exits(other, EarlyExitConfig("similarity", calibration=str(path)))


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "similarity"}, "needs a tolerance"),
    ({"method": "similarity", "tolerance": 1.5}, "must lie in"),
    ({"method": "similarity", "tolerance": 0.1, "uem": "heads"}, "uem only applies"),
    ({"method": "similarity", "calibration": "c.json", "min_depth": 2}, "min_depth goes with a tolerance"),
    ({"method": "deediff", "tolerance": 0.1, "uem": "heads"}, "not of 'deediff'"),
])
def test_bad_similarity_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EarlyExitConfig(**kwargs)


def test_similarity_config_round_trips():
    config = EarlyExitConfig("similarity", tolerance="linear:0.2:0.05", min_depth=2, remainder="cached")
    assert EarlyExitConfig.from_dict(config.to_dict()) == config


@torch.no_grad()
def test_calibrate_uem_statistic_change_writes_what_calibrate_similarity_makes(tmp_path, capsys, perturbed_dit):
    import json

    from diffexit.app import calibrate_uem, generate_images
    from diffexit.app.models import default_guidance_scale

    m = perturbed_dit()
    pipe = DigitsDiTPipeline(transformer=m, scheduler=ddim())
    pipe.save_pretrained(tmp_path / "pipe")
    argv = ["--statistic", "change", "--model", str(tmp_path / "pipe"), "--budget", "10", "--steps", "3",
            "--samples", "4", "--held-out", "4", "--out", str(tmp_path / "cal")]
    assert calibrate_uem.main(argv) == 0
    path = tmp_path / "cal" / "calibration-10-steps3.json"
    saved = Calibration.load(path)
    labels = torch.arange(4) % 10
    (want,) = calibrate_similarity(m, ddim(), labels, labels, budgets=[10.0], steps=3,
                                   guidance_scale=default_guidance_scale(pipe), seed=0)
    assert saved.statistic == "change" and saved.thresholds == want.thresholds
    assert saved.min_depths == want.min_depths and saved.provenance["command"].endswith(" ".join(argv))
    assert "--method similarity --calibration FILE" in capsys.readouterr().out
    # generate images takes the file, and job.json records it.
    generate_images.run(["--per-class", "1", "--classes", "1", "--pipeline", str(tmp_path / "pipe"), "--method",
                         "similarity", "--calibration", str(path), "--out", str(tmp_path / "gen")])
    recorded = json.loads((tmp_path / "gen" / "job.json").read_text())["exits"]
    assert EarlyExitConfig.from_dict(recorded) == EarlyExitConfig("similarity", calibration=str(path.resolve()))


@pytest.mark.parametrize("extra, says", [
    (["--uem", "heads", "--out", "o"], "read no heads: drop --uem"),
    ([], "--statistic change needs --out DIR"),
])
def test_calibrate_uem_statistic_change_refuses_heads_and_wants_out(extra, says, tmp_path, capsys):
    from diffexit.app import calibrate_uem

    with pytest.raises(SystemExit):
        calibrate_uem.main(["--statistic", "change", "--budget", "1", *extra])
    assert says in capsys.readouterr().err


def test_calibrate_uem_without_uem_asks_for_it(capsys):
    from diffexit.app import calibrate_uem

    with pytest.raises(SystemExit):
        calibrate_uem.main(["--budget", "1"])
    assert "--uem DIR is required" in capsys.readouterr().err
