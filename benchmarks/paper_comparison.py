"""The paper's footing: k = 3000 directions on the digits MLP, and log-volume vs training length.

DESIGN §5 quotes the paper's code at k = 3000 on this set-up (naive ≈ −10 900, Adam ν ≈ −7 850,
diag H ≈ −7 940 nats). The aggregate of an importance-sampling estimate with ESS ≈ 1 is close to
its best sample, which grows with k, so the like-for-like comparison needs k = 3000 too. The
second table trains the same MLP for 1, 3, 10 and 25 epochs (each a full cosine schedule) and
estimates every net on the same held-out digits. One torch thread.

    python benchmarks/paper_comparison.py            # k = 3000 and k = 300 for the epochs table
    python benchmarks/paper_comparison.py --quick    # k = 300 and 100
    python benchmarks/paper_comparison.py --inputs train   # KL on the 1024 training digits
                                                            # (the footing of the paper's
                                                            # best-sample numbers), first table
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results  # noqa: E402

from volsk import LocalVolumeEstimator  # noqa: E402
from volsk.experiments.digits import prior_sigma, train_digits_mlp  # noqa: E402

CASES = [  # (preconditioner, exponent)
    ("naive", 0.5),
    ("adam", 0.5),
    ("adam", 0.25),
    ("adam_m1", 0.5),
    ("diag_hessian", 0.5),
    ("hesscale", 0.5),
]


def estimate(run, prec, exponent, k, inputs="test"):
    start = time.perf_counter()
    X = run.splits.X_train if inputs == "train" else run.splits.X_test
    est = LocalVolumeEstimator(
        1e-2, "gaussian", None if prec == "naive" else prec, n_samples=k, sigma=prior_sigma(),
        preconditioner_eps="auto", preconditioner_exponent=exponent, random_state=0,
    ).fit(run.model, X, optimizer=run.optimizer)
    return est, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--inputs", choices=("test", "train"), default="test",
                        help="digits the KL is measured on (train: first table only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    k, k_epochs = (300, 100) if args.quick else (3000, 300)

    run = train_digits_mlp(seed=0)
    rows = []
    for prec, exponent in CASES:
        est, seconds = estimate(run, prec, exponent, k, args.inputs)
        rows.append({"preconditioner": prec, "exponent": exponent,
                     "eps (auto)": est.preconditioner_eps_, "log_volume": est.log_volume_,
                     "max_sample": est.sample_log_volumes_.max(),
                     "evals/dir": est.n_evaluations_ / k, "seconds": seconds})
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.4g}")

    if args.inputs == "train":
        print(table)
        notes = (
            f"k = {k}, KL cutoff 1e-2 on the 1024 training digits, σ = {prior_sigma():.4f}, eps "
            "auto. The paper's best samples on this footing (its own training run, k = 3000): "
            "naive −9795, Adam ν −7021, Adam μ −7705, diag H −6578, HesScale −6599."
        )
        append_results("The paper's footing: KL on the training digits"
                       + (" (quick)" if args.quick else ""), table, notes)
        return
    epoch_rows = []
    for epochs in (1, 3, 10, 25):
        trained = train_digits_mlp(seed=0, epochs=epochs)
        row = {"epochs": epochs, "train_acc": trained.train_accuracy}
        for prec in ("naive", "diag_hessian"):
            est, _ = estimate(trained, prec, 0.5, k_epochs)
            row[prec] = est.log_volume_
        epoch_rows.append(row)
        print(row, flush=True)
    epochs_table = pd.DataFrame(epoch_rows).to_string(index=False,
                                                      float_format=lambda v: f"{v:.4g}")
    print(table)
    print(epochs_table)
    notes = (
        f"First table: k = {k}, KL cutoff 1e-2 on the 773 held-out digits, σ = "
        f"{prior_sigma():.4f}, eps chosen by `preconditioner_eps=\"auto\"`. The paper's code "
        "(a different training run, k = 3000): naive ≈ −10 900, Adam ν ≈ −7 850, diag H ≈ "
        "−7 940, its full-Hessian map ≈ −10 500; the correct V D^{−1/2} Vᵀ map ≈ −6 750 "
        "(DESIGN §5).\n\nLog-volume by training length (each a full 1/3/10/25-epoch cosine "
        f"schedule, k = {k_epochs}):\n\n```\n{epochs_table}\n```"
    )
    append_results("The paper's footing: k = 3000 and training length"
                   + (" (quick)" if args.quick else ""), table, notes)


if __name__ == "__main__":
    main()
