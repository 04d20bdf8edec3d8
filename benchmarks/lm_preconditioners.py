"""Preconditioners on a briefly trained Pythia-31M-shaped language model, at equal k.

The model: a GPT-NeoX built from config with Pythia-31M's shape (hidden 256, 6 layers, 8
heads, intermediate 1024, vocabulary 50 304; :func:`volsk.experiments.language.
make_tiny_gpt_neox`), trained for ``--steps`` AdamW steps (batch 8 × 128 bytes, learning rate
1e-3 on a cosine schedule) on the standard library's source text
(:func:`volsk.experiments.language.load_stdlib_corpus`, byte tokens: 256 of the 50 304
vocabulary entries occur, the other input-embedding rows are flat and integrated out). The
trained weights and the optimizer's state are cached in ``--cache`` so later runs skip the
training.

Each preconditioner is one ``LocalVolumeEstimator.fit`` with the defaults a user gets
(``preconditioner_eps="auto"``, the large-model evaluation mode chosen by "auto"), the KL cost
on 8 held-out sequences × 128 bytes, cutoff 1e-2, the initialisation's Gaussian prior
(``sigma="init"``), the same k directions and seed for every row (paired), ``adam`` from the
training run's own AdamW state, ``boundary`` = ``BoundaryFitted(base="kfac", rounds=2,
pilot_directions=32)`` (a smaller pilot budget than its default). Set-up = everything before
the directions: binding the problem (flat coordinates, the curvature: "bind"), the eps pilot
and the boundary pilot where there is one ("pilots"), and the search pilot ("search"); "finish"
is what follows the directions (the fitted attributes) — timed
by wrapping ``volsk._pipeline``'s stage functions (which changes nothing they compute), in the
main thread's CPU seconds (one torch thread).

    python benchmarks/lm_preconditioners.py              # Pythia-31M shape, k = 16
    python benchmarks/lm_preconditioners.py --quick      # hidden 64, 2 layers, vocab 4096, k = 4
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results  # noqa: E402

FULL = dict(hidden_size=256, num_layers=6, num_heads=8, intermediate_size=1024,
            vocab_size=50304)
QUICK = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256, vocab_size=4096)
SEQ_LEN, BATCH, N_MEASURED = 128, 8, 8
NAMES = ("naive", "adam", "diag_hessian", "kfac", "boundary")


def _boundary():
    from volsk.preconditioners import BoundaryFitted

    # the default (4 rounds of ≥ 128 pilot directions) costs ~600 directions here: a budget
    # of 2 rounds × 32 directions keeps its set-up comparable to the others'
    return BoundaryFitted(base="kfac", rounds=2, pilot_directions=32)


SPECS = {"naive": None, "boundary": _boundary}


def train(config: dict, steps: int, cache: Path):
    """The trained model and its AdamW (cached by config and steps)."""
    from volsk.experiments.language import load_stdlib_corpus, make_tiny_gpt_neox

    splits = load_stdlib_corpus(SEQ_LEN)
    model = make_tiny_gpt_neox(max_positions=SEQ_LEN, seed=0, **config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    name = "_".join(f"{v}" for v in config.values())
    path = cache / f"lm_{name}_{steps}.pt"
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        return model.eval(), optimizer, splits, saved["losses"], saved["seconds"]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, steps) / steps)))
    gen = torch.Generator().manual_seed(0)
    model.train()
    losses, start = [], time.thread_time()
    for _ in range(steps):
        x = splits.train_ids[torch.randint(0, splits.n_train, (BATCH,), generator=gen)]
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    seconds = time.thread_time() - start
    model.eval()
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "losses": losses, "seconds": seconds}, path)
    return model, optimizer, splits, losses, seconds


def fit_one(name, model, optimizer, X, k):
    """One fit; its estimator and the CPU seconds of each stage."""
    from language_model import Stages  # the stage timer of the large-model benchmark

    import volsk._pipeline as pipeline
    from volsk import LocalVolumeEstimator
    from volsk.priors import InitPriorWarning
    from volsk.results import LowEffectiveSampleSizeWarning

    stages = Stages()
    originals = {n: getattr(pipeline, n) for n in ("select_eps", "fit_boundary_map")}
    for name_, label in (("select_eps", "eps"), ("fit_boundary_map", "boundary")):
        setattr(pipeline, name_, stages._wrap(originals[name_], label))
    est = LocalVolumeEstimator(cutoff=1e-2, sigma="init", n_samples=k, random_state=0,
                               preconditioner=SPECS[name]() if callable(SPECS.get(name))
                               else SPECS.get(name, name), n_threads=1)
    start = time.thread_time()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LowEffectiveSampleSizeWarning)  # ESS is a column
            warnings.simplefilter("ignore", InitPriorWarning)  # the embedding's init is known
            est.fit(model, X, optimizer=optimizer)
    finally:
        stages.close()
        for name_, fn in originals.items():
            setattr(pipeline, name_, fn)
    return est, time.thread_time() - start, dict(stages.times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("-k", type=int, default=None, help="directions per fit (16; quick 4)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (200; quick 30)")
    parser.add_argument("--only", nargs="*", choices=NAMES, default=None)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/volsk-bench-cache"))
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = QUICK if args.quick else FULL
    k = args.k or (4 if args.quick else 16)
    steps = args.steps or (30 if args.quick else 200)
    model, optimizer, splits, losses, train_s = train(config, steps, args.cache)
    X = splits.heldout_subset(N_MEASURED)
    n = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        start = time.thread_time()
        heldout = float(model(input_ids=X, labels=X).loss)
        forward_s = time.thread_time() - start
    lines = [
        f"GPT-NeoX {config}: {n:,} parameters, trained {steps} AdamW steps on stdlib text "
        f"({train_s:.0f} CPU s); training loss {np.mean(losses[:10]):.2f} → "
        f"{np.mean(losses[-10:]):.2f}, held-out loss {heldout:.2f} nats/byte",
        f"X = {N_MEASURED} held-out sequences × {SEQ_LEN} bytes, k = {k}, seed 0 for every row; "
        f"one plain forward {forward_s:.2f} s",
        "",
        f"{'preconditioner':>14} {'log-volume':>14} {'best sample':>14} {'ESS':>5} "
        f"{'eps':>8} {'set-up s':>9} {'of it: bind':>11} {'pilots':>9} {'search':>7} {'finish':>7} "
        f"{'pilot evals':>11} {'s/dir':>6} {'evals/dir':>9}",
    ]
    rounds = []
    for name in args.only or NAMES:
        est, total, times = fit_one(name, model, optimizer, X, k)
        directions = times.get("directions", 0.0)
        bind = times.get("prepare", 0.0)
        search = times.get("pilot", 0.0)
        pilots = times.get("eps", 0.0) + times.get("boundary", 0.0)
        setup = bind + pilots + search
        finish = total - setup - directions  # the fitted attributes
        eps = est.preconditioner_eps_
        row = (f"{name:>14} {est.log_volume_:>14,.0f} {est.samples_['log_volume'].max():>14,.0f}"
               f" {est.effective_sample_size_:>5.2f} {'-' if eps is None else f'{eps:.0e}':>8}"
               f" {setup:>9.0f} {bind:>11.0f} {pilots:>9.0f} {search:>7.0f} {finish:>7.0f}"
               f" {est.n_pilot_evaluations_:>11} {directions / k:>6.1f}"
               f" {est.samples_['evaluations'].mean():>9.2f}")
        print(row, flush=True)
        lines.append(row)
        if getattr(est, "boundary_pilot_", None) is not None:  # the boundary fit's rounds
            rounds.append(est.boundary_pilot_.to_string(index=False))
    table = "\n".join(lines + [f"\nboundary rounds:\n{r}" for r in rounds])
    print(table)
    if not args.no_append:
        append_results("Preconditioners on a trained Pythia-31M-shaped language model"
                       + (" (quick)" if args.quick else ""), table)


if __name__ == "__main__":
    main()
