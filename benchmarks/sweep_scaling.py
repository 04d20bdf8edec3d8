"""Sweep scaling: the same checkpoint sweep sequentially, on 2 loky workers and on 2 dask workers.

Digits-MLP checkpoints (saved state dicts, loaded by the workers) × cutoffs × {naive,
diag_hessian}. For each backend: wall time of a first call (workers start and import torch) and
of a second call (workers warm), the speed-up over n_jobs=1, and whether the table (all columns
but ``seconds``) is bit-identical to the sequential one.

    python benchmarks/sweep_scaling.py            # 6 checkpoints × 3 cutoffs × 2, k = 30
    python benchmarks/sweep_scaling.py --quick    # 3 checkpoints × 2 cutoffs × 2, k = 20
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import joblib
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results  # noqa: E402

from volsk import LocalVolumeEstimator  # noqa: E402
from volsk.experiments.digits import make_digits_mlp, prior_sigma, train_digits_mlp  # noqa: E402
from volsk.sweeps import Checkpoint, sweep  # noqa: E402


def checkpoints(folder, epochs):
    """One training run per length (cosine schedule to 0), saved as state dicts."""
    sources = {}
    for e in epochs:
        run = train_digits_mlp(epochs=e, seed=0)
        path = Path(folder) / f"epochs_{e:02d}.pt"
        torch.save(run.model.state_dict(), path)
        sources[f"{e} epochs"] = Checkpoint(path, make_digits_mlp)
    return sources, run.splits.X_test


def timed(label, backend, n_jobs, call, reference=None):
    rows = []
    for attempt in ("first", "second"):
        start = time.perf_counter()
        frame = call()
        wall = time.perf_counter() - start
        same = None if reference is None else frame.drop(columns="seconds").equals(
            reference.drop(columns="seconds"))
        rows.append({"run": label, "backend": backend, "n_jobs": n_jobs, "call": attempt,
                     "rows": len(frame), "wall_s": wall,
                     "sum_fit_s": float(frame["seconds"].sum()),
                     "identical_to_n_jobs_1": same})
        print(f"{label:>24} {attempt:>6}: {wall:6.1f} s", flush=True)
    return frame, rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    epochs = [1, 2, 4] if args.quick else [1, 2, 3, 4, 5, 6]
    cutoffs = [1e-3, 1e-2] if args.quick else [1e-3, 1e-2, 1e-1]
    k = 20 if args.quick else 30
    grid = {"cutoff": cutoffs, "preconditioner": [None, "diag_hessian"]}
    base = LocalVolumeEstimator(sigma=prior_sigma(), n_samples=k)

    with tempfile.TemporaryDirectory() as folder:
        sources, X = checkpoints(folder, epochs)

        def run(n_jobs=None):
            return sweep(sources, X, grid, estimator=base, n_jobs=n_jobs, random_state=0)

        reference, rows = timed("sequential", "sequential", 1, lambda: run(1))
        with joblib.parallel_config(backend="loky"):
            _, more = timed("loky", "loky", 2, lambda: run(2), reference)
        rows += more

        from dask.distributed import Client, LocalCluster

        start = time.perf_counter()
        with (
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                         dashboard_address=None) as cluster,
            Client(cluster),
        ):
            started = time.perf_counter() - start
            with joblib.parallel_config(backend="dask"):
                _, more = timed("dask LocalCluster", "dask", "2 workers", run, reference)
        rows += more

    table = pd.DataFrame(rows)
    sequential = table[(table.backend == "sequential") & (table.call == "second")].wall_s.iloc[0]
    table["speedup"] = sequential / table["wall_s"]
    text = table.to_string(index=False, float_format=lambda v: f"{v:.2f}")
    print(text)
    notes = (
        f"{len(reference)} rows: {len(epochs)} checkpoints (digits MLP, 4810 parameters, "
        f"Checkpoint state dicts) × cutoffs {cutoffs} × preconditioner {{naive, diag_hessian}}, "
        f"k = {k}, paired, on the 773 held-out digits. speedup = sequential (second call) wall "
        "time / this wall time. 'first' includes starting the workers and importing torch and "
        f"volsk in them; the dask cluster itself took {started:.1f} s to start (not included). "
        "identical_to_n_jobs_1: every column but `seconds` bit-identical to the sequential "
        f"table. Load average (1 min) {load_before:.1f} before, {os.getloadavg()[0]:.1f} "
        f"after, on {os.cpu_count()} cores: other processes share the machine."
    )
    append_results("Sweep scaling: sequential vs loky vs dask" + (" (quick)" if args.quick
                                                                   else ""), text, notes)


if __name__ == "__main__":
    main()
