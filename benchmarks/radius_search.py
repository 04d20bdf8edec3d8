"""Radius search on the digits MLP: cost evaluations and time per direction.

volsk's batched search (Taylor guess from one nested JVP, then Illinois regula falsi in log–log
space, all directions of a batch in one vmapped forward) against the classic search: doubling
then bisection, one direction at a time. One torch thread.

    python benchmarks/radius_search.py            # k = 300 directions per tolerance
    python benchmarks/radius_search.py --quick    # k = 60
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results  # noqa: E402

from volsk import LocalVolumeEstimator  # noqa: E402
from volsk._evaluate import FunctionalModel  # noqa: E402
from volsk._sampling import draw_directions  # noqa: E402
from volsk.costs import make_cost  # noqa: E402
from volsk.experiments.digits import prior_sigma, train_digits_mlp  # noqa: E402
from volsk.preconditioners import Identity, PreconditionerContext  # noqa: E402

CUTOFF = 1e-2


def time_forward(model, X, repeats=200):
    with torch.no_grad():
        for _ in range(10):
            model(X)
        start = time.perf_counter()
        for _ in range(repeats):
            model(X)
    return (time.perf_counter() - start) / repeats


def doubling_bisection(evaluator, cost, theta, u, rtol, r0=1e-2, max_iter=200):
    """The classic search: double until crossed, then bisect; one forward per evaluation."""
    evals = 0

    def c(r):
        nonlocal evals
        evals += 1
        with torch.no_grad():
            return float(cost(evaluator.outputs(theta + r * u)))

    lo, hi = 0.0, r0
    while c(hi) < CUTOFF:
        lo, hi = hi, 2 * hi
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        value = c(mid)
        if abs(value - CUTOFF) <= rtol * CUTOFF:
            return mid, evals
        lo, hi = (mid, hi) if value < CUTOFF else (lo, mid)
    return 0.5 * (lo + hi), evals


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    k = 60 if args.quick else 300
    k_base = 20 if args.quick else 60

    run = train_digits_mlp(seed=0)
    X = run.splits.X_test
    forward = time_forward(run.model, X)

    rows = []
    for rtol in (1e-2, 1e-3, 1e-6):
        est = LocalVolumeEstimator(CUTOFF, "gaussian", sigma=prior_sigma(), n_samples=k,
                                   rtol=rtol, random_state=0)
        est.fit(run.model, X)  # warm-up (first vmap traces are slower)
        start = time.perf_counter()
        est.fit(run.model, X)
        seconds = time.perf_counter() - start
        evals = est.n_evaluations_ / k
        per_direction = seconds / k
        rows.append({
            "search": "volsk (batched, log-log Illinois)",
            "rtol": rtol,
            "evals/direction": evals,
            "ms/direction": 1e3 * per_direction,
            "ms/(evals x forward)": 1e3 * evals * forward,
            "time / (evals x forward)": per_direction / (evals * forward),
            "log_volume": est.log_volume_,
        })

    # the baseline: one direction at a time, doubling + bisection
    evaluator = FunctionalModel(run.model, X, "cpu")
    cost = make_cost("kl", evaluator.anchor_outputs())
    mask = torch.ones(evaluator.space.n, dtype=torch.bool)
    P = Identity().bind(PreconditionerContext(evaluator, cost, mask))
    U, _ = draw_directions(evaluator.space.n, range(k_base), 0, P)
    theta = evaluator.theta
    start = time.perf_counter()
    evals = [doubling_bisection(evaluator, cost, theta, U[i], 1e-2)[1] for i in range(k_base)]
    base_seconds = (time.perf_counter() - start) / k_base
    base_evals = float(np.mean(evals))
    rows.append({
        "search": "baseline (doubling + bisection, 1 direction at a time)",
        "rtol": 1e-2,
        "evals/direction": base_evals,
        "ms/direction": 1e3 * base_seconds,
        "ms/(evals x forward)": 1e3 * base_evals * forward,
        "time / (evals x forward)": base_seconds / (base_evals * forward),
        "log_volume": float("nan"),
    })
    table = pd.DataFrame(rows)
    speedup = base_seconds / table.loc[table.rtol == 1e-2, "ms/direction"].iloc[0] * 1e3
    speedup3 = base_seconds / table.loc[table.rtol == 1e-3, "ms/direction"].iloc[0] * 1e3
    text = table.to_string(index=False, float_format=lambda v: f"{v:.4g}")
    notes = (
        f"One batched forward pass over the {len(X)} held-out digits (one parameter vector): "
        f"{1e3 * forward:.3f} ms. k = {k} directions per tolerance (baseline: {k_base}). "
        f"Seconds per direction, baseline at rtol 1e-2 / volsk at rtol 1e-2: {speedup:.1f}x; "
        f"/ volsk at rtol 1e-3: {speedup3:.1f}x. The Taylor JVP counts as one evaluation."
    )
    print(text)
    print(notes)
    append_results("Radius search on the digits MLP" + (" (quick)" if args.quick else ""),
                   text, notes)


if __name__ == "__main__":
    main()
