"""The ``volsk`` command: ``volsk demo`` and ``volsk estimate``.

Parsing the command line imports neither torch nor pandas (``volsk --help`` answers at once);
a command imports what it runs. Usage errors (bad values, missing files) are printed as one
line, ``volsk <command>: error: ...``, and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from . import _estimate_command

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
    from .results import LowEffectiveSampleSizeWarning

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
            with warnings.catch_warnings():  # the table shows the ESS
                warnings.simplefilter("ignore", LowEffectiveSampleSizeWarning)
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


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in --help, except an unset option's None (its help says what none means) and
    a flag's False."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse with defaults in --help and usage errors as one line (exit status 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _one_line(exc) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


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
    parser = _Parser(
        prog="volsk", description="Local volume (prior probability) of trained networks."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p_demo = sub.add_parser("demo", help="train the digits MLP and print the volume table",
                            description="Train the digits MLP (clean and poisoned) on the CPU "
                                        "and print its local-volume table.")
    p_demo.add_argument("--n-samples", type=int, default=None,
                        help="directions per estimate (default 300; 20 with --language)")
    p_demo.add_argument("--seed", type=int, default=0, help="seed of training and directions")
    p_demo.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest on small shared machines)")
    p_demo.add_argument("--language", action="store_true",
                        help="instead: train a tiny GPT-NeoX on the standard library's text "
                             "and print the log-volume of its checkpoints")
    p_est = sub.add_parser("estimate", help="estimate on a saved model and inputs",
                           description="Estimate the local volume of a saved network on saved "
                                       "inputs; every estimator parameter is an option.")
    _estimate_command.add_arguments(p_est)
    args = parser.parse_args(argv)
    if args.command == "demo" and args.language:
        import torch

        from .experiments import language

        torch.set_num_threads(args.threads)
        n_samples = 20 if args.n_samples is None else args.n_samples
        language.language_demo(n_samples=n_samples, seed=args.seed)
    elif args.command == "demo":
        n_samples = 300 if args.n_samples is None else args.n_samples
        demo(n_samples=n_samples, seed=args.seed, threads=args.threads)
    elif args.command == "estimate":
        try:
            _estimate_command.run(args)
        except (_estimate_command.UsageError, ValueError, TypeError) as exc:
            # volsk raises ValueError/TypeError for bad input, naming the argument and the fix
            p_est.exit(2, f"{p_est.prog}: error: {_one_line(exc)}\n")
        except KeyboardInterrupt:
            p_est.exit(130, f"{p_est.prog}: interrupted\n")
        except Exception as exc:  # noqa: BLE001 - one line unless the user asks for more
            if args.traceback:
                raise
            p_est.exit(1, f"{p_est.prog}: error: {type(exc).__name__}: {_one_line(exc)} "
                          "(--traceback shows where)\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
