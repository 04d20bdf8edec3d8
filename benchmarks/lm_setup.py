"""Preconditioner set-up on a language model: ``diag_hessian`` (sampled) and ``adam``.

The model: a Pythia-31M-shaped GPT-NeoX from ``transformers.GPTNeoXConfig`` (hidden 256,
6 layers, 8 heads, intermediate 1024, vocabulary 50 304; random weights, as in
``benchmarks/language_model.py``), X = 8 × 128 random tokens, the KL cost, one torch thread.
Its exact Gauss–Newton diagonal would hold one example's Jacobian, 128 × 50 304 outputs ×
n parameters, so ``"diag_hessian"`` takes its Monte-Carlo route (``DiagHessian(samples=64)``:
one backward pass per sample and data batch, in the model's float32; also on a float64 copy,
``dtype=torch.float64``); ``"adam"``
reads a real ``torch.optim.AdamW`` state after 2 training steps on X, saved with
``torch.save(optimizer.state_dict(), "optimizer.pt")`` as a training run saves it.

Each row is one ``LocalVolumeEstimator(...).fit`` in a fresh process, stopped when the
problem is prepared (``volsk._pipeline.prepare`` is wrapped; nothing it computes changes):
set-up = that stage's main-thread CPU seconds (one torch thread does all the work) minus the
same stage without a preconditioner ("naive", also reported), and the extra peak RSS = the
process's peak after it minus the peak after loading the trained model and one plain forward,
as a multiple of the model's parameter bytes. ``sampled_ggn_diagonal`` is wrapped too, to
report the precision and data batches it ran on and its own CPU seconds.

    python benchmarks/lm_setup.py            # the Pythia-31M shape (~10 minutes on one thread)
    python benchmarks/lm_setup.py --quick    # hidden 128, 4 layers, vocabulary 8192, 16 samples
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results  # noqa: E402

FULL = dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8,
            intermediate_size=1024, vocab_size=50304)
QUICK = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
             intermediate_size=512, vocab_size=8192)
N_SEQ, LENGTH = 8, 128


def build_lm(config: dict, seed: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM  # optional dependency

    cfg = GPTNeoXConfig(max_position_embeddings=2048, rotary_pct=0.25,
                        use_parallel_residual=True, tie_word_embeddings=False, **config)
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(cfg).eval()


def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Prepared(Exception):
    """Raised after the problem is prepared: the rest of the fit is not what is measured."""


def train(spec: dict) -> dict:
    """Two AdamW steps on X; the weights and the optimizer's state_dict saved as a training
    run would save them (``optimizer.pt``), read back by the fits."""
    torch.set_num_threads(1)
    model = build_lm(spec["config"])
    X = tokens(spec["config"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=X, labels=X).loss.backward()
        optimizer.step()
    folder = Path(spec["folder"])
    torch.save(model.state_dict(), folder / "model.pt")
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    return {}


def tokens(config: dict) -> torch.Tensor:
    return torch.randint(0, config["vocab_size"], (N_SEQ, LENGTH),
                         generator=torch.Generator().manual_seed(0))


def child(spec: dict) -> dict:
    """One fit of the trained model up to its prepared problem, in this (fresh) process."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import volsk._pipeline as pipeline
    from volsk import LocalVolumeEstimator
    from volsk.preconditioners import DiagHessian
    from volsk.preconditioners.curvature import ggn

    # a first, tiny fit imports what fits import lazily: not the set-up's memory
    LocalVolumeEstimator(sigma=1.0, n_samples=1, preconditioner="diag_hessian",
                         preconditioner_eps=1e-3).fit(torch.nn.Linear(2, 2), torch.ones(3, 2))
    folder = Path(spec["folder"])
    model = build_lm(spec["config"])
    model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    X = tokens(spec["config"])
    with torch.no_grad():
        model(input_ids=X)
    base = max_rss()
    preconditioner = {"naive": None, "adam": "adam",
                      "diag_hessian": DiagHessian(samples=spec["samples"]),
                      "diag_hessian (float64)": DiagHessian(samples=spec["samples"],
                                                            dtype=torch.float64)}[spec["name"]]
    optimizer = str(folder / "optimizer.pt") if spec["name"] == "adam" else None
    seconds = {}
    prepare = pipeline.prepare

    def timed(*args, **kwargs):
        start = time.thread_time()
        prepare(*args, **kwargs)
        seconds["prepare"] = time.thread_time() - start
        raise _Prepared

    pipeline.prepare = timed
    route = {}
    sampled = ggn.sampled_ggn_diagonal

    def recorded(target, samples=64, seed=None):
        # which precision and data batches the sampled route ran on, and its own CPU seconds
        start = time.thread_time()
        out = sampled(target, samples, seed)
        route.update(dtype=str(target.evaluator.model_dtype).removeprefix("torch."),
                     batches=len(target.parts), seconds=time.thread_time() - start)
        return out

    ggn.sampled_ggn_diagonal = recorded
    est = LocalVolumeEstimator(1e-2, sigma="auto", n_samples=1, preconditioner=preconditioner,
                               preconditioner_eps=1e-3, random_state=0)
    try:
        est.fit(model, X, optimizer=optimizer)
    except _Prepared:
        pass
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"name": spec["name"], "prepare_s": seconds["prepare"],
            "extra_peak": max_rss() - base, "model_bytes": model_bytes, "route": route,
            "n": sum(p.numel() for p in model.parameters()),
            "outputs": N_SEQ * LENGTH * spec["config"]["vocab_size"]}


def run_child(spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{spec['name']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(quick: bool) -> None:
    config = QUICK if quick else FULL
    samples = 16 if quick else 64
    names = ["naive", "adam", "diag_hessian", "diag_hessian (float64)"]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        run_child({"name": "train", "config": config, "folder": folder})
        for name in names:
            row = run_child({"name": name, "config": config, "samples": samples,
                             "folder": folder})
            rows.append(row)
            print(f"{name}: {row}", file=sys.stderr)
    naive = rows[0]["prepare_s"]
    n, outputs, model_bytes = rows[0]["n"], rows[0]["outputs"], rows[0]["model_bytes"]
    exact_bytes = 24 * (outputs // N_SEQ) * n  # one example's Jacobian, exact route
    lines = [
        f"GPT-NeoX {config}: n = {n:,} parameters ({model_bytes / 2**20:.0f} MiB), "
        f"X = {N_SEQ} × {LENGTH} tokens, outputs = {outputs:,} "
        f"({outputs * 4 / 2**20:.0f} MiB in float32); exact diag_hessian would need "
        f"{exact_bytes / 2**40:,.0f} TiB for one example's Jacobian",
        "",
        f"{'preconditioner':28s} {'prepare s':>10s} {'set-up s':>9s} {'extra peak MiB':>15s} "
        f"{'× model':>8s}  sampled route",
    ]
    for row in rows:
        setup = row["prepare_s"] - naive
        route = row["route"]
        taken = (f"{route['dtype']}, {route['batches']} data batches, {route['seconds']:.1f} s"
                 if route else "-")
        lines.append(
            f"{row['name']:28s} {row['prepare_s']:10.1f} "
            f"{'-' if row['name'] == 'naive' else f'{setup:.1f}':>9s} "
            f"{row['extra_peak'] / 2**20:15.0f} {row['extra_peak'] / model_bytes:8.1f}  {taken}")
    table = "\n".join(lines)
    print(table)
    notes = (
        f"diag_hessian: DiagHessian(samples={samples}), the Monte-Carlo Gauss–Newton diagonal "
        "(relative standard error ≤ sqrt(2/samples) per coordinate), in the model's float32 "
        "by default; \"float64\" is DiagHessian(dtype=torch.float64), on a float64 copy. adam: a "
        "torch.optim.AdamW state after 2 steps, read from its optimizer.pt. Set-up = prepare "
        "stage minus the naive one (main-thread CPU seconds, one torch thread); extra peak = "
        "peak RSS of the process after the prepare stage minus its peak after loading the "
        "model and one plain forward (each row a fresh process). Sampled route: the precision "
        "and data batches sampled_ggn_diagonal ran on (samples backward passes per batch) and "
        "its own CPU seconds."
    )
    append_results(f"Language-model preconditioner set-up{' (quick)' if quick else ''}",
                   table, notes)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(train(spec) if spec["name"] == "train" else child(spec)))
    else:
        main(args.quick)
