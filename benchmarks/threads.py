"""torch's intra-op threads against model size: where does a second thread start to pay?

Times ``LocalVolumeEstimator.fit`` on MLPs of increasing size (64 → w → w → 10, GELU, KL cost
on 128 random inputs, Gaussian prior, no preconditioner) with ``n_threads=1``, ``2`` and torch's
default (``n_threads=None`` with the thread count torch chose at start-up). The choice of
``n_threads="auto"`` (one thread below ``volsk._threads.AUTO_MAX_PARAMETERS`` trainable
parameters, torch's setting above) is read from this table.

Each cell is the median wall-clock time of ``--repeats`` fits (and the fastest one), the
settings of one size interleaved round-robin so that the host's drifting load reaches all of
them alike; the load average before and after is printed, since the trap this measures is a
busy machine's.

    python benchmarks/threads.py            # 5k, 50k, 500k, 5M parameters; k = 32, 3 repeats
    python benchmarks/threads.py --quick    # 5k, 50k, 500k; k = 8, 2 repeats
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice, read before anything sets it

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results  # noqa: E402

from volsk import LocalVolumeEstimator  # noqa: E402
from volsk._threads import AUTO_MAX_PARAMETERS  # noqa: E402

N_INPUTS, N_CLASSES, N_EXAMPLES = 64, 10, 128


def width_for(n_parameters: int) -> int:
    """Hidden width w of the 64 → w → w → 10 MLP with about ``n_parameters`` parameters."""
    # w² + (64 + 1 + 1 + 10) w + 10 = n
    b = N_INPUTS + N_CLASSES + 2
    return max(1, round((-b + math.sqrt(b * b + 4 * (n_parameters - N_CLASSES))) / 2))


def make_mlp(width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(N_INPUTS, width), torch.nn.GELU(),
        torch.nn.Linear(width, width), torch.nn.GELU(),
        torch.nn.Linear(width, N_CLASSES),
    )


def time_fit(model, X, n_threads, n_samples) -> float:
    est = LocalVolumeEstimator(cutoff=1e-2, sigma=0.05, n_samples=n_samples, random_state=0,
                               n_threads=n_threads, device="cpu")
    start = time.perf_counter()
    est.fit(model, X)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="*", default=None,
                        help="target parameter counts")
    parser.add_argument("--n-samples", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    sizes = args.sizes or ([5_000, 50_000, 500_000] if args.quick
                           else [5_000, 50_000, 500_000, 5_000_000])
    n_samples = args.n_samples or (8 if args.quick else 32)
    repeats = args.repeats or (2 if args.quick else 3)
    settings = {"1": 1, "2": 2, f"default ({DEFAULT_THREADS})": None}

    X = torch.randn(N_EXAMPLES, N_INPUTS, generator=torch.Generator().manual_seed(0))
    load_before = os.getloadavg()
    rows = []
    for target in sizes:
        model = make_mlp(width_for(target))
        n = sum(p.numel() for p in model.parameters())
        times = {name: [] for name in settings}
        time_fit(model, X, 1, 2)  # warm-up: allocator, kernels, lazy imports
        for _ in range(repeats):
            for name, n_threads in settings.items():
                torch.set_num_threads(DEFAULT_THREADS)  # the caller's setting, as in a session
                times[name].append(time_fit(model, X, n_threads, n_samples))
        row = {"parameters": n}
        for name, ts in times.items():
            row[f"{name} s"] = f"{statistics.median(ts):.2f} ({min(ts):.2f})"
        best_one = min(times["1"])
        best_many = min(min(ts) for name, ts in times.items() if name != "1")
        row["many/1"] = f"{best_many / best_one:.2f}"
        rows.append(row)
        print(row, flush=True)
    load_after = os.getloadavg()

    table = pd.DataFrame(rows).to_string(index=False)
    print(table)
    notes = (
        f"Wall-clock seconds per fit, median of {repeats} (fastest in brackets); k = "
        f"{n_samples} directions, MLP 64 → w → w → 10 (GELU), KL on {N_EXAMPLES} random "
        "inputs, Gaussian prior σ = 0.05, no preconditioner. `many/1`: the fastest fit with "
        "several threads over the fastest with one (> 1: one thread is faster). Load average "
        f"(1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after, on "
        f"{os.cpu_count()} cores. `n_threads=\"auto\"` uses one thread below "
        f"{AUTO_MAX_PARAMETERS:,} trainable parameters and torch's setting above."
    )
    append_results("torch threads against model size" + (" (quick)" if args.quick else ""),
                   table, notes)


if __name__ == "__main__":
    main()
