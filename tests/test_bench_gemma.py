"""``diffexit bench gemma --quick`` end to end on a tiny random DiffusionGemma saved to disk."""

import json

import pytest
import torch

from diffexit.app.cli import main as cli

STEPS = 4


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    from transformers import DiffusionGemmaForBlockDiffusion

    from diffexit.dllm.charlm.gemma import chat_tokenizer, gemma_config

    folder = tmp_path_factory.mktemp("gemma")
    tok = chat_tokenizer()
    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(gemma_config(tok, hidden_size=32, num_heads=2, head_dim=16))
    with torch.no_grad():
        # A model that is sure of two tokens only ('N' or 'O', by the sign of one hidden unit): its argmax settles
        # within a few steps, so the stock rule stops canvases early.
        norm = model.model.encoder.language_model.norm.weight
        norm.zero_()
        norm[0] = 1.0
        head = model.lm_head.weight  # tied with the embeddings
        head[:, 0] = 0.0
        head[tok.convert_tokens_to_ids("N"), 0], head[tok.convert_tokens_to_ids("O"), 0] = 20.0, -20.0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_bench_gemma_quick(gemma_dir, tmp_path):
    import diffexit.app.bench.gemma as bench
    from diffexit.app.bench.timing import REPEATS

    out = tmp_path / "bench"
    assert cli(["bench", "gemma", "--quick", "--n", "3", "--batch", "3", "--steps", str(STEPS), "--tasks", "add",
                "pick", "--model", str(gemma_dir), "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["benchmark"] == "gemma" and result["steps"] == STEPS
    names = [r.name for r in bench.rows()]
    assert {r["task"] for r in result["rows"]} == {"add", "pick", "discriminating", "controls"}
    for task in ("add", "pick", "discriminating", "controls"):
        assert [r["method"] for r in result["rows"] if r["task"] == task] == names
    by = {(r["task"], r["method"]): r for r in result["rows"]}
    full = by["pick", "all-steps"]
    # One canvas for a short task, every step: the model's own pass count.
    assert full["nfe"] == STEPS and full["agreement"] == 1.0 and full["speedup_nfe"] == 1.0
    for r in result["rows"]:
        assert 1 <= r["nfe"] <= STEPS and 0.0 <= r["agreement"] <= 1.0 and r["speedup_wall"] > 0
        assert r["family"] == r["method"].split("-")[0].replace("all", "all-steps") and r["repeats"] == REPEATS
        assert r["noisy"] == (not 0.5 <= r["speedup_wall"] / r["speedup_nfe"] <= 1.5)
        assert r["passes_over_oracle"] == pytest.approx(r["nfe"] / by[r["task"], "oracle"]["nfe"])
    stopped = by["pick", "stock-0.005"]
    assert stopped["nfe"] < STEPS and stopped["speedup_nfe"] == pytest.approx(STEPS / stopped["nfe"])
    assert by["discriminating", "stock-0.005"]["nfe"] == stopped["nfe"]
    assert by["controls", "stock-0.005"]["tasks"] == ["add"]
    assert (out / "pareto.png").stat().st_size > 0
    assert [g["task"] for g in result["goal"]] == ["discriminating", "controls", "add", "pick"]
    assert all(g["agreement_at_least"] == bench.GOAL_AGREEMENT for g in result["goal"])
    # The oracle keeps every answer, and no rule that keeps them all stops sooner.
    for task in ("add", "pick"):
        oracle = by[task, "oracle"]
        assert oracle["agreement"] == 1.0
        keepers = [r["nfe"] for r in result["rows"] if r["task"] == task and r["agreement"] == 1.0]
        assert oracle["nfe"] == min(keepers)
    assert by["pick", "oracle"]["nfe"] < STEPS  # the tiny model settles, so there is something to save
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(history) == 1 and history[0]["goals"]["gemma"] == result["goal"]
    assert {(s["task"], s["method"]) for s in history[0]["summaries"]} == {
        (g, m) for g in ("discriminating", "controls") for m in names}


def test_the_oracle_stops_each_canvas_at_its_final_argmax_and_reproduces_every_canvas(gemma_dir):
    """An independent re-derivation on a two-canvas span: the recorder sees each step's argmax; the oracle's passes
    are, per sample, the first step of each canvas whose argmax is that canvas's last, summed over canvases."""
    from diffexit.app.bench.gemma import CanvasRecorder, FirstFinalStopping
    from diffexit.dllm.charlm.gemma import chat_tokenizer, gemma_decode
    from diffexit.dllm.charlm.tasks import Layout
    from transformers import DiffusionGemmaForBlockDiffusion

    tok = chat_tokenizer()
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(gemma_dir).eval()
    layout = Layout(prompt_length=12, span_length=2 * model.config.canvas_length)
    prompts = ["add:1+2=", "rev:abc", "pick:ab,cd"]

    class EveryStep(CanvasRecorder):
        def __call__(self, argmax_canvas, logits, **kwargs):
            self.trace.setdefault(self.canvas, []).append(argmax_canvas.clone())
            return super().__call__(argmax_canvas, logits)

    recorder = EveryStep()
    recorder.trace = {}
    full, full_passes = gemma_decode(model, tok, prompts, layout, STEPS, seed=3, stopping=recorder)
    assert len(recorder.canvases) == 2 and full_passes.tolist() == [2 * STEPS] * 3
    expected = torch.zeros(3, dtype=torch.long)
    for k, steps in recorder.trace.items():
        assert torch.equal(steps[-1], recorder.canvases[k])
        same = torch.stack([(a == steps[-1]).all(-1) for a in steps])  # [steps, B]
        expected += same.int().argmax(0) + 1  # the first step that already shows the final canvas
    assert (expected < 2 * STEPS).any() and len(set(expected.tolist())) > 1  # stops, at different steps
    # Samples stop at different steps, so the oracle's rows are compacted as they stop.
    answers, passes = gemma_decode(model, tok, prompts, layout, STEPS, seed=3,
                                   stopping=FirstFinalStopping(recorder.canvases))
    assert answers == full and passes.tolist() == expected.tolist()


def test_bench_gemma_without_a_model_names_the_fix(tmp_path, capsys, monkeypatch):
    import diffexit.dllm.charlm.gemma as gemma

    monkeypatch.setattr(gemma, "GEMMA_WEIGHTS_DIR", tmp_path / "none")
    assert cli(["bench", "gemma", "--quick", "--out", str(tmp_path / "out")]) == 1
    assert "diffexit train text --arch diffusion-gemma" in capsys.readouterr().err
    assert cli(["bench", "gemma", "--quick", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert "no such folder" in capsys.readouterr().err


def test_the_goal_compares_the_fewest_passes_that_keep_the_answers():
    from diffexit.app.bench.gemma import describe_goal, goal

    def row(method, nfe, agreement, wall=1.0, task="discriminating"):
        return {"task": task, "method": method, "family": method.split("-")[0], "nfe": nfe, "agreement": agreement,
                "passes_over_oracle": nfe / 2.5, "speedup_nfe": 16 / nfe, "speedup_wall": wall}

    rows = [row("all-steps", 16, 1.0), row("stock-0.005", 6.0, 1.0), row("stock-0.1", 4.0, 0.995),
            row("stock-0.5", 2.0, 0.99), row("sched-a", 3.0, 1.0, wall=4.0), row("sched-b", 1.5, 0.9),
            row("sched-c", 1.0, 1.0, task="controls"), row("oracle", 2.5, 1.0)]
    g = goal(rows, "discriminating")
    assert g["stock"]["method"] == "stock-0.1" and g["stock"]["nfe"] == 4.0
    assert g["sched"]["method"] == "sched-a" and g["sched_over_stock"] == pytest.approx(0.75)
    assert g["oracle_nfe"] == 2.5 and g["oracle_over_stock"] == pytest.approx(0.625)
    # sched-a: 3.0 / 2.5 = 1.2x the oracle's passes (over 1.15), wall 4.0 / (16 / 3) = 0.75 of its pass speedup.
    assert g["sched_wall_over_nfe"] == pytest.approx(0.75) and not g["met"]
    assert "SchED / stock passes = 0.75" in describe_goal(g) and "not met" in describe_goal(g)
    close = goal([row("sched-a", 2.8, 1.0, wall=16 / 2.8), row("oracle", 2.5, 1.0)], "discriminating")
    assert close["met"] and close["stock"] is None and close["sched_over_stock"] is None
    assert ": met" in describe_goal(close) and "best stock none" in describe_goal(close)
    wall_off = goal([row("sched-a", 2.8, 1.0, wall=0.8 * 16 / 2.8), row("oracle", 2.5, 1.0)], "discriminating")
    assert not wall_off["met"]
    # A learned row is a candidate beside the SchED family: the fewer passes wins, at the goal's agreement only.
    learned = goal([*rows, row("learned-halt", 2.6, 1.0, wall=16 / 2.6), row("learned-x", 2.0, 0.99)],
                   "discriminating")
    assert learned["sched"]["method"] == "learned-halt" and learned["met"]
