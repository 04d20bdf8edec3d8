"""Preconditioners on the digits MLP: log-volume, spread and cost per preconditioner and eps.

The setup of DESIGN §5: ``train_digits_mlp()`` (64-64-10 GELU, 4810 parameters), KL cost on the
773 held-out digits, cutoff 1e-2, Gaussian prior σ = ``prior_sigma()``. Each preconditioner's
curvature is computed once; every eps of the grid re-uses it and the same k directions
(same seed), so rows differ only by P. One torch thread.

    python benchmarks/preconditioners.py            # k = 300 directions per (preconditioner, eps)
    python benchmarks/preconditioners.py --quick    # k = 30
    python benchmarks/preconditioners.py --exponent 0.25 --only adam adam_m1 diag_hessian hesscale

The "best eps" row of each preconditioner is the maximum over the grid on the same directions,
so it is biased upwards by at most a few nats (the maximum of 6 estimates); the pilot column
shows what ``preconditioner_eps="auto"`` (``select_eps``, 32 fresh directions per eps) picks.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results  # noqa: E402

from volsk._engine import estimate_directions, prepare_problem  # noqa: E402
from volsk.experiments.digits import prior_sigma, train_digits_mlp  # noqa: E402
from volsk.measures import Gaussian  # noqa: E402
from volsk.preconditioners import resolve_preconditioner, select_eps  # noqa: E402
from volsk.results import summarise_samples, to_log10  # noqa: E402

CUTOFF = 1e-2
DEFAULT_EPS = 1e-3
GRID = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
NAMES = ("naive", "adam", "adam_m1", "diag_hessian", "hesscale", "hessian", "fisher")


def summarise(records, seconds):
    row = summarise_samples(records["log_volume"], records["evaluations"])
    row["evals/dir"] = row.pop("evaluations_per_direction")
    return {**row, "log10": to_log10(row["log_volume"]), "seconds": seconds}


def run_one(name, run, X, k, seed, grid, exponent=0.5):
    """Curvature once, then k directions at each eps of the grid."""
    start = time.perf_counter()
    problem = prepare_problem(
        run.model, X, cost="kl", output="logits", cutoff=CUTOFF, rtol=1e-3,
        measure=Gaussian(sigma=prior_sigma()), preconditioner=resolve_preconditioner(name),
        eps=grid[0], exponent=exponent, device="cpu", batch_size=None, n_directions=k,
        optimizer=run.optimizer, random_state=seed,
    )
    prepare_seconds = time.perf_counter() - start
    rows = []
    for eps in grid if name != "naive" else (float("nan"),):
        bound = problem.preconditioner if name == "naive" else problem.preconditioner.with_eps(eps)
        candidate = replace(problem, preconditioner=bound)
        start = time.perf_counter()
        records = estimate_directions(candidate, range(k), seed)
        row = {"preconditioner": name, "eps": eps,
               **summarise(records, time.perf_counter() - start)}
        row["curvature_s"] = prepare_seconds
        rows.append(row)
    pilot = select_eps(problem, grid=grid, n_directions=32, random_state=seed).eps
    return rows, pilot


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="k = 30 instead of 300")
    parser.add_argument("-k", type=int, default=None, help="directions per (preconditioner, eps)")
    parser.add_argument("--only", nargs="*", default=None, choices=NAMES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exponent", type=float, default=0.5,
                        help="preconditioner_exponent: P ∝ 1/(|h|^exponent + eps)")
    parser.add_argument("--no-append", action="store_true", help="do not write RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    k = args.k or (30 if args.quick else 300)
    names = args.only or NAMES

    run = train_digits_mlp()
    X = run.splits.X_test
    all_rows, pilots = [], {}
    for name in names:
        rows, pilot = run_one(name, run, X, k, args.seed, GRID, args.exponent)
        all_rows.extend(rows)
        pilots[name] = pilot
        best = max(rows, key=lambda r: r["log_volume"])
        print(f"{name:>13}: best eps {best['eps']:g} → {best['log_volume']:.1f} nats "
              f"(curvature {rows[0]['curvature_s']:.1f} s)", flush=True)
    grid_frame = pd.DataFrame(all_rows)

    summary = []
    for name in names:
        part = grid_frame[grid_frame["preconditioner"] == name]
        best = part.loc[part["log_volume"].idxmax()]
        default = part[np.isclose(part["eps"], DEFAULT_EPS)] if name != "naive" else part
        for label, row in (("1e-3", default.iloc[0]), ("best", best)):
            if name == "naive" and label == "best":
                continue
            summary.append({
                "preconditioner": name,
                "eps": "-" if name == "naive" else f"{row['eps']:g}"
                + (" (best)" if label == "best" else ""),
                "log_volume": row["log_volume"],
                "log10": row["log10"],
                "max_sample": row["max_sample"],
                "median_sample": row["median_sample"],
                "ESS": row["ess"],
                "evals/dir": row["evals/dir"],
                "seconds": row["curvature_s"] + row["seconds"],
                "auto picks": "-" if pilots[name] is None else f"{pilots[name]:g}",
            })
    table = pd.DataFrame(summary).to_string(
        index=False, float_format=lambda v: f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}")
    pivot = grid_frame[grid_frame["preconditioner"] != "naive"].pivot(
        index="preconditioner", columns="eps", values="log_volume")
    pivot = pivot.reindex([n for n in names if n != "naive"])
    pivot_text = pivot.to_string(float_format=lambda v: f"{v:.0f}")
    print()
    print(table)
    print()
    print("log-volume (nats) by eps:")
    print(pivot_text)

    if not args.no_append:
        notes = (
            f"k = {k} directions per (preconditioner, eps), the same directions (seed "
            f"{args.seed}) at every eps; KL cutoff {CUTOFF} on the {X.shape[0]} held-out digits, "
            f"Gaussian prior σ = {prior_sigma():.4f}; rtol 1e-3. `seconds` = curvature (once per "
            "preconditioner) + sampling at that eps. `auto picks` = the eps that "
            "`select_eps` (32 pilot directions per eps, separate seed) chooses. Flat parameters "
            "(weights of always-zero pixels) are integrated out exactly, which the paper did "
            "not do.\n\nlog-volume (nats) by eps:\n\n```\n" + pivot_text + "\n```"
        )
        title = "Preconditioners on the digits MLP" + (" (quick)" if args.quick else "")
        if args.exponent != 0.5:
            title += f", preconditioner_exponent={args.exponent:g}"
        append_results(title, table, notes)


if __name__ == "__main__":
    main()
