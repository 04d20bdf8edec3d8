"""Preconditioners on the digits MLP: log-volume, spread and cost per preconditioner and eps.

The paper's setup: ``train_digits_mlp()`` (64-64-10 GELU, 4810 parameters), KL cost on the
773 held-out digits, cutoff 1e-2, Gaussian prior σ = ``prior_sigma()``. Every eps of the grid
uses the same k directions (same seed), so rows differ only by P. Public API only: each row is
one ``LocalVolumeEstimator.fit`` (the curvature is recomputed per fit). One torch thread.

    python benchmarks/preconditioners.py            # k = 300 directions per (preconditioner, eps)
    python benchmarks/preconditioners.py --quick    # k = 30
    python benchmarks/preconditioners.py --exponent 0.25 --only adam adam_m1 diag_hessian hesscale
    python benchmarks/preconditioners.py --headline   # k = 3000, seeds 0, 1, 2, the defaults

``--headline``: each preconditioner as a user gets it (``preconditioner_eps="auto"``), with
exponent 0.5 and with ``preconditioner_exponent="auto"``, at k = 3000 for seeds 0, 1 and 2:
the mean and spread of the three estimates, the pilots' cost in evaluations (eps pilot,
boundary pilot, search pilot) against the directions', and the whole fit's seconds.

The "best eps" row of each preconditioner is the maximum over the grid on the same directions,
so it is biased upwards by at most a few nats (the maximum of 6 estimates); the pilot column
shows what ``preconditioner_eps="auto"`` (a pilot with a seed stream of its own) picks. The
"auto, p=…" row of each preconditioner is a fit with ``preconditioner_eps="auto"`` and
``preconditioner_exponent="auto"`` (exponent and eps chosen by the pilot; the same k
directions), its choice in the label.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results  # noqa: E402

from volsk import LocalVolumeEstimator  # noqa: E402
from volsk.experiments.digits import prior_sigma, train_digits_mlp  # noqa: E402
from volsk.results import (  # noqa: E402
    LowEffectiveSampleSizeWarning,
    summarise_samples,
    to_log10,
)

CUTOFF = 1e-2
DEFAULT_EPS = 1e-3
GRID = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
NAMES = ("naive", "adam", "adam_m1", "diag_hessian", "hesscale", "hessian", "fisher", "kfac",
         "lowrank", "boundary")


def fit(name, run, X, k, seed, eps, exponent):
    """One estimate through the public API; the fitted estimator and its wall time."""
    est = LocalVolumeEstimator(
        CUTOFF, "gaussian", None if name == "naive" else name, k, sigma=prior_sigma(),
        preconditioner_eps=eps, preconditioner_exponent=exponent, rtol=1e-3,
        random_state=seed)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LowEffectiveSampleSizeWarning)  # ESS is a column
        est.fit(run.model, X, optimizer=run.optimizer)
    return est, time.perf_counter() - start


def summarise(est, seconds):
    samples = est.samples_
    row = summarise_samples(samples["log_volume"], samples["evaluations"])
    row["evals/dir"] = row.pop("evaluations_per_direction")
    return {**row, "log10": to_log10(row["log_volume"]), "seconds": seconds}


def run_one(name, run, X, k, seed, grid, exponent=0.5):
    """k directions (the same ones) at each eps of the grid, and the "auto" choice."""
    rows = []
    for eps in grid if name != "naive" else (DEFAULT_EPS,):
        est, seconds = fit(name, run, X, k, seed, eps, exponent)
        rows.append({"preconditioner": name, "eps": float("nan") if name == "naive" else eps,
                     **summarise(est, seconds)})
    if name == "naive":
        return rows, None, None
    auto, _ = fit(name, run, X, k, seed, "auto", exponent)
    both, seconds = fit(name, run, X, k, seed, "auto", "auto")  # exponent chosen with eps
    chosen = {"preconditioner": name, "eps": both.preconditioner_eps_,
              "exponent": both.preconditioner_exponent_, **summarise(both, seconds)}
    return rows, auto.preconditioner_eps_, chosen


def headline(names, run, X, k, seeds, append):
    """Each preconditioner with its defaults, exponent 0.5 and "auto", over several seeds."""
    rows = []
    for name in names:
        for exponent in (0.5, "auto"):
            if name == "naive" and exponent == "auto":
                continue
            fits = [fit(name, run, X, k, seed, "auto", exponent) for seed in seeds]
            values = np.array([est.log_volume_ for est, _ in fits])
            chosen = sorted({(est.preconditioner_exponent_, est.preconditioner_eps_)
                             for est, _ in fits}, key=str)
            rows.append({
                "preconditioner": name,
                "exponent": "-" if name == "naive" else str(exponent),
                "mean": values.mean(),
                "spread": np.ptp(values),
                "seeds": " ".join(f"{v:.0f}" for v in values),
                "ESS": np.mean([est.effective_sample_size_ for est, _ in fits]),
                "chosen (p, eps)": "-" if name == "naive" else "; ".join(
                    f"{p:g}, {e:.2g}" for p, e in chosen),
                "pilot evals": np.mean([est.n_pilot_evaluations_
                                        + (0 if est.eps_pilot_ is None else float(
                                            (est.eps_pilot_["directions"]
                                             * est.eps_pilot_["evaluations_per_direction"]
                                             ).sum()))
                                        for est, _ in fits]),
                "direction evals": np.mean([est.n_evaluations_ for est, _ in fits]),
                "seconds": np.mean([seconds for _, seconds in fits]),
            })
            r = rows[-1]
            print(f"{name:>13} p={r['exponent']:>4}: mean {r['mean']:.1f}, spread "
                  f"{r['spread']:.1f} ({r['seeds']})", flush=True)
    table = pd.DataFrame(rows).to_string(
        index=False, float_format=lambda v: f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}")
    print()
    print(table)
    if append:
        notes = (
            f"k = {k} directions, seeds {', '.join(map(str, seeds))} (the same seeds for every "
            f"row); KL cutoff {CUTOFF} on the {X.shape[0]} held-out digits, Gaussian prior σ = "
            f"{prior_sigma():.4f}, rtol 1e-3, `preconditioner_eps=\"auto\"`. `exponent` 0.5 "
            "(the default) or \"auto\" (the pilot compares 0.25, 0.5 and 1). `pilot evals`: "
            "cost evaluations of the eps pilot + the boundary pilot + the search pilot, per fit; "
            "`direction evals`: the k directions'. `seconds`: one whole fit (curvature "
            "included), one torch thread, on a shared machine."
        )
        append_results(f"Preconditioners on the digits MLP at k = {k}, {len(seeds)} seeds",
                       table, notes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="k = 30 instead of 300")
    parser.add_argument("-k", type=int, default=None, help="directions per (preconditioner, eps)")
    parser.add_argument("--only", nargs="*", default=None, choices=NAMES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exponent", type=float, default=0.5,
                        help="preconditioner_exponent: P ∝ 1/(|h|^exponent + eps)")
    parser.add_argument("--no-append", action="store_true", help="do not write RESULTS.md")
    parser.add_argument("--headline", action="store_true",
                        help="k = 3000 (or -k), seeds 0 1 2, eps auto, exponent 0.5 and auto")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    k = args.k or (30 if args.quick else 3000 if args.headline else 300)
    names = args.only or NAMES

    run = train_digits_mlp()
    if args.headline:
        headline(names, run, run.splits.X_test, k, (0, 1, 2), not args.no_append)
        return
    X = run.splits.X_test
    all_rows, pilots, auto_exponent = [], {}, {}
    for name in names:
        rows, pilot, chosen = run_one(name, run, X, k, args.seed, GRID, args.exponent)
        all_rows.extend(rows)
        pilots[name] = pilot
        auto_exponent[name] = chosen
        best = max(rows, key=lambda r: r["log_volume"])
        print(f"{name:>13}: best eps {best['eps']:g} → {best['log_volume']:.1f} nats "
              f"({sum(r['seconds'] for r in rows):.1f} s)", flush=True)
    grid_frame = pd.DataFrame(all_rows)

    summary = []
    for name in names:
        part = grid_frame[grid_frame["preconditioner"] == name]
        best = part.loc[part["log_volume"].idxmax()]
        default = part[np.isclose(part["eps"], DEFAULT_EPS)] if name != "naive" else part
        chosen = auto_exponent[name]
        labelled = [("1e-3", default.iloc[0]), ("best", best)]
        if chosen is not None:
            labelled.append(("auto", chosen))
        for label, row in labelled:
            if name == "naive" and label == "best":
                continue
            eps_label = f"{row['eps']:g}" + (" (best)" if label == "best" else "")
            if label == "auto":
                eps_label = f"auto, p={row['exponent']:g}: {row['eps']:g}"
            summary.append({
                "preconditioner": name,
                "eps": "-" if name == "naive" else eps_label,
                "log_volume": row["log_volume"],
                "log10": row["log10"],
                "max_sample": row["max_sample"],
                "median_sample": row["median_sample"],
                "ESS": row["ess"],
                "evals/dir": row["evals/dir"],
                "seconds": row["seconds"],
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
            f"Gaussian prior σ = {prior_sigma():.4f}; rtol 1e-3. `seconds` = the whole fit at that "
            "eps (curvature included). `auto picks` = the eps that "
            "`preconditioner_eps=\"auto\"` chooses (its pilot has a seed of its own). Rows "
            "`auto, p=…`: a fit with `preconditioner_exponent=\"auto\"` and "
            "`preconditioner_eps=\"auto\"` (the exponent p and eps it chose; its pilot tries "
            "exponents 0.25, 0.5 and 1, each with its eps search). Flat "
            "parameters (weights of always-zero pixels) are integrated out exactly, which the "
            "paper did not do.\n\nlog-volume (nats) by eps:\n\n```\n" + pivot_text + "\n```"
        )
        title = "Preconditioners on the digits MLP" + (" (quick)" if args.quick else "")
        if args.exponent != 0.5:
            title += f", preconditioner_exponent={args.exponent:g}"
        append_results(title, table, notes)


if __name__ == "__main__":
    main()
