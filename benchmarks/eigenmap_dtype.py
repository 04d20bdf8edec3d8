"""The full-Hessian map applied in the model's dtype: what it changes and what it saves.

``EigenMap`` (the "hessian" and "fisher" preconditioners) applies P = V diag(d) Vᵀ as two
(B, n) × (n, n) products per block of directions. For a float32 model it runs them in float32
and accumulates |P g| and the log-weight −n·log|P g| in float64; before, they ran in float64.
On the digits MLP (64-64-10 GELU, KL on the 773 held-out digits, cutoff 1e-2, Gaussian prior
σ = ``prior_sigma()``, "hessian" at eps 1e-2, exponent 0.5) this script estimates with both
(the same curvature, the same k directions, seed 0) and reports the change in the
log-weights and per-direction log-volumes, the estimate of each, and the time the map takes
per direction (blocks of 64 directions, as the CPU sampler draws them). One torch thread.

    python benchmarks/eigenmap_dtype.py            # k = 300
    python benchmarks/eigenmap_dtype.py --quick    # k = 30
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results  # noqa: E402

from volsk._pipeline import calibrate_search, estimate_directions  # noqa: E402
from volsk._problem import prepare_problem  # noqa: E402
from volsk._sampling import SETUP_ROWS  # noqa: E402
from volsk.experiments.digits import prior_sigma, train_digits_mlp  # noqa: E402
from volsk.measures import Gaussian  # noqa: E402
from volsk.preconditioners import EigenMap, Hessian  # noqa: E402
from volsk.results import aggregate_log_volume  # noqa: E402

CUTOFF = 1e-2
EPS = 1e-2  # the hessian's best eps on this model (the preconditioners section)
UNIT_ROUNDOFF = 2.0**-24  # float32
FIT_REPEATS = 2


def map_seconds_per_direction(P, n, repeats, seed=0):
    """Wall time of ``P.apply`` per direction, on blocks of ``SETUP_ROWS`` unit rows: the
    fastest of ``repeats`` calls (the machine may be shared)."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(SETUP_ROWS, n, generator=gen, dtype=torch.float64)
    G /= torch.linalg.vector_norm(G, dim=1, keepdim=True)
    P.apply(G)  # the cast of V to the map's dtype is made once, outside the timing
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        P.apply(G)
        best = min(best, time.perf_counter() - start)
    return best / SETUP_ROWS


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="k = 30 instead of 300")
    parser.add_argument("-k", type=int, default=None, help="directions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-append", action="store_true", help="do not write RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    k = args.k or (30 if args.quick else 300)

    run = train_digits_mlp()
    X = run.splits.X_test
    began = time.perf_counter()
    problem = prepare_problem(
        run.model, X, cost="kl", output="logits", cutoff=CUTOFF, rtol=1e-3,
        measure=Gaussian(sigma=prior_sigma()), preconditioner=Hessian(), eps=EPS, exponent=0.5,
        device="cpu", batch_size=None, n_directions=k, random_state=args.seed)
    curvature_seconds = time.perf_counter() - began
    model_map = problem.preconditioner
    assert model_map.dtype == torch.float32, model_map.dtype  # a float32 model
    maps = {
        "float64 (before)": EigenMap(model_map.eigenvalues, model_map.eigenvectors,
                                     model_map.eps, model_map.exponent, dtype=torch.float64),
        "float32 (model dtype)": model_map,
    }
    n = model_map.n
    records, rows = {}, []
    for label, P in maps.items():
        bound = replace(problem, preconditioner=P)
        seconds = np.inf
        for _ in range(FIT_REPEATS):  # the faster of two: the machine may be shared
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ESS ≈ 1 is expected here
                search = calibrate_search(bound, args.seed)
                rec = estimate_directions(bound, range(k), args.seed, start=search)
            seconds = min(seconds, time.perf_counter() - start)
        records[label] = rec
        rows.append({
            "map dtype": label,
            "log_volume": aggregate_log_volume(rec.log_volume),
            "max_sample": float(np.max(rec.log_volume)),
            "map ms/dir": 1e3 * map_seconds_per_direction(P, n, repeats=10),
            "fit ms/dir": 1e3 * seconds / k,
            "evals/dir": float(np.mean(rec.evaluations)),
        })
        print(f"{label}: {rows[-1]['log_volume']:.3f} nats, map {rows[-1]['map ms/dir']:.2f} "
              f"ms/dir", flush=True)
    ref, new = records["float64 (before)"], records["float32 (model dtype)"]
    d_log_w = np.abs(new.log_weight - ref.log_weight)
    d_sample = np.abs(new.log_volume - ref.log_volume)
    for row in rows:
        ours = row["map dtype"] == "float32 (model dtype)"
        row["max |Δ log w|"] = float(d_log_w.max()) if ours else 0.0
        row["max |Δ sample|"] = float(d_sample.max()) if ours else 0.0
    table = pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.4g}")
    print()
    print(table)
    if not args.no_append:
        notes = (
            f"Digits MLP, \"hessian\" at eps {EPS:g}, exponent 0.5, n = {n} active coordinates "
            f"(flat ones integrated out); KL cutoff {CUTOFF} on the {X.shape[0]} held-out "
            f"digits, σ = {prior_sigma():.4f}; k = {k} directions (seed {args.seed}), the same "
            "curvature and directions for both rows. `max |Δ log w|`: the largest change of an "
            "importance log-weight −n·log|P g| against the float64 map (n·u = "
            f"{n * UNIT_ROUNDOFF:.1e} nats for float32's unit roundoff u = 2⁻²⁴); `max |Δ "
            "sample|`: of a per-direction log-volume (the radius search can also land "
            "elsewhere within rtol). `map ms/dir`: P.apply on blocks of "
            f"{SETUP_ROWS} directions (the fastest of 10 calls); `fit ms/dir`: search pilot "
            f"and directions, per direction (the faster of {FIT_REPEATS} runs). The "
            f"curvature (Hessian and its eigendecomposition, shared) took "
            f"{curvature_seconds:.1f} s."
        )
        append_results("The full-Hessian map in the model's dtype" + (
            " (quick)" if args.quick else ""), table, notes)


if __name__ == "__main__":
    main()
