"""Radius search on the digits MLP: cost evaluations and time per direction.

volsk's batched search (every ray starts at the search pilot's median radius and steps with the
pilot's log–log growth, then Illinois regula falsi in log–log space; all directions of a batch
in one vmapped forward) against the classic search: doubling then bisection, one direction at
a time. One torch thread.

Timing follows ``timeit``: each measurement is the minimum over ``--repeats`` runs, the runs
of all measurements interleaved round-robin (so that the host's drifting speed reaches all of
them alike), with the garbage collector off while they run (a full collection of the ~400 000
objects a torch process holds takes ~0.2 s and lands in whichever run triggers it). Both
wall-clock and process CPU time are reported; on a shared virtual machine the wall clock also
counts time stolen by other guests, CPU time does not.

    python benchmarks/radius_search.py            # k = 300 directions per tolerance
    python benchmarks/radius_search.py --quick    # k = 60
"""

from __future__ import annotations

import argparse
import gc
import os
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
from volsk.results import LowEffectiveSampleSizeWarning  # noqa: E402

CUTOFF = 1e-2
RTOLS = (1e-2, 1e-3, 1e-6)
K_PAPER = 3000  # the paper's number of directions


class Forward:
    """One plain forward pass, ``model(X)`` under no_grad, timed next to every measurement."""

    def __init__(self, model, X, calls=100):
        self.model, self.X, self.calls = model, X, calls
        self.walls, self.cpus = [], []
        self()

    def __call__(self):
        with torch.no_grad():
            w, c = time.perf_counter(), time.process_time()
            for _ in range(self.calls):
                self.model(self.X)
            cpu, wall = time.process_time() - c, time.perf_counter() - w
        self.cpus.append(cpu / self.calls)
        self.walls.append(wall / self.calls)
        return wall / self.calls, cpu / self.calls


def timed_round_robin(jobs, repeats, forward):
    """Run every job of ``jobs`` ({name: fn}) ``repeats`` times, round-robin (job 1, job 2, …,
    then job 2, job 3, …, job 1, and so on), each run right after timing one forward pass.
    The machine's speed drifts over minutes on a shared host: interleaving spreads every job
    over the whole benchmark instead of giving each its own few minutes, and pairing each run
    with its own forward gives a second, drift-free ratio.

    Returns {name: (last result, min wall s, min CPU s, median of per-run CPU ratios
    run/forward, median of per-run wall ratios)}.
    """
    runs = {name: ([], [], [], []) for name in jobs}
    out = {}
    gc.collect()
    gc.disable()
    try:
        names = list(jobs)
        for i in range(repeats):
            # each round starts one job later, so that no job always follows the same one
            # (the first fit used to run right after the baseline's one-direction loop)
            for name in names[i % len(names):] + names[: i % len(names)]:
                fn = jobs[name]
                walls, cpus, r_cpu, r_wall = runs[name]
                f_wall, f_cpu = forward()
                w, c = time.perf_counter(), time.process_time()
                out[name] = fn()
                cpus.append(time.process_time() - c)
                walls.append(time.perf_counter() - w)
                r_cpu.append(cpus[-1] / f_cpu)
                r_wall.append(walls[-1] / f_wall)
    finally:
        gc.enable()
    return {name: (out[name], min(w), min(c), float(np.median(rc)), float(np.median(rw)))
            for name, (w, c, rc, rw) in runs.items()}


class KLAlongRays:
    """The KL cost at θ + r·u, written with torch alone (no volsk internals): the baseline's
    evaluation, one parameter vector per forward pass."""

    def __init__(self, model, X):
        self.model, self.X = model, X
        self.names = [k for k, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shapes = [params[k].shape for k in self.names]
        self.theta = torch.cat([params[k].detach().reshape(-1) for k in self.names])
        with torch.no_grad():
            self.log_p0 = torch.log_softmax(model(X), -1)

    def __call__(self, flat):
        pieces = torch.split(flat, [int(np.prod(s)) for s in self.shapes])
        params = {k: v.reshape(s) for k, v, s in zip(self.names, pieces, self.shapes)}
        with torch.no_grad():
            log_q = torch.log_softmax(torch.func.functional_call(self.model, params, self.X), -1)
            return float((self.log_p0.exp() * (self.log_p0 - log_q)).sum(-1).mean())


def doubling_bisection(cost, u, rtol, r0=1e-2, max_iter=200):
    """The classic search: double until crossed, then bisect; one forward per evaluation."""
    evals = 0

    def c(r):
        nonlocal evals
        evals += 1
        return cost(cost.theta + r * u)

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
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", LowEffectiveSampleSizeWarning)  # timing, not accuracy
    k = 60 if args.quick else 300
    k_base = 20 if args.quick else 60
    repeats = args.repeats
    load_before = os.getloadavg()[0]

    run = train_digits_mlp(seed=0)
    X = run.splits.X_test
    forward = Forward(run.model, X)

    # every timed job, run round-robin below; fits at k and, for the per-fit costs (problem
    # preparation, search pilot) spread over more directions, at the paper's k = 3000
    fits = [(rtol, k) for rtol in RTOLS]
    if not args.quick:
        fits += [(1e-2, K_PAPER), (1e-3, K_PAPER)]
    jobs, ests = {}, {}
    for rtol, kk in fits:
        est = LocalVolumeEstimator(CUTOFF, "gaussian", sigma=prior_sigma(), n_samples=kk,
                                   rtol=rtol, random_state=0)
        est.fit(run.model, X)  # warm-up (first vmap traces are slower)
        ests[rtol, kk] = est
        jobs[("fit", rtol, kk)] = lambda est=est: est.fit(run.model, X)

    # the baseline: one direction at a time, doubling + bisection, uniform directions drawn
    # as volsk draws them (direction i from numpy's PCG64 seeded by (0, i))
    cost = KLAlongRays(run.model, X)
    U = []
    for i in range(k_base):
        g = torch.from_numpy(np.random.default_rng([0, i]).standard_normal(cost.theta.numel()))
        U.append((g / g.norm()).to(cost.theta.dtype))

    def baseline():
        return [doubling_bisection(cost, U[i], 1e-2)[1] for i in range(k_base)]

    jobs[("baseline", 1e-2)] = baseline
    results = timed_round_robin(jobs, repeats, forward)

    rows = []
    for rtol, kk in fits:
        est = ests[rtol, kk]
        _, wall, cpu, r_cpu, r_wall = results[("fit", rtol, kk)]
        evals = est.n_evaluations_ / kk
        pilot = est.n_pilot_evaluations_ / kk
        rows.append({
            "search": "volsk fit (pilot start)",
            "k": kk,
            "rtol": rtol,
            "evals/dir": evals,
            "+pilot evals/dir": pilot,
            "ms/dir wall": 1e3 * wall / kk,
            "ms/dir CPU": 1e3 * cpu / kk,
            "CPU / (evals x fwd)": cpu / kk / evals / min(forward.cpus),
            "(paired median)": r_cpu / kk / evals,
            "CPU / ((evals+pilot) x fwd)": cpu / kk / (evals + pilot) / min(forward.cpus),
            "wall / (evals x fwd)": wall / kk / evals / min(forward.walls),
            "log_volume": est.log_volume_,
        })
    evals, wall, cpu, r_cpu, r_wall = results[("baseline", 1e-2)]
    base_evals = float(np.mean(evals))
    rows.append({
        "search": "baseline (doubling + bisection, 1 direction at a time)",
        "k": k_base,
        "rtol": 1e-2,
        "evals/dir": base_evals,
        "+pilot evals/dir": 0.0,
        "ms/dir wall": 1e3 * wall / k_base,
        "ms/dir CPU": 1e3 * cpu / k_base,
        "CPU / (evals x fwd)": cpu / k_base / base_evals / min(forward.cpus),
        "(paired median)": r_cpu / k_base / base_evals,
        "CPU / ((evals+pilot) x fwd)": cpu / k_base / base_evals / min(forward.cpus),
        "wall / (evals x fwd)": wall / k_base / base_evals / min(forward.walls),
        "log_volume": float("nan"),
    })
    table = pd.DataFrame(rows)
    # ratios to the fastest forward pass seen in the whole run
    fwd_cpu, fwd_wall = min(forward.cpus), min(forward.walls)
    evals_all = table["evals/dir"] + table["+pilot evals/dir"]
    table["CPU / (evals x fwd)"] = table["ms/dir CPU"] / 1e3 / table["evals/dir"] / fwd_cpu
    table["CPU / ((evals+pilot) x fwd)"] = table["ms/dir CPU"] / 1e3 / evals_all / fwd_cpu
    table["wall / (evals x fwd)"] = table["ms/dir wall"] / 1e3 / table["evals/dir"] / fwd_wall
    fmt = {"float_format": lambda v: f"{v:.4g}", "index": False}
    base = table.iloc[-1]
    volsk2 = table[(table.rtol == 1e-2) & (table.k == k)].iloc[0]
    volsk3 = table[(table.rtol == 1e-3) & (table.k == k)].iloc[0]
    text = table.to_string(**fmt)
    base_paired = base["(paired median)"] * base["evals/dir"]  # baseline CPU/dir, forwards

    def paired(row):
        return base_paired / (row["(paired median)"] * row["evals/dir"])

    notes = (
        f"One plain forward pass over the {len(X)} held-out digits (one parameter vector, "
        f"`model(X)` under no_grad), timed before every run: {1e3 * min(forward.cpus):.3f}–"
        f"{1e3 * max(forward.cpus):.3f} ms CPU during this benchmark. "
        f"k = {k} directions per tolerance, and k = {K_PAPER} (the paper's) at rtol 1e-2 "
        f"and 1e-3 (baseline: {k_base}). Times are the min over "
        f"{repeats} runs, interleaved round-robin, with the garbage collector off (timeit's "
        "convention); the ratios "
        "divide them by the min forward time; `(paired median)` is the median over runs of "
        "(run / the forward timed just before it), the same ratio measured another way. "
        "Seconds per direction, baseline at rtol 1e-2 / volsk at rtol 1e-2: "
        f"{base['ms/dir CPU'] / volsk2['ms/dir CPU']:.1f}x CPU "
        f"({base['ms/dir wall'] / volsk2['ms/dir wall']:.1f}x wall, {paired(volsk2):.1f}x "
        f"paired); / volsk at rtol 1e-3: {base['ms/dir CPU'] / volsk3['ms/dir CPU']:.1f}x "
        f"({base['ms/dir wall'] / volsk3['ms/dir wall']:.1f}x, {paired(volsk3):.1f}x). "
        + "".join(
            f"At k = {K_PAPER}, rtol {row.rtol:g}: {base['ms/dir CPU'] / row['ms/dir CPU']:.1f}x "
            f"({paired(row):.1f}x paired). "
            for _, row in table[table.k == K_PAPER].iterrows())
        + "The table times "
        "whole `fit` calls (preparation, flat-parameter check, search pilot, sampling, "
        "search, radial integrals) through the public API; `evals/dir` counts the directions' "
        "own evaluations, `+pilot evals/dir` the search pilot's spread over the k directions. "
        "The baseline evaluates the KL with torch.func.functional_call, one parameter vector "
        f"per forward pass. Load average (1 min) {load_before:.2f} "
        f"before, {os.getloadavg()[0]:.2f} after, on {os.cpu_count()} cores."
    )
    print(text)
    print(notes)
    append_results("Radius search on the digits MLP" + (" (quick)" if args.quick else ""),
                   text, notes)


if __name__ == "__main__":
    main()
