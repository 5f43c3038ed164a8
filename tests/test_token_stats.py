"""token_stats: the Triton kernel (in Triton's CPU interpreter) against the chunked torch backend and against a
plain float64 softmax/sort formula, the documented edge cases on both backends, input checks, and the benchmark's
JSON. Interpreted shapes stay tiny: the interpreter runs each program in numpy."""

import importlib
import json
import math

import pytest
import torch

import diffexit.kernels.token_stats_torch as torch_backend
from diffexit.kernels import TokenStats, token_stats
from diffexit.app.bench.kernels import main as bench_main

# `diffexit.kernels.token_stats` is the function (the public name); the module behind it is reached by path.
ts_module = importlib.import_module("diffexit.kernels.token_stats")

INF, NAN = float("inf"), float("nan")
FLOAT_FIELDS = TokenStats._fields[1:]

# The interpreter evaluates both sides of every tl.where in numpy, so masked-off lanes (inf - inf, 1 / 0) warn.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    if request.param == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


def plain(logits, temperature=1.0):
    """The textbook formula in float64 on the float32-cast logits (V >= 2): softmax, a stable sort, entr."""
    x = logits.float().double()
    z = x / temperature
    p = torch.softmax(z, dim=-1)
    order = torch.sort(x, dim=-1, descending=True, stable=True)
    top1, top2 = order.values[..., 0], order.values[..., 1]
    ids = order.indices[..., 0]
    p1, p2 = p.gather(-1, order.indices[..., :2]).unbind(-1)
    return {
        "top1_id": ids, "top1_logit": top1, "top2_logit": top2, "logit_margin": top1 - top2,
        "top1_prob": p1, "top2_prob": p2, "prob_margin": p1 - p2, "entropy": torch.special.entr(p).sum(-1),
    }


def assert_stats_close(got: TokenStats, want, rtol=1e-5, atol=1e-6):
    want = want._asdict() if isinstance(want, TokenStats) else want
    assert got.top1_id.dtype == torch.int64
    assert torch.equal(got.top1_id, want["top1_id"].to(torch.int64))
    for name in FLOAT_FIELDS:
        g = getattr(got, name)
        assert g.dtype == torch.float32, name
        assert g.shape == got.top1_id.shape, name
        torch.testing.assert_close(g.double(), want[name].double(), rtol=rtol, atol=atol, equal_nan=True, msg=name)


# --- agreement on random inputs ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,temperature", [((7, 50), 1.0), ((3, 4, 37), 0.6), ((2, 2500), 1.7)])
def test_matches_plain_formula(backend, shape, temperature, dtype):
    logits = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    got = token_stats(logits, temperature=temperature, backend=backend)
    assert_stats_close(got, plain(logits, temperature), atol=2e-6)


def non_contiguous_views():
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g) * 3  # noqa: E731
    return {
        "transposed 3-D": r(5, 3, 70).transpose(0, 1),
        "vocab slice": r(2, 3, 64)[..., 3:60],
        "row step and vocab step": r(9, 80)[::2, ::3],
        "vocab stride != 1": r(45, 6).t(),
        "4-D permuted, 3 unmergeable dims": r(4, 3, 2, 33).permute(2, 1, 0, 3),
        "fp16 transposed": r(3, 6, 40).half().transpose(0, 1),
        "bf16 sliced": r(4, 5, 100).bfloat16()[1:, ::2, 1:],
    }


@pytest.mark.parametrize("name", list(non_contiguous_views()))
def test_triton_matches_torch_on_views(interpret, name):
    logits = non_contiguous_views()[name]
    assert not logits.is_contiguous()
    got = token_stats(logits, temperature=0.8, backend="triton")
    assert_stats_close(got, token_stats(logits, temperature=0.8, backend="torch"))
    assert_stats_close(got, token_stats(logits.contiguous(), temperature=0.8, backend="triton"), rtol=0, atol=0)


def test_long_vocab_not_a_multiple_of_the_tile(backend):
    # 262147 > 2**18 is prime: many tiles, a ragged last one, and the maximum planted in it.
    logits = torch.randn(2, 262147, generator=torch.Generator().manual_seed(2))
    logits[0, -2] = 9.0
    logits[1, 5] = 9.0
    got = token_stats(logits, backend=backend)
    assert got.top1_id.tolist() == [262145, 5]
    assert_stats_close(got, plain(logits), atol=1e-5)


# With V = 300 a row takes 2 blocks of 256 in the scratch buffer. 700 elements: 1 row per chunk, fewer than one
# leading index's 6 rows, so the view is split index by index. 13 rows: 2 leading indices per chunk, and a last
# chunk of 1. The default: the whole tensor in one chunk.
@pytest.mark.parametrize("chunk_elements", [700, 13 * 512, torch_backend.CHUNK_ELEMENTS])
def test_torch_chunking_and_unmergeable_views_give_the_same_answer(monkeypatch, chunk_elements):
    # Far below zero, so that a stale value left in the scratch buffer's padding by an earlier chunk would win.
    logits = torch.randn(6, 5, 300, generator=torch.Generator().manual_seed(3)).transpose(0, 1) - 500
    logits[4, 2, 7] = float("nan")  # an invalid row in the last chunk: its id is read back from the view
    whole = token_stats(logits.contiguous(), backend="torch")
    valid = torch.ones(5, 6, dtype=torch.bool)
    valid[4, 2] = False
    assert_stats_close(TokenStats(*(f[valid] for f in whole)), plain(logits[valid]))
    assert whole.top1_id[4, 2] == 7 and whole.logit_margin[4, 2].isnan()
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", chunk_elements)
    assert_stats_close(token_stats(logits, backend="torch"), whole, rtol=0, atol=0)


def test_a_decoding_span_is_read_in_one_chunk(monkeypatch):
    # generate() takes stats of logits[:, prompt_length:], whose batch and position dims cannot merge. One chunk
    # for the whole span keeps the per-step cost flat in the batch size.
    logits = torch.randn(32, 40, 100, generator=torch.Generator().manual_seed(5))[:, 24:]
    calls = []
    real = torch_backend._chunk_stats
    monkeypatch.setattr(torch_backend, "_chunk_stats", lambda chunk, *a: (calls.append(chunk.shape), real(chunk, *a)))
    assert_stats_close(token_stats(logits, backend="torch"), token_stats(logits.contiguous(), backend="torch"),
                       rtol=0, atol=0)
    assert calls == [torch.Size([32, 16, 100]), torch.Size([512, 100])]


def test_deterministic(backend):
    logits = torch.randn(3, 4, 90, generator=torch.Generator().manual_seed(4))
    first, second = token_stats(logits, backend=backend), token_stats(logits, backend=backend)
    assert_stats_close(first, second, rtol=0, atol=0)


# --- documented edge cases -------------------------------------------------------------------------------------

def test_ties_go_to_the_lowest_index(backend):
    # V = 2500 spans two Triton tiles (2048 lanes) and ten torch blocks (256): ties within a lane, across
    # lanes, across tiles and across blocks.
    vocab = 2500
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(5))
    tie_sets = [(3, 3 + 2048), (2300, 7), (255, 256), (1000, 999, 2499), (0, vocab - 1), (513, 1500, 2100)]
    for row, positions in enumerate(tie_sets):
        logits[row, list(positions)] = 8.0
    got = token_stats(logits, backend=backend)
    assert got.top1_id.tolist() == [min(p) for p in tie_sets]
    assert torch.equal(got.top2_logit, got.top1_logit)
    assert torch.equal(got.logit_margin, torch.zeros(6))
    assert torch.equal(got.prob_margin, torch.zeros(6))
    assert_stats_close(got, plain(logits))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_equal_row(backend, dtype):
    got = token_stats(torch.full((2, 37), 3.0, dtype=dtype), backend=backend)
    assert got.top1_id.tolist() == [0, 0]
    torch.testing.assert_close(got.top1_prob, torch.full((2,), 1 / 37))
    torch.testing.assert_close(got.entropy, torch.full((2,), math.log(37)))


def test_large_magnitudes_do_not_overflow(backend):
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(6)) * 1e4
    logits[1] = logits[1] + 3e4
    logits[2, :5] = torch.tensor([1e4, 1e4 - 1, 1e4 - 2, -1e4, 0.0])
    logits[2, 5:] = -INF
    got = token_stats(logits, backend=backend)
    for name in FLOAT_FIELDS:
        assert torch.isfinite(getattr(got, name)).all(), name
    assert_stats_close(got, plain(logits), atol=1e-5)
    torch.testing.assert_close(got.logit_margin[2], torch.tensor(1.0))


def test_masked_entries_change_nothing_but_the_indices(backend):
    logits = torch.randn(3, 200, generator=torch.Generator().manual_seed(7))
    keep = torch.zeros(200, dtype=torch.bool)
    keep[[4, 50, 51, 120, 199]] = True
    masked = logits.masked_fill(~keep, -INF)
    got = token_stats(masked, temperature=0.5, backend=backend)
    dense = token_stats(logits[:, keep], temperature=0.5, backend="torch")
    assert torch.equal(got.top1_id, keep.nonzero().squeeze(1)[dense.top1_id])
    for name in FLOAT_FIELDS:
        torch.testing.assert_close(getattr(got, name), getattr(dense, name), msg=name)
    assert_stats_close(got, plain(masked, 0.5))


def test_single_finite_entry_and_v_equals_1(backend):
    cases = [
        (torch.tensor([[-INF, 2.5, -INF, -INF], [-INF, -INF, -INF, -7.0]]), [1, 3]),
        (torch.tensor([[4.0], [-1e3]]), [0, 0]),
        (torch.tensor([[4.0], [-1e3]]).bfloat16(), [0, 0]),
    ]
    expected = {"top2_logit": -INF, "logit_margin": INF, "top1_prob": 1.0, "top2_prob": 0.0, "prob_margin": 1.0,
                "entropy": 0.0}
    for logits, ids in cases:
        got = token_stats(logits, backend=backend)
        assert got.top1_id.tolist() == ids
        assert got.top1_logit.tolist() == logits.float().amax(-1).tolist()
        for name, value in expected.items():
            assert getattr(got, name).tolist() == [value, value], name


def test_all_neg_inf_row_has_no_distribution(backend):
    logits = torch.randn(3, 9, generator=torch.Generator().manual_seed(8))
    logits[1] = -INF
    got = token_stats(logits, backend=backend)
    assert got.top1_id[1] == 0
    assert got.top1_logit[1] == -INF and got.top2_logit[1] == -INF
    for name in ("logit_margin", "top1_prob", "top2_prob", "prob_margin", "entropy"):
        assert torch.isnan(getattr(got, name)[1]), name
    rest = [0, 2]
    assert_stats_close(TokenStats(*(f[rest] for f in got)), {k: v[rest] for k, v in plain(logits).items()})
    one = token_stats(torch.full((1, 1), -INF), backend=backend)
    assert one.top1_id.item() == 0 and torch.isnan(one.entropy).item() and torch.isnan(one.logit_margin).item()


def test_nan_or_pos_inf_invalidates_only_its_row(backend):
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(9))
    logits[0, 17] = NAN
    logits[1, [30, 6]] = torch.tensor([NAN, INF])
    logits[2, 39] = INF
    logits[3, [2, 3]] = torch.tensor([-INF, NAN])
    got = token_stats(logits, backend=backend)
    assert got.top1_id[:4].tolist() == [17, 6, 39, 3]
    for name in FLOAT_FIELDS:
        assert torch.isnan(getattr(got, name)[:4]).all(), name
    assert_stats_close(TokenStats(*(f[4:] for f in got)), {k: v[4:] for k, v in plain(logits).items()})


def test_float64_beyond_float32_range_counts_as_pos_inf(backend):
    logits = torch.zeros(2, 8, dtype=torch.float64)
    logits[0, 5] = 1e39
    logits[1, 5] = -1e39
    got = token_stats(logits, backend=backend)
    assert got.top1_id.tolist() == [5, 0]
    assert torch.isnan(got.entropy[0]) and got.top2_logit[1] == 0.0
    torch.testing.assert_close(got.entropy[1], torch.tensor(math.log(7)))


@pytest.mark.parametrize("shape", [(0, 5), (3, 0, 5), (6,)])
def test_output_shapes(backend, shape):
    got = token_stats(torch.zeros(shape), backend=backend)
    for name, field in got._asdict().items():
        assert field.shape == torch.Size(shape[:-1]), name
        assert field.dtype == (torch.int64 if name == "top1_id" else torch.float32), name


# --- dispatch and input checks -----------------------------------------------------------------------------

@pytest.mark.parametrize("interpreted", [False, True])
def test_auto_picks_triton_only_where_it_runs(monkeypatch, interpreted):
    import diffexit.kernels.token_stats_triton as triton_backend

    calls = []
    real_torch, real_triton = ts_module.token_stats_torch, triton_backend.token_stats_triton
    monkeypatch.setattr(ts_module, "token_stats_torch", lambda *a: calls.append("torch") or real_torch(*a))
    monkeypatch.setattr(triton_backend, "token_stats_triton", lambda *a: calls.append("triton") or real_triton(*a))
    monkeypatch.setenv("TRITON_INTERPRET", "1" if interpreted else "0")
    token_stats(torch.randn(2, 5))
    assert calls == (["triton"] if interpreted else ["torch"])


@pytest.mark.parametrize(
    "logits,kwargs,match",
    [
        (torch.arange(6).view(2, 3), {}, "dtype torch.int64"),
        (torch.ones(2, 3, dtype=torch.bool), {}, "dtype torch.bool"),
        (torch.ones(2, 3, dtype=torch.complex64), {}, "dtype torch.complex64"),
        (torch.tensor(1.0), {}, "0-d"),
        (torch.ones(4, 0), {}, r"V == 0"),
        (torch.ones(2, 3), {"temperature": 0.0}, "temperature"),
        (torch.ones(2, 3), {"temperature": -1.0}, "temperature"),
        (torch.ones(2, 3), {"temperature": NAN}, "temperature"),
        (torch.ones(2, 3), {"temperature": INF}, "temperature"),
        (torch.ones(2, 3), {"temperature": True}, "temperature"),
        (torch.ones(2, 3), {"temperature": "1"}, "temperature"),
        (torch.ones(2, 3), {"backend": "cuda"}, "backend must be one of"),
    ],
)
def test_bad_input_raises_value_error(logits, kwargs, match):
    with pytest.raises(ValueError, match=match):
        token_stats(logits, **kwargs)


def test_triton_backend_where_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA tensor .* TRITON_INTERPRET=1"):
        token_stats(torch.ones(2, 3), backend="triton")
    monkeypatch.setattr(ts_module, "_triton_available", lambda: False)
    with pytest.raises(ValueError, match="needs the triton package"):
        token_stats(torch.ones(2, 3), backend="triton")
    assert token_stats(torch.ones(2, 3)).top1_id.tolist() == [0, 0]


def test_non_tensor_raises_type_error():
    with pytest.raises(TypeError, match="torch.Tensor"):
        token_stats([[1.0, 2.0]])


# --- benchmark -------------------------------------------------------------------------------------------------

def test_bench_quick_json(tmp_path, capsys):
    assert bench_main(["--quick", "--shape", "2x3x300", "--shape", "4x50", "--dtype", "fp32", "--out", str(tmp_path)],
                      prog="diffexit bench kernels") == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["benchmark"] == "kernels" and result["quick"] is True
    assert (tmp_path / "kernels.png").stat().st_size > 0
    rows = result["rows"]
    assert [(r["method"], r["shape"]) for r in rows] == [
        (m, s) for s in ([2, 3, 300], [4, 50]) for m in ("eager", "chunked", "triton", "copy")
    ]
    for r in rows:
        assert {"method", "params", "shape", "dtype", "backend", "ms", "peak_extra_bytes", "gbps"} <= set(r)
        assert r["dtype"] == "fp32"
        if r["method"] == "triton" and not torch.cuda.is_available():
            assert r["skipped"] and "GPU" in r["reason"] and r["ms"] is None and r["gbps"] is None
        else:
            assert not r["skipped"] and r["ms"] > 0 and r["gbps"] > 0
    table = capsys.readouterr().out
    assert "| 2x3x300 | fp32 | chunked |" in table
