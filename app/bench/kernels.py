"""``diffexit bench kernels``: token_stats backends against torch eager, measured side by side in one run.

It runs on the CUDA device when torch sees one, else on the CPU. For each logits shape and dtype it times these,
interleaved round by round so that machine noise hits all alike:

- ``eager``: what a user writes by hand, ``log_softmax`` + ``exp`` + ``topk`` + ``-(p * log p).sum()``;
- ``chunked``: ``token_stats(backend="torch")``;
- ``triton``: ``token_stats(backend="triton")``, on CUDA only (elsewhere a skipped row says why);
- ``copy``: ``logits.clone()``, a memory-bandwidth yardstick (it reads and writes the logits once).

``gbps`` is effective bandwidth: the bytes of one read of the logits (two for ``copy``) over the median time.
``peak_extra_bytes`` is the peak memory beyond what was allocated before the call: on CUDA the caching allocator's
high-water mark; on Linux CPUs the growth of the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs``), which misses memory the allocator already held. Elsewhere it is null.

Writes ``DIR/results.json`` (``{"benchmark": "kernels", "quick": ..., "rows": [...]}``) and ``DIR/kernels.png``,
and prints a markdown table.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import io
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from ...common.cli_help import HelpFormatter
from ...common.results import atomic_write_bytes, write_results
from ...kernels import token_stats
from ...kernels.token_stats_torch import CHUNK_ELEMENTS
from ..jobs import JobError, prepare_out_dir

FULL_SHAPES = [(1, 2048, 126464), (8, 256, 152064)]
QUICK_SHAPES = [(1, 64, 126464), (2, 16, 152064)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Timed rounds, after one warm-up call per method that also measures its peak memory (and compiles Triton).
REPS = {("cpu", True): 3, ("cpu", False): 2, ("cuda", True): 10, ("cuda", False): 20}
# Eager needs about four fp32 copies of the logits; skip it (saying so) where that would crowd the machine.
EAGER_FP32_COPIES = 4
MEMORY_FRACTION = 0.6


def main(argv: list[str], prog: str) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=HelpFormatter, description="Time token_stats backends against torch eager, side by side in one run."
    )
    parser.add_argument("--quick", action="store_true", help=f"small shapes {QUICK_SHAPES}, for a smoke run")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_kernels"), help="output folder")
    parser.add_argument(
        "--shape", action="append", type=_shape, metavar="AxBxV",
        help=f"logits shape, repeatable (default {FULL_SHAPES}, or the quick ones)",
    )
    parser.add_argument(
        "--dtype", action="append", choices=sorted(DTYPES), help="logits dtype, repeatable (default fp32 and bf16)"
    )
    args = parser.parse_args(argv)
    try:
        # Before the timing, which takes minutes: a bad --out must not throw the figures away.
        prepare_out_dir(args.out)
    except JobError as e:
        parser.error(str(e))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = args.shape or (QUICK_SHAPES if args.quick else FULL_SHAPES)
    dtypes = args.dtype or ["fp32", "bf16"]
    reps = REPS[(device.type, args.quick)]

    rows = []
    for shape in shapes:
        for dtype in dtypes:
            rows += _bench_one(shape, DTYPES[dtype], dtype, device, reps)
    result = {
        "benchmark": "kernels",
        "quick": args.quick,
        "device": _device_name(device),
        "device_peak_gbps": _peak_gbps(device),
        "rows": rows,
    }
    write_results(args.out, "kernels", args.quick, rows, device=result["device"],
                  device_peak_gbps=result["device_peak_gbps"])
    _plot(rows, args.out / "kernels.png")
    print(_table(result))
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'kernels.png'}")
    return 0


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 1x2048x126464, got {text!r}") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"shape needs positive sizes, got {text!r}")
    return shape


def eager_stats(logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The hand-written baseline: argmax, top-2 logits and probabilities, entropy, through a full softmax."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    probs = logp.exp()
    top_probs, top_ids = probs.topk(2, dim=-1)
    entropy = -(probs * logp).sum(-1)
    return top_ids[..., 0], logits.gather(-1, top_ids), top_probs, entropy


def _bench_one(shape, dtype, dtype_name, device, reps) -> list[dict]:
    n_bytes = torch.Size(shape).numel() * dtype.itemsize
    generator = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(shape, generator=generator, device=device) * 4).to(dtype)
    base = {"shape": list(shape), "dtype": dtype_name}
    methods = {
        "eager": ("torch", lambda: eager_stats(logits)),
        "chunked": ("torch", lambda: token_stats(logits, backend="torch")),
        "triton": ("triton", lambda: token_stats(logits, backend="triton")),
        "copy": ("torch", logits.clone),
    }
    params = {
        "eager": {"temperature": 1.0},
        "chunked": {"temperature": 1.0, "chunk_elements": CHUNK_ELEMENTS},
        "triton": {"temperature": 1.0},
        "copy": {},
    }
    skipped = {}
    if device.type != "cuda":
        skipped["triton"] = "needs a CUDA GPU: Triton figures are only measured there (never estimated)"
    eager_need = n_bytes + EAGER_FP32_COPIES * torch.Size(shape).numel() * 4
    free = _free_bytes(device)
    if free is not None and eager_need > MEMORY_FRACTION * free:
        skipped["eager"] = f"needs about {eager_need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"

    run = [name for name in methods if name not in skipped]
    peak = {name: _peak_extra(methods[name][1], device) for name in run}
    times = {name: [] for name in run}
    for _ in range(reps):
        for name in run:
            times[name].append(_time(methods[name][1], device))

    rows = []
    eager_ms = statistics.median(times["eager"]) if "eager" in times else None
    for name, (backend, _) in methods.items():
        row = {"method": name, "params": params[name], **base, "backend": backend}
        if name in skipped:
            rows.append({**row, "ms": None, "peak_extra_bytes": None, "gbps": None, "speedup_vs_eager": None,
                         "skipped": True, "reason": skipped[name]})
            continue
        ms = statistics.median(times[name])
        read = 2 * n_bytes if name == "copy" else n_bytes
        rows.append({
            **row, "ms": ms, "peak_extra_bytes": peak[name][0], "peak_method": peak[name][1],
            "gbps": read / ms / 1e6, "speedup_vs_eager": eager_ms / ms if eager_ms else None,
            "reps": reps, "skipped": False, "reason": None,
        })
    gc.collect()
    return rows


def _time(fn, device) -> float:
    """Milliseconds for one call of ``fn``."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _peak_extra(fn, device) -> tuple[int | None, str]:
    """Peak extra bytes of one (warm-up) call of ``fn``, and how they were measured."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, "cuda max_memory_allocated"
    if not sys.platform.startswith("linux"):
        fn()
        return None, "not measured: needs Linux /proc"
    _trim_heap()
    before = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    fn()
    return (_proc_status_kib("VmHWM") - before) * 1024, "peak RSS growth (VmHWM)"


def _trim_heap() -> None:
    # Hand freed heap memory back to the OS so that reuse of it does not hide a method's allocations.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def _free_bytes(device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    # The load average tells a reader how much other work shared the cores during the run.
    return f"cpu ({torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f})"


def _peak_gbps(device) -> float | None:
    """Theoretical DRAM bandwidth from the device's properties (double data rate), or None on CPU."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8 / 1e9


def _table(result) -> str:
    peak = result["device_peak_gbps"]
    lines = [
        f"token_stats on {result['device']}" + (f", peak DRAM {peak:.0f} GB/s" if peak else ""),
        "",
        "| shape | dtype | method | ms | vs eager | peak extra MiB | GB/s | % peak BW | note |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in result["rows"]:
        def fmt(value, spec):
            return "-" if value is None else format(value, spec)

        mib = None if r["peak_extra_bytes"] is None else r["peak_extra_bytes"] / 2**20
        pct = None if (peak is None or r["gbps"] is None) else 100 * r["gbps"] / peak
        note = r["reason"] or ""
        lines.append(
            f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['method']} | {fmt(r['ms'], '.1f')} | "
            f"{fmt(r['speedup_vs_eager'], '.2f')} | {fmt(mib, '.1f')} | {fmt(r['gbps'], '.1f')} | "
            f"{fmt(pct, '.0f')} | {note} |"
        )
    return "\n".join(lines)


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(("x".join(map(str, r["shape"])), r["dtype"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["ms"] is not None))
    skipped = sorted({r["method"] for r in rows} - set(methods))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(2 + 2.2 * len(cases), 4))
    for j, method in enumerate(methods):
        xs, ms = [], []
        for i, case in enumerate(cases):
            for r in rows:
                if r["method"] == method and ("x".join(map(str, r["shape"])), r["dtype"]) == case and r["ms"]:
                    xs.append(i + (j - (len(methods) - 1) / 2) * width)
                    ms.append(r["ms"])
        ax.bar(xs, ms, width, label=method)
    ax.set_xticks(range(len(cases)), [f"{s}\n{d}" for s, d in cases], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms (median, log scale)")
    note = f" ({', '.join(skipped)} skipped, see results.json)" if skipped else ""
    ax.set_title("token_stats: time per call" + note)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())
