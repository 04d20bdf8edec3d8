"""The Pythia-31M-shaped GPT-NeoX on a GPU: the paper's workload in the large-model mode.

For each dtype (bfloat16 and float32 by default): the model (random weights, from
``transformers.GPTNeoXConfig``: hidden 256, 6 layers, 8 heads, intermediate 1024, vocabulary
50 304) on the GPU, X = 20 sequences × 546 random tokens, k = 100 directions, the KL cost, a
Gaussian prior, no preconditioner, ``evaluation="large"``, ``device="cuda"``. Reported:
seconds per direction (the direction stage's time / k), evaluations per direction, their
ratio to (evaluations × one plain forward of the same model on the same X), the set-up and
pilot times, and the fit's peak GPU memory above the model and X
(``torch.cuda.max_memory_allocated``). Directions are generated a block at a time with
``--generator`` (default "auto": on CUDA "device", torch's Philox on the GPU in seeded chunks;
"host": NumPy's PCG64, the same stream as on the CPU, copied to the GPU); the only other host
round trip per cost evaluation is the scalar cost. A second table times one direction alone
(``benchmarks/generators.py``'s measurement: unit normal, identity map, float32 buffer) with
each generator at the model's n on the same device. A third table (on a GPU by default,
``--compile``) times one plain forward of the first dtype eager, under ``torch.compile`` and
under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs), with the compilation's time:
whether a compiled forward would pay for the large-model mode's cost evaluations.

The table is printed and written to ``$OUT/lm_gpu.md`` (``OUT`` defaults to ``./out``).
``--tiny`` runs a tiny configuration on the CPU in seconds (what the test suite runs).

    python benchmarks/device/lm_gpu.py                       # the GPU run (≤ 8 minutes)
    python benchmarks/device/lm_gpu.py --k 20 --dtypes bfloat16
    python benchmarks/device/lm_gpu.py --tiny                # CPU smoke test
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # volsk from this checkout
sys.path.insert(0, str(ROOT / "benchmarks"))
from generators import table as generator_table  # noqa: E402
from generators import time_generators  # noqa: E402
from language_model import LM_FULL, Stages, build_lm, tokens  # noqa: E402

from volsk import LocalVolumeEstimator  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            vocab_size=256)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(config, dtype, device, n_seq, length, k, generator="auto"):
    model = build_lm(config).to(device=device, dtype=dtype)
    X = tokens(n_seq, length, config["vocab_size"]).to(device)
    forwards = []
    with torch.no_grad():
        for _ in range(4):
            sync(device)
            start = time.perf_counter()
            model(X)
            sync(device)
            forwards.append(time.perf_counter() - start)
    forward = min(forwards[1:])  # the first call warms the kernels up
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    stages = Stages(clock=time.perf_counter)
    est = LocalVolumeEstimator(cutoff=1e-2, n_samples=k, random_state=0, evaluation="large",
                               device=device, n_threads=1, generator=generator)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # low effective sample size at small k
        est.fit(model, X)
    sync(device)
    total = time.perf_counter() - start
    stages.close()
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
    t = stages.times
    per = t["directions"] / k
    evaluations = float(est.samples_["evaluations"].mean())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "n": est.n_parameters_,
        "forward_s": forward,
        "s_per_direction": per,
        "evaluations": evaluations,
        "ratio": per / (evaluations * forward),
        "prepare_s": t["prepare"],
        "pilot_s": t["pilot"],
        "fit_s": total,
        "peak_gib": None if peak is None else peak / 2**30,
        "peak_x_model": None if peak is None else peak / model_bytes,
        "log_volume": est.log_volume_,
        "generator": est.generator_,
    }


def compile_rows(config, dtype, device, n_seq, length, repeats=5):
    """One plain forward (inference mode) eager, under ``torch.compile`` and under
    ``torch.compile(mode="reduce-overhead")`` (CUDA graphs on a GPU): whether compiling the
    forward — all a cost evaluation runs besides θ + r·u and the KL — would pay."""
    model = build_lm(config).to(device=device, dtype=dtype)
    X = tokens(n_seq, length, config["vocab_size"]).to(device)

    def timed(fn):
        with torch.inference_mode():
            for _ in range(2):
                fn()
            best = float("inf")
            for _ in range(repeats):
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                best = min(best, time.perf_counter() - start)
        return best

    eager = timed(lambda: model(X).logits)
    rows = [("eager", eager, eager, 0.0, "")]
    for mode in ("default", "reduce-overhead"):
        try:
            torch._dynamo.reset()
            compiled = torch.compile(model, mode=mode)
            start = time.perf_counter()
            with torch.inference_mode():
                compiled(X)
            sync(device)
            compile_s = time.perf_counter() - start
            rows.append((mode, timed(lambda c=compiled: c(X).logits), eager, compile_s, ""))
        except Exception as exc:  # a backend that is not there is a result too
            rows.append((mode, None, eager, None, f"{type(exc).__name__}: {exc}"[:70]))
    return [(str(dtype).replace("torch.", ""), *row) for row in rows]


def compile_table(rows):
    lines = [f"{'dtype':>9}  {'forward':>15}  {'s':>9}  {'× eager':>7}  {'compile s':>9}  note"]
    for dtype, mode, s, eager, compile_s, note in rows:
        lines.append(
            f"{dtype:>9}  {mode:>15}  {'n/a' if s is None else f'{s:.5f}':>9}  "
            f"{'n/a' if s is None else f'{s / eager:.2f}':>7}  "
            f"{'n/a' if compile_s is None else f'{compile_s:.1f}':>9}  {note}")
    return "\n".join(lines)


def table(rows):
    head = (f"{'dtype':>9}  {'n':>11}  {'forward s':>9}  {'s/dir':>7}  {'evals':>5}  "
            f"{'ratio':>6}  {'set-up s':>8}  {'pilot s':>7}  {'fit s':>7}  "
            f"{'peak GiB':>8}  {'× model':>7}  {'log-volume':>12}")
    lines = [head]
    for r in rows:
        peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        times = "n/a" if r["peak_x_model"] is None else f"{r['peak_x_model']:.1f}"
        lines.append(
            f"{r['dtype']:>9}  {r['n']:>11,}  {r['forward_s']:>9.4f}  "
            f"{r['s_per_direction']:>7.3f}  {r['evaluations']:>5.2f}  {r['ratio']:>6.1f}  "
            f"{r['prepare_s']:>8.1f}  {r['pilot_s']:>7.1f}  {r['fit_s']:>7.1f}  {peak:>8}  "
            f"{times:>7}  {r['log_volume']:>12.1f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU")
    parser.add_argument("--k", type=int, default=None, help="directions (default 100; tiny 4)")
    parser.add_argument("--n-seq", type=int, default=None, help="sequences (default 20)")
    parser.add_argument("--length", type=int, default=None, help="tokens each (default 546)")
    parser.add_argument("--dtypes", nargs="*", choices=sorted(DTYPES),
                        default=["bfloat16", "float32"])
    parser.add_argument("--generator", choices=["auto", "host", "device"], default="auto",
                        help="the fits' direction generator (auto: device on CUDA)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="time one forward eager vs torch.compile (default: on a GPU)")
    parser.add_argument("--generator-repeats", type=int, default=3,
                        help="directions timed per generator in the second table (0: skip)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.tiny:
        config, device = TINY, torch.device("cpu")
        k, n_seq, length = args.k or 4, args.n_seq or 2, args.length or 16
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --tiny for the CPU smoke test")
        config, device = LM_FULL, torch.device("cuda")
        k, n_seq, length = args.k or 100, args.n_seq or 20, args.length or 546
    rows = []
    for name in args.dtypes:
        rows.append(measure(config, DTYPES[name], device, n_seq, length, k, args.generator))
        print(table(rows[-1:]), flush=True)
    generators = ""
    if args.generator_repeats > 0:
        timed = time_generators(rows[0]["n"], device, args.generator_repeats)
        generators = (f"\nOne direction alone (stream_direction, unit normal, identity map, "
                      f"float32 buffer), median of {args.generator_repeats}:\n\n```\n"
                      f"{generator_table([(device.type, rows[0]['n'], timed)])}\n```\n")
    compiled = ""
    if args.compile if args.compile is not None else device.type == "cuda":
        # the first dtype only: each compilation takes a minute or so of the 8
        found = compile_rows(config, DTYPES[args.dtypes[0]], device, n_seq, length)
        compiled = (f"\nOne plain forward on X, eager vs compiled (best of 5, inference "
                    f"mode):\n\n```\n{compile_table(found)}\n```\n")
        print(compiled, flush=True)
    gpu = (torch.cuda.get_device_name(device) if device.type == "cuda"
           else platform.processor() or platform.machine())
    text = (f"# GPT-NeoX {'tiny' if args.tiny else 'Pythia-31M-shaped'} on {gpu}\n\n"
            f"- X = {n_seq} × {length} tokens, k = {k}, evaluation='large', device={device}, "
            f"generator={rows[0]['generator']}, torch {torch.__version__}\n\n```\n"
            f"{table(rows)}\n```\n{generators}{compiled}")
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_gpu.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
