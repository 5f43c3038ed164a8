"""`diffexit train uem` on tiny models: the loss falls, resume is exact, the modes train what they say."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

from diffexit.app.cli import main as cli_main
from diffexit.uem import UEMStack
from diffexit.app.train_uem import main
from diffexit.uem.train import batch_indices

COMMON = ["--batch-size", "32", "--checkpoint-every", "10", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_dit):
    path = tmp_path_factory.mktemp("dit")
    tiny_dit(layers=4).save_pretrained(path)
    return path


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def weights(path):
    return [p.detach().clone() for p in UEMStack.from_pretrained(path).parameters()]


def test_frozen_training_lowers_the_loss_and_resumes_identically(tmp_path, model_dir):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["--out", str(straight), "--model", str(model_dir), "--steps", "20", "--target", "paper",
                 *COMMON]) == 0
    losses = [row["total"] for row in log(straight)]
    assert len(losses) == 20 and np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])
    assert not (straight / "transformer").exists()  # frozen: the backbone is not exported
    record = json.loads((straight / "uem" / "training.json").read_text())
    assert record["seed"] == 0 and record["data"] == "digits" and record["command"].startswith("diffexit train uem")
    assert UEMStack.from_pretrained(straight / "uem").config.target == "paper"

    main(["--out", str(resumed), "--model", str(model_dir), "--steps", "10", "--target", "paper", *COMMON])
    main(["--out", str(resumed), "--model", str(model_dir), "--steps", "20", "--target", "paper", "--resume", *COMMON])
    assert all(torch.equal(a, b) for a, b in zip(weights(straight / "uem"), weights(resumed / "uem")))
    assert log(straight) == log(resumed)


def test_the_default_target_is_the_benchmark_winner():
    from diffexit.app.train_uem import _parser

    assert _parser("diffexit train uem").parse_args(["--out", "o"]).target == "exit-cost"


def test_full_fine_tune_on_an_image_folder_trains_the_backbone(tmp_path, model_dir):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(4):
            pixels = (rng.random((12, 10, 3)) * 255).astype("uint8")
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.png")
    out = tmp_path / "run"
    main(["--out", str(out), "--model", str(model_dir), "--data", str(tmp_path / "images"), "--mode", "full",
          "--steps", "3", "--batch-size", "8"])
    before = DiTTransformer2DModel.from_pretrained(model_dir)
    after = DiTTransformer2DModel.from_pretrained(out / "transformer")
    assert any(not torch.equal(p, q) for p, q in zip(before.parameters(), after.parameters()))


def _exit_errors(transformer):
    """Each exit's mean squared error against the true noise on one fixed batch of noised digits ``[L]``."""
    from diffusers import DDPMScheduler

    from diffexit.uem import exit_predictions
    from diffexit.uem.digits.data import load_digits_dataset

    images, labels = load_digits_dataset(8, "test").tensors
    images, labels = images[:32], labels[:32]
    g = torch.Generator().manual_seed(123)
    noise = torch.randn(images.shape, generator=g)
    t = torch.randint(0, 1000, (32,), generator=g)
    noisy = DDPMScheduler().add_noise(images, noise, t)
    with torch.no_grad():
        # The heads do not enter the exits' predictions; any of the right shape will do.
        pred = exit_predictions(transformer.eval(), UEMStack.for_model(transformer), noisy, timestep=t,
                                class_labels=labels)
    return ((pred.sample[:, :, : noise.shape[1]] - noise) ** 2).mean(dim=(1, 2, 3, 4))


def test_full_mode_lowers_every_exits_loss_and_resumes_bit_for_bit(tmp_path, model_dir):
    # DeeDiff's own training: every block's exit learns to predict the noise, not only the last.
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run = ["--model", str(model_dir), "--mode", "full", "--target", "paper", *COMMON]
    main(["--out", str(straight), "--steps", "20", *run])
    before = _exit_errors(DiTTransformer2DModel.from_pretrained(model_dir))
    after = _exit_errors(DiTTransformer2DModel.from_pretrained(straight / "transformer"))
    assert (after < 0.9 * before).all(), (before, after)

    main(["--out", str(resumed), "--steps", "10", *run])
    main(["--out", str(resumed), "--steps", "20", "--resume", *run])
    a, b = (DiTTransformer2DModel.from_pretrained(d / "transformer") for d in (straight, resumed))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert all(torch.equal(x, y) for x, y in zip(weights(straight / "uem"), weights(resumed / "uem")))


def test_batches_cover_each_epoch_once():
    seen = torch.cat([batch_indices(step, 4, 10, seed=3) for step in range(5)])  # two epochs of 10
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(batch_indices(2, 4, 10, seed=3), batch_indices(2, 4, 10, seed=3))


def test_bad_runs_are_refused(tmp_path, model_dir, capsys):
    pixart_dir = tmp_path / "pixart"
    PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1, sample_size=8,
                             cross_attention_dim=16, caption_channels=8).save_pretrained(pixart_dir)
    cases = [
        (["--model", str(pixart_dir)], "class-conditional DiTTransformer2DModel"),
        (["--model", str(model_dir), "--data", str(tmp_path / "nowhere")], "ImageFolder"),
        (["--model", str(model_dir), "--steps", "0"], "--steps"),
        (["--model", str(model_dir), "--cfg-dropout", "1"], "--cfg-dropout"),
        (["--model", str(tmp_path)], "neither"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit):
            main(["--out", str(tmp_path / "x"), *extra])
        assert message in capsys.readouterr().err
    out = tmp_path / "done"
    main(["--out", str(out), "--model", str(model_dir), "--steps", "1", "--batch-size", "4"])
    with pytest.raises(SystemExit):
        main(["--out", str(out), "--model", str(model_dir), "--steps", "2", "--batch-size", "4"])
    assert "--resume" in capsys.readouterr().err


def test_the_cli_dispatches_to_the_trainer(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["train", "uem", "--help"])
    assert exit_.value.code == 0
    assert "--mode {frozen,full}" in capsys.readouterr().out


def test_a_kill_during_a_checkpoint_save_resumes_cleanly(tmp_path, model_dir, monkeypatch):
    from accelerate import Accelerator

    run = ["--model", str(model_dir), "--steps", "20", "--target", "paper", *COMMON]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert main(["--out", str(straight), *run]) == 0
    real_save, calls = Accelerator.save_state, []

    def dies_in_the_second_save(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            real_save(self, output_dir, **kwargs)  # the files are written, but the save never completes
            raise KeyboardInterrupt("killed while saving the step-20 checkpoint")
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", dies_in_the_second_save)
    with pytest.raises(KeyboardInterrupt):
        main(["--out", str(broken), *run])
    monkeypatch.setattr(Accelerator, "save_state", real_save)
    assert [p.name for p in (broken / "checkpoints").iterdir()] and not (broken / "uem").exists()
    assert main(["--out", str(broken), "--resume", *run]) == 0  # resumes from step 10, not the partial step 20
    assert all(torch.equal(a, b) for a, b in zip(weights(straight / "uem"), weights(broken / "uem")))
    assert log(straight) == log(broken)
