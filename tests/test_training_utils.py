"""What the trainers share: the learning-rate schedule, the EMA, and checkpoints a kill cannot leave half-written."""

import pytest
import torch

from diffexit.common.training import (
    EMA,
    LR_FLOOR,
    numbered_checkpoints,
    save_checkpoint,
    save_numbered_checkpoint,
    warmup_cosine,
)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = [warmup_cosine(s, 10, 100) for s in range(100)]
    assert f[0] == 0.1 and f[9] == 1.0 and all(a >= b for a, b in zip(f[9:], f[10:]))
    assert warmup_cosine(100, 10, 100) == pytest.approx(LR_FLOOR)


def test_ema_moves_towards_the_model_and_applies_then_restores():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, 0.999)
    start = ema.shadow["weight"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # first update: decay 1/10
    assert torch.allclose(ema.shadow["weight"], start + 0.9)
    restored = EMA(torch.nn.Linear(2, 2), 0.999)
    restored.load_state_dict(ema.state_dict())
    target = torch.nn.Linear(2, 2)
    restored.copy_to(target)
    assert torch.equal(target.weight, ema.shadow["weight"])
    live = model.weight.detach().clone()
    with ema.applied(model):
        assert torch.equal(model.weight, ema.shadow["weight"])
    assert torch.equal(model.weight, live)
    with pytest.raises(ValueError, match="decay"):
        EMA(model, 1.0)


class FakeAccelerator:
    """The part of accelerate's Accelerator that checkpoints use; ``kill_after`` files dies mid-save."""

    is_main_process = True

    def __init__(self, kill_after=None):
        self.kill_after = kill_after

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        from pathlib import Path

        Path(path).mkdir(parents=True)
        for i in range(3):
            if self.kill_after is not None and i == self.kill_after:
                raise KeyboardInterrupt("killed mid-save")
            (Path(path) / f"part{i}.bin").write_text(str(i))


def test_a_kill_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    save_checkpoint(FakeAccelerator(), tmp_path / "checkpoint", {"state.json": '{"step": 3}'})
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(FakeAccelerator(kill_after=1), tmp_path / "checkpoint", {"state.json": '{"step": 6}'})
    assert (tmp_path / "checkpoint" / "state.json").read_text() == '{"step": 3}'
    assert len(list((tmp_path / "checkpoint").glob("part*.bin"))) == 3
    # The next save writes over the stale partial one.
    save_checkpoint(FakeAccelerator(), tmp_path / "checkpoint", {"state.json": '{"step": 6}'})
    assert (tmp_path / "checkpoint" / "state.json").read_text() == '{"step": 6}'
    assert not (tmp_path / "checkpoint.partial").exists()


def test_numbered_checkpoints_list_only_complete_ones_and_keep_the_newest(tmp_path):
    for step in (10, 20, 30):
        save_numbered_checkpoint(FakeAccelerator(), tmp_path, step, keep=2)
    with pytest.raises(KeyboardInterrupt):
        save_numbered_checkpoint(FakeAccelerator(kill_after=0), tmp_path, 40, keep=2)
    assert [p.name for p in numbered_checkpoints(tmp_path)] == ["step-000020", "step-000030"]
    assert (tmp_path / "step-000040.partial").exists()


def test_written_files_get_the_umasks_mode_not_mkstemps(tmp_path):
    # A temp file renamed into place would otherwise stay 0600, unreadable by anyone else sharing the folder.
    import os

    from diffexit.common.results import atomic_write_bytes, write_results

    old = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        path = write_results(tmp_path, "text", True, [])
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o640
    assert path.stat().st_mode & 0o777 == 0o640
