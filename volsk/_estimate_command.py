"""The ``volsk estimate`` command: every estimator parameter as an option, files in, tables out.

Options are parsed and checked with the standard library alone, so ``volsk --help`` and usage
errors cost no torch import; files (model, inputs, optimizer state) are read and the estimator
fitted only when the command runs. Bad input raises :class:`UsageError` (or the estimator's
ValueError/TypeError), which ``volsk`` prints as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path

__all__ = ["UsageError", "add_arguments", "run", "load_array", "load_model", "write_table"]

# the estimator's names and defaults, spelled out here so that --help imports no torch;
# tests/test_cli.py checks them against LocalVolumeEstimator and volsk.preconditioners
MEASURE_NAMES = ("gaussian", "lebesgue", "uniform")
PRECONDITIONER_NAMES = ("naive", "adam", "adam_m1", "diag_hessian", "hesscale", "hessian",
                        "fisher", "kfac", "lowrank", "boundary")
COST_NAMES = ("kl", "cross_entropy", "mse")
OUTPUT_NAMES = ("auto", "logits", "probabilities", "log_probabilities", "binary_logits",
                "binary_probabilities")
EVALUATION_NAMES = ("auto", "vmap", "large")
GENERATOR_NAMES = ("auto", "host", "device")
ESTIMATOR_DEFAULTS = {
    "cutoff": 1e-2, "measure": "gaussian", "preconditioner": None, "n_samples": 100,
    "cost": "kl", "output": "auto", "sigma": "auto", "bounds": "init",
    "preconditioner_eps": "auto", "preconditioner_exponent": 0.5, "rtol": 1e-3,
    "batch_size": None, "data_batch_size": None, "evaluation": "auto", "device": "auto",
    "generator": "auto",
    "n_jobs": None, "n_threads": "auto",
}
ARRAY_SUFFIXES = (".npy", ".csv", ".pt", ".pth")
TABLE_SUFFIXES = (".csv", ".json", ".parquet")


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


class _File(str):
    """A value given as a file to read (a per-parameter array, a diagonal curvature)."""


def _choice_or_number(words=(), *, low=None, closed=False, high=None, integer=False,
                      files=False, none=False):
    """An argparse type: one of ``words``, a number in range, "none" or an array file."""
    kinds = [repr(w) for w in words] + (["'none'"] if none else [])
    bound = (f" >= {low}" if closed else f" > {low}") if low is not None else ""
    bound += f" and < {high}" if high is not None else ""
    kinds.append(f"{'an integer' if integer else 'a number'}{bound}")
    if files:
        kinds.append("a file (" + ", ".join(ARRAY_SUFFIXES) + ")")
    expected = ", ".join(kinds[:-1]) + f" or {kinds[-1]}" if len(kinds) > 1 else kinds[0]

    def parse(text):
        if text in words:
            return text
        if none and text.lower() == "none":
            return None
        if files and text.lower().endswith(ARRAY_SUFFIXES):
            return _File(text)
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}") from None
        too_low = low is not None and (value < low if closed else value <= low)
        too_high = high is not None and value >= high
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
        return value

    return parse


def _name_or_file(names, *, import_path=False):
    """An argparse type: one of ``names``, else an array file (or, for a callable, an import
    path ``module:function``)."""

    def parse(text):
        if text in names:
            return text
        if import_path and ":" in text:
            return text
        if not import_path and text.lower().endswith(ARRAY_SUFFIXES):
            return _File(text)
        more = " or 'module:function'" if import_path else (
            " or a file (" + ", ".join(ARRAY_SUFFIXES) + ")")
        raise argparse.ArgumentTypeError(
            f"must be one of {', '.join(names)}{more}, got {text!r}")

    return parse


def _table_path():
    def parse(text):
        suffix = Path(text).suffix.lower()
        if suffix not in TABLE_SUFFIXES:
            raise argparse.ArgumentTypeError(
                f"must end in {', '.join(TABLE_SUFFIXES)}, got {text!r}")
        if suffix == ".parquet" and importlib.util.find_spec("pyarrow") is None:
            raise argparse.ArgumentTypeError(
                f"writing {text!r} needs pyarrow (pip install pyarrow); or write .csv or .json")
        if not Path(text).resolve().parent.is_dir():
            raise argparse.ArgumentTypeError(f"the folder of {text!r} does not exist")
        return text

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``volsk estimate`` (one per estimator parameter, plus files in and out)."""
    d = ESTIMATOR_DEFAULTS
    number = _choice_or_number
    count = dict(low=1, closed=True, integer=True)

    def add(flag, metavar, type, default, help):
        parser.add_argument(flag, metavar=metavar, type=type, default=default, help=help)

    parser.add_argument(
        "model", help="the network: a file written by torch.save(model, path), or a Hugging "
                      "Face model folder (save_pretrained, a Trainer checkpoint)")
    parser.add_argument(
        "X", help="inputs the neighbourhood is defined on: .npy, .csv or a torch.save'd tensor")
    add("--y", "PATH", str, None, "labels, for --cost cross_entropy (.npy, .csv, .pt)")
    add("--attention-mask", "PATH", str, None,
        "token mask (N, T) for sequence outputs: tokens where it is 0 are ignored")
    add("--optimizer-state", "PATH", str, None,
        "for --preconditioner adam/adam_m1: a file from torch.save(optimizer.state_dict()) or "
        "a Hugging Face Trainer checkpoint's optimizer.pt")
    add("--cutoff", "EPS", number(low=0), d["cutoff"],
        "the cost at the neighbourhood's boundary, in the cost's units (nats for kl)")
    parser.add_argument("--measure", choices=MEASURE_NAMES, default=d["measure"],
                        help="the prior (gaussian, uniform) or the Lebesgue volume")
    add("--sigma", "SIGMA", number(("auto", "init"), low=0, files=True), d["sigma"],
        "gaussian prior's std: a number, 'auto' (RMS of the weights), 'init' (from the "
        "model's initialisation) or a per-parameter array file")
    add("--bounds", "B", number(("init",), low=0, files=True), d["bounds"],
        "uniform prior's half-widths: a number, 'init' (PyTorch's default-init box) or a "
        "per-parameter array file")
    add("--preconditioner", "NAME", _name_or_file(PRECONDITIONER_NAMES),
        "naive", f"importance sampling map: {', '.join(PRECONDITIONER_NAMES)}, or a diagonal "
        "curvature array file")
    add("--preconditioner-eps", "EPS", number(("auto",), low=0, closed=True),
        d["preconditioner_eps"], "eps in P ∝ 1/(|h|^exponent + eps), or 'auto' (a pilot "
        "picks it)")
    add("--preconditioner-exponent", "P", number(("auto",), low=0, closed=True),
        d["preconditioner_exponent"], "the exponent in P ∝ 1/(|h|^exponent + eps), or 'auto' "
        "(the eps pilot compares 0.25, 0.5 and 1)")
    add("--n-samples", "K", number(**count), d["n_samples"],
        "directions k (more: a larger, more accurate estimate)")
    add("--cost", "NAME", _name_or_file(COST_NAMES, import_path=True), d["cost"],
        "kl, cross_entropy (needs --y), mse, or 'module:function' (cost(outputs, "
        "anchor_outputs) -> scalar tensor)")
    parser.add_argument("--model-output", choices=OUTPUT_NAMES, default=d["output"],
                        help="what the model outputs (the estimator's output parameter)")
    add("--rtol", "RTOL", number(low=0, high=1), d["rtol"],
        "boundary accuracy: |C(θ + R u) − cutoff| ≤ rtol·cutoff")
    add("--batch-size", "N", number(none=True, **count), d["batch_size"],
        "directions evaluated together (none: chosen from memory)")
    add("--data-batch-size", "N", number(none=True, **count), d["data_batch_size"],
        "examples of X per forward pass (none: all at once)")
    parser.add_argument("--evaluation", choices=EVALUATION_NAMES, default=d["evaluation"],
                        help="vmap: many directions per forward pass; large: one at a time, "
                             "memory independent of k; auto: large for big models")
    add("--device", "DEVICE", str, d["device"],
        "where to evaluate: auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--generator", choices=GENERATOR_NAMES, default=d["generator"],
                        help="where directions are drawn: host (NumPy, the same vectors on "
                             "every device), device (torch on the fit's device, no host "
                             "round trip; another vector on CPU than on CUDA); auto: device "
                             "on CUDA")
    add("--random-state", "SEED", number(low=0, closed=True, integer=True, none=True), 0,
        "seed of the directions (none: fresh entropy)")
    add("--n-jobs", "N", number(integer=True, none=True), d["n_jobs"],
        "joblib workers over directions (-1: all CPUs)")
    add("--n-threads", "N", number(("auto",), none=True, **count), d["n_threads"],
        "torch threads while fitting: auto (1 for small models), a number, or none (torch's "
        "setting)")
    add("--verbose", "LEVEL", number(low=0, closed=True, integer=True), None,
        "progress bar when > 0; none given: on when stderr is a terminal")
    add("--output", "PATH", _table_path(), None,
        "write the one-row results table to a .csv, .json or .parquet file")
    add("--samples", "PATH", _table_path(), None,
        "write the per-direction table (est.samples_) to a .csv, .json or .parquet file")
    parser.add_argument("--json", action="store_true",
                        help="print the results as one JSON object")
    parser.add_argument("--traceback", action="store_true",
                        help="on an unexpected error, show Python's traceback")


# ------------------------------------------------------------------------------------- files


def _existing(path, what) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{what} {str(path)!r} does not exist")
    return p


def load_array(path, what):
    """An array from .npy, .csv (comma-separated) or a torch.save'd tensor/array."""
    import numpy as np  # import time: only when the command runs
    import torch

    p = _existing(path, what)
    try:
        if p.suffix.lower() == ".npy":
            return np.load(p)
        if p.suffix.lower() == ".csv":
            return np.loadtxt(p, delimiter=",", ndmin=2)
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a usage error
        raise UsageError(f"cannot read {what} {str(path)!r}: {exc}") from None


def load_model(path):
    """A module from ``torch.save(model, path)`` or a Hugging Face model folder."""
    import torch

    p = _existing(path, "model file")
    if p.is_dir():
        return _load_pretrained(p)
    try:
        # a pickled module needs its classes importable, and weights_only=True cannot load
        # it: this file is the user's own model
        model = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot read model file {str(path)!r}: {exc}") from None
    if isinstance(model, dict):
        raise UsageError(
            f"{str(path)!r} holds a dict (a state_dict?), not a module: save the module itself "
            "with torch.save(model, path), or pass a Hugging Face model folder")
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{str(path)!r} holds a {type(model).__name__}, not a torch.nn.Module "
                         "saved with torch.save(model, path)")
    return model


def _load_pretrained(folder: Path):
    config = folder / "config.json"
    if not config.exists():
        raise UsageError(f"model folder {str(folder)!r} has no config.json: pass a file written "
                         "by torch.save(model, path) or a save_pretrained folder")
    if importlib.util.find_spec("transformers") is None:
        raise UsageError("reading a Hugging Face model folder needs transformers "
                         "(pip install transformers)")
    import transformers  # import time: optional dependency, only for model folders

    architectures = json.loads(config.read_text()).get("architectures") or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        raise UsageError(f"{str(config)!r} names no architecture transformers knows "
                         f"({architectures!r})")
    return cls.from_pretrained(folder)


def _resolve_spec(value, what):
    return load_array(value, what) if isinstance(value, _File) else value


def _resolve_cost(value):
    if value in COST_NAMES or ":" not in value:
        return value
    module, _, name = value.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"--cost {value!r}: cannot import it ({exc})") from None


def write_table(frame, path):
    """Write a DataFrame to .csv, .json (records) or .parquet."""
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".json":
        frame.to_json(path, orient="records", indent=1, double_precision=15)
    else:
        frame.to_parquet(path, index=False)


# --------------------------------------------------------------------------------------- run


def run(args, out=None):
    """Fit the estimator as the options say; print (and write) the results. Returns it."""
    out = sys.stdout if out is None else out
    if args.preconditioner in ("adam", "adam_m1") and not args.optimizer_state:
        raise UsageError(
            f"--preconditioner {args.preconditioner} needs the optimizer's state: pass "
            "--optimizer-state PATH (a file from torch.save(optimizer.state_dict(), PATH), or a "
            "Hugging Face Trainer checkpoint's optimizer.pt)")
    for path, what in [(args.model, "model file"), (args.X, "X file"), (args.y, "--y file"),
                       (args.attention_mask, "--attention-mask file"),
                       (args.optimizer_state, "optimizer state file"),
                       *[(value, f"--{name} file") for name, value in [
                           ("sigma", args.sigma), ("bounds", args.bounds),
                           ("preconditioner", args.preconditioner)] if isinstance(value, _File)]]:
        if path is not None:
            _existing(path, what)  # before the imports and the loading: answer at once
    from .estimator import LocalVolumeEstimator

    model = load_model(args.model)
    X = load_array(args.X, "X file")
    y = load_array(args.y, "--y file") if args.y else None
    mask = load_array(args.attention_mask, "--attention-mask file") if args.attention_mask \
        else None
    # read and mapped to the model's parameters by the "adam" preconditioners (see
    # volsk.preconditioners.curvature.optimizer_state)
    optimizer = args.optimizer_state
    verbose = args.verbose if args.verbose is not None else int(sys.stderr.isatty())
    est = LocalVolumeEstimator(
        cutoff=args.cutoff,
        measure=args.measure,
        preconditioner=(None if args.preconditioner == "naive"
                        else _resolve_spec(args.preconditioner, "--preconditioner file")),
        n_samples=args.n_samples,
        cost=_resolve_cost(args.cost),
        output=args.model_output,
        sigma=_resolve_spec(args.sigma, "--sigma file"),
        bounds=_resolve_spec(args.bounds, "--bounds file"),
        preconditioner_eps=args.preconditioner_eps,
        preconditioner_exponent=args.preconditioner_exponent,
        rtol=args.rtol,
        batch_size=args.batch_size,
        data_batch_size=args.data_batch_size,
        evaluation=args.evaluation,
        device=args.device,
        generator=args.generator,
        random_state=args.random_state,
        n_jobs=args.n_jobs,
        n_threads=args.n_threads,
        verbose=verbose,
    )
    est.fit(model, X, y, optimizer=optimizer, attention_mask=mask)

    frame = est.results_frame()
    frame.insert(0, "model", str(args.model))
    for column, value in [("measure", args.measure), ("cutoff", args.cutoff),
                          ("preconditioner", str(args.preconditioner)),
                          ("preconditioner_eps", est.preconditioner_eps_), ("seed", est.seed_)]:
        frame[column] = [value]
    if args.output:
        write_table(frame, args.output)
    if args.samples:
        write_table(est.samples_, args.samples)
    row = frame.iloc[0].to_dict()
    if args.json:
        print(json.dumps(row, default=lambda v: v.item() if hasattr(v, "item") else str(v)),
              file=out)
    else:
        width = max(map(len, row))
        for key, value in row.items():
            text = f"{value:.8g}" if isinstance(value, float) else str(value)
            print(f"{key:<{width}}  {text}", file=out)
    return est
