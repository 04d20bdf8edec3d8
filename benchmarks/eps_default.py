"""The default ``preconditioner_eps``: "auto" against the old fixed 1e-3, a spectrum rule and naive.

Three models, each with the Adam state that trained it and its exact diagonal Hessian:

- ``digits64``: the digits MLP of the paper (64-64-10 GELU, 4810 parameters), KL on the 773
  held-out digits, σ = ``prior_sigma()``;
- ``digits32``: the same recipe at hidden width 32 (2410 parameters);
- ``cancer``: a tanh MLP 30-64-2 (2114 parameters) on scikit-learn's breast-cancer data
  (standardised, 70/30 stratified split, Adam lr 1e-2 for 300 full-batch steps), KL on the 171
  held-out examples, σ the estimator's default ("auto", the RMS of θ).

Each (model, preconditioner) is fitted with the public ``LocalVolumeEstimator`` at
``n_samples=100`` (the default) for random_state 0, 1, 2: at eps = 1e-3 (the old default), at
the new default ``"auto"``, at the spectrum rule eps = median over parameters of |h|^0.5 (the
curvature's own scale; read from the bound problem, the one place this script looks inside
volsk), and without a preconditioner. Log-volumes are reported as mean ± standard deviation over
the seeds. ``pilot/fit evals`` is the eps pilot's cost evaluations (from ``eps_pilot_``: rows ×
directions × evaluations per direction) over the estimate's (``n_evaluations_`` plus the
search pilot's ``n_pilot_evaluations_``); ``auto s / 1e-3 s`` compares the fits' wall times.
One torch thread.

    python benchmarks/eps_default.py            # 3 models × {adam, diag_hessian} × 3 seeds
    python benchmarks/eps_default.py --quick    # digits64 only, one seed
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results  # noqa: E402

from volsk import LocalVolumeEstimator  # noqa: E402
from volsk._problem import prepare_problem  # noqa: E402
from volsk.experiments.digits import prior_sigma, train_digits_mlp  # noqa: E402
from volsk.measures import Gaussian  # noqa: E402
from volsk.preconditioners import resolve_preconditioner  # noqa: E402

CUTOFF = 1e-2
OLD_DEFAULT = 1e-3
N_SAMPLES = 100
PRECONDITIONERS = ("adam", "diag_hessian")


def cancer_mlp(seed=0, hidden=64, steps=300):
    """A tanh MLP trained with Adam on the breast-cancer data: (model, optimizer, X_test)."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = load_breast_cancer(return_X_y=True)
    X_train, X_test, y_train, _ = train_test_split(X, y, test_size=0.3, random_state=0,
                                                   stratify=y)
    scaler = StandardScaler().fit(X_train)
    X_train = torch.as_tensor(scaler.transform(X_train), dtype=torch.float32)
    X_test = torch.as_tensor(scaler.transform(X_test), dtype=torch.float32)
    y_train = torch.as_tensor(y_train)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(30, hidden), nn.Tanh(), nn.Linear(hidden, 2))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(X_train), y_train).backward()
        optimizer.step()
    return net, optimizer, X_test


def models(quick):
    run = train_digits_mlp()
    yield "digits64", run.model, run.optimizer, run.splits.X_test, prior_sigma()
    if quick:
        return
    run = train_digits_mlp(hidden=32)
    yield "digits32", run.model, run.optimizer, run.splits.X_test, prior_sigma()
    net, optimizer, X = cancer_mlp()
    yield "cancer", net, optimizer, X, "auto"


def spectrum_eps(model, X, optimizer, sigma, name):
    """eps = median of |h|^0.5 over the active parameters (the curvature's own scale)."""
    if sigma == "auto":
        sigma = float(torch.cat([p.detach().flatten() for p in model.parameters()])
                      .pow(2).mean().sqrt())
    problem = prepare_problem(
        model, X, cost="kl", output="logits", cutoff=CUTOFF, rtol=1e-3,
        measure=Gaussian(sigma=sigma), preconditioner=resolve_preconditioner(name), eps=1.0,
        exponent=0.5, device="cpu", batch_size=None, n_directions=N_SAMPLES,
        optimizer=optimizer, random_state=0)
    return float(problem.preconditioner.curvature.abs().sqrt().median())


def fit(model, X, optimizer, sigma, seed, **params):
    start = time.perf_counter()
    est = LocalVolumeEstimator(CUTOFF, sigma=sigma, n_samples=N_SAMPLES, random_state=seed,
                               **params).fit(model, X, optimizer=optimizer)
    return est, time.perf_counter() - start


def pilot_evaluations(est):
    table = est.eps_pilot_
    if table is None or table.empty:
        return 0.0
    return float((table["evaluations_per_direction"] * table["directions"]).sum())


def mean_sd(values):
    values = np.asarray(values, dtype=np.float64)
    sd = values.std(ddof=1) if values.size > 1 else 0.0
    return f"{values.mean():.0f} ± {sd:.0f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits64 only, one seed")
    parser.add_argument("--no-append", action="store_true", help="do not write RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = (0,) if args.quick else (0, 1, 2)
    started = time.perf_counter()

    rows = []
    for model_name, model, optimizer, X, sigma in models(args.quick):
        naive = [fit(model, X, optimizer, sigma, seed)[0] for seed in seeds]
        n_parameters = naive[0].n_parameters_
        for name in PRECONDITIONERS:
            eps_spectrum = spectrum_eps(model, X, optimizer, sigma, name)
            old, auto, spectrum, ratios, seconds = [], [], [], [], []
            for seed in seeds:
                est_old, s_old = fit(model, X, optimizer, sigma, seed, preconditioner=name,
                                     preconditioner_eps=OLD_DEFAULT)
                est_auto, s_auto = fit(model, X, optimizer, sigma, seed, preconditioner=name)
                est_spec, _ = fit(model, X, optimizer, sigma, seed, preconditioner=name,
                                  preconditioner_eps=eps_spectrum)
                old.append(est_old)
                auto.append(est_auto)
                spectrum.append(est_spec)
                fit_evals = est_auto.n_evaluations_ + est_auto.n_pilot_evaluations_
                ratios.append(pilot_evaluations(est_auto) / fit_evals)
                seconds.append(s_auto / s_old)
            gain = np.mean([a.log_volume_ - o.log_volume_ for a, o in zip(auto, old)])
            rows.append({
                "model": f"{model_name} ({n_parameters})",
                "preconditioner": name,
                "naive": mean_sd([e.log_volume_ for e in naive]),
                "eps 1e-3": mean_sd([e.log_volume_ for e in old]),
                "auto": mean_sd([e.log_volume_ for e in auto]),
                "auto - 1e-3": f"{gain:+.0f}",
                "auto eps per seed": " ".join(f"{e.preconditioner_eps_:.1e}" for e in auto),
                "spectrum": mean_sd([e.log_volume_ for e in spectrum]),
                "spectrum eps": f"{eps_spectrum:.1e}",
                "evals/dir 1e-3": f"{np.mean([e.n_evaluations_ for e in old]) / N_SAMPLES:.2f}",
                "evals/dir auto": f"{np.mean([e.n_evaluations_ for e in auto]) / N_SAMPLES:.2f}",
                "pilot/fit evals": f"{np.mean(ratios):.2f}",
                "auto s / 1e-3 s": f"{np.mean(seconds):.2f}",
            })
            print(rows[-1], flush=True)
    frame = pd.DataFrame(rows)
    with pd.option_context("display.width", 250, "display.max_columns", None):
        table = frame.to_string(index=False)
    print()
    print(table)
    total = time.perf_counter() - started
    print(f"\n{total:.0f} s in all")

    if not args.no_append:
        notes = (
            f"n_samples = {N_SAMPLES} (the default) per fit; random_state {list(seeds)}; KL "
            f"cutoff {CUTOFF}; log-volumes in nats, mean ± sd over the seeds. `auto` is the "
            "default `preconditioner_eps=\"auto\"`: coarse grid 1, 1e-2, 1e-4, 1e-6 (extended "
            "past a winning end), then the winner × 10^±1/2, × 10^±1, 8 pilot directions per "
            "eps, the largest eps within log(8/0.05) ≈ 5.1 nats of the best pilot. `spectrum` "
            "= a fixed eps at the median of |h|^0.5. `pilot/fit evals` = eps-pilot "
            "evaluations over the estimate's (its directions + search pilot); `auto s / 1e-3 s`"
            f" = wall time of the auto fit over the fixed-eps fit. {total:.0f} s in all."
        )
        append_results("The default preconditioner_eps" + (" (quick)" if args.quick else ""),
                       table, notes)


if __name__ == "__main__":
    main()
