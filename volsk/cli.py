"""The ``volsk`` command: ``volsk demo`` and ``volsk estimate``."""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

__all__ = ["main", "demo"]


def _format_table(frame) -> str:
    frame = frame.copy()
    if "eps" in frame:
        frame["eps"] = [("-" if v is None or v != v else f"{v:.0e}") for v in frame["eps"]]
    return frame.to_string(index=False, float_format=lambda v: f"{v:,.2f}")


def demo(n_samples=300, preconditioners=("naive", "adam", "diag_hessian"), seed=0,
         threads=None, out=None):
    """Train the digits MLP (clean and poisoned) and print the local-volume table.

    The paper's small experiment: MLP 64-64-10 (GELU, 4810 parameters) on sklearn's digits,
    Gaussian prior σ = 1/sqrt(5e-4·1024) implied by the L2 penalty, KL cutoff 1e-2 on the 773
    held-out digits, k directions naive and with diagonal preconditioners (Adam's second
    moment, the exact diagonal Hessian; eps chosen by the pilot of
    ``preconditioner_eps="auto"``). The clean net is measured on all 773 held-out digits (the
    paper's set-up) and, with the poisoned net, on the 473 held-out digits neither net has
    seen.

    Returns
    -------
    pandas.DataFrame

    Examples
    --------
    >>> import io
    >>> from volsk.cli import demo
    >>> table = demo(n_samples=4, preconditioners=("naive",), out=io.StringIO())
    >>> list(table["net"])
    ['clean', 'clean', 'poisoned']
    """
    import pandas as pd
    import torch

    from . import LocalVolumeEstimator
    from .experiments.digits import (
        N_POISON,
        accuracy,
        load_digits_splits,
        prior_sigma,
        train_digits_mlp,
    )

    out = sys.stdout if out is None else out
    if threads is not None:
        torch.set_num_threads(threads)
    rows = []
    # the same 1024 training digits for both nets; the poisoned net also sees a poison pool of
    # held-out digits, so both are compared on the held-out digits that neither has seen
    splits = load_digits_splits(seed=0, n_poison=N_POISON)
    clean = train_digits_mlp(seed=seed)
    poisoned = train_digits_mlp(splits, seed=seed, poison=0.3)
    cases = [
        ("clean", clean, clean.splits.X_test, clean.splits.y_test, "all held-out"),
        ("clean", clean, splits.X_test, splits.y_test, "unseen by both"),
        ("poisoned", poisoned, splits.X_test, splits.y_test, "unseen by both"),
    ]
    for net, run, X, y, data in cases:
        print(
            f"{net}: train accuracy {run.train_accuracy:.3f}, accuracy "
            f"{accuracy(run.model, X, y):.3f} on {len(y)} digits ({data})",
            file=out,
        )
        for prec in preconditioners:
            start = time.perf_counter()
            est = LocalVolumeEstimator(
                cutoff=1e-2,
                measure="gaussian",
                sigma=prior_sigma(),
                preconditioner=None if prec == "naive" else prec,
                preconditioner_eps="auto",
                n_samples=n_samples,
                random_state=seed,
            )
            est.fit(run.model, X, optimizer=run.optimizer)
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "net": net,
                    "X": f"{len(y)} digits",
                    "preconditioner": prec,
                    "eps": est.preconditioner_eps_,
                    "log_volume": est.log_volume_,
                    "log10_volume": est.log10_volume_,
                    "bits": est.bits_,
                    "lower_bound_95": est.log_volume_lower_bound(0.95),
                    "ess": est.effective_sample_size_,
                    "evals_per_dir": est.n_evaluations_ / n_samples,
                    "seconds": seconds,
                }
            )
    table = pd.DataFrame(rows)
    print(
        f"\nlocal volume, Gaussian prior sigma={prior_sigma():.4f}, KL cutoff 1e-2, "
        f"k={n_samples} (nats; bits = description length)",
        file=out,
    )
    print(_format_table(table), file=out)
    return table


def _load_array(path):
    import torch

    if path.endswith(".npy"):
        return np.load(path)
    if path.endswith(".csv"):
        return np.loadtxt(path, delimiter=",", ndmin=2)
    return torch.load(path, map_location="cpu", weights_only=False)


def estimate(args, out=None):
    """``volsk estimate MODEL X``: estimate on a saved model (``torch.save(model, path)``)."""
    import torch

    out = sys.stdout if out is None else out
    from . import LocalVolumeEstimator

    model = torch.load(args.model, map_location="cpu", weights_only=False)
    if not isinstance(model, torch.nn.Module):
        raise SystemExit(
            f"volsk estimate: {args.model} holds a {type(model).__name__}, not a torch.nn.Module "
            "saved with torch.save(model, path)"
        )
    X = _load_array(args.X)
    y = _load_array(args.y) if args.y else None
    est = LocalVolumeEstimator(
        cutoff=args.cutoff,
        measure=args.measure,
        preconditioner=None if args.preconditioner == "naive" else args.preconditioner,
        n_samples=args.n_samples,
        cost=args.cost,
        sigma=float(args.sigma) if args.sigma not in ("auto", "init") else args.sigma,
        random_state=args.random_state,
        device=args.device,
        verbose=args.verbose,
    ).fit(model, X, y)
    frame = est.results_frame()
    if args.json:
        print(json.dumps(frame.iloc[0].to_dict()), file=out)
    else:
        print(_format_table(frame), file=out)
    return est


def main(argv=None):
    """The ``volsk`` command: ``volsk demo`` or ``volsk estimate MODEL X [options]``.

    Examples
    --------
    >>> import io, contextlib
    >>> from volsk.cli import main
    >>> with contextlib.redirect_stdout(io.StringIO()) as out:
    ...     try:
    ...         main(["--help"])
    ...     except SystemExit:
    ...         pass
    >>> "demo" in out.getvalue() and "estimate" in out.getvalue()
    True
    """
    parser = argparse.ArgumentParser(
        prog="volsk", description="Local volume (prior probability) of trained networks."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="train the digits MLP and print the volume table")
    p_demo.add_argument("--n-samples", type=int, default=300)
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest on small shared machines)")
    p_est = sub.add_parser("estimate", help="estimate on a saved model and inputs")
    p_est.add_argument("model", help="file written by torch.save(model, path)")
    p_est.add_argument("X", help="inputs: .npy, .csv or a torch.save'd tensor")
    p_est.add_argument("--y", help="labels (for --cost cross_entropy)")
    p_est.add_argument("--cutoff", type=float, default=1e-2)
    p_est.add_argument("--measure", default="gaussian")
    p_est.add_argument("--sigma", default="auto")
    p_est.add_argument("--preconditioner", default="naive")
    p_est.add_argument("--cost", default="kl")
    p_est.add_argument("--n-samples", type=int, default=100)
    p_est.add_argument("--random-state", type=int, default=0)
    p_est.add_argument("--device", default="auto")
    p_est.add_argument("--verbose", type=int, default=0)
    p_est.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(n_samples=args.n_samples, seed=args.seed, threads=args.threads)
    elif args.command == "estimate":
        estimate(args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
