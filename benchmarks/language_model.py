"""Language models and large networks: speed and memory of the large-model evaluation mode.

Three parts, each fit through the public API (``LocalVolumeEstimator(...).fit``), one torch
thread, the KL cost, a Gaussian prior (``sigma="auto"``), no preconditioner, cutoff 1e-2:

1. ``lm``: a Pythia-31M-shaped GPT-NeoX from ``transformers.GPTNeoXConfig`` (hidden 256,
   6 layers, 8 heads, intermediate 1024, vocabulary 50 304; random weights), X = 8 × 128
   random tokens, k = 8 directions. Reported: seconds per direction (the direction stage's
   time / k: generation, radius search, integral), evaluations per direction, their ratio
   to (evaluations × one plain forward of the same model on the same X in this process —
   the median of forwards timed before and after the fit),
   the pilot's and the set-up's cost, and the fit's peak RSS above the process's peak after
   building the model and running one plain forward (a first, tiny fit has imported what
   fits import lazily) — for the whole fit, and during the direction stage only — as
   multiples of the model's parameter bytes. The cached anchor outputs (tokens × vocabulary
   × 4 bytes), what the bound KL cost keeps besides them, and the evaluator's own vectors
   are reported apart.
2. ``ladder``: 64 → w → w → 10 GELU MLPs from 10k to 30M parameters on 64 examples, k = 4,
   in both evaluation modes where the vmapped one fits in memory (≤ 3M): time per
   direction and extra peak memory, and their growth law (log–log slope) in the large mode.
3. ``dtypes``: the rounding a half-precision model adds to the estimate: a small GPT-NeoX in
   float32 and the same weights rounded to bfloat16 (and float16), each evaluated in its
   own dtype; the float32 fit of the bfloat16-rounded weights is the reference.

Each fit of parts 1 and 2 runs in a fresh process (its own peak RSS); the stages are timed by
wrapping ``volsk._pipeline``'s stage functions, which changes nothing they compute. Times are
the main thread's CPU seconds (``time.thread_time``): with one torch thread that thread does
all the work, and the load of other processes on a shared machine does not inflate them.

    python benchmarks/language_model.py            # everything (~10 minutes on 2 idle cores)
    python benchmarks/language_model.py --quick    # a 4-layer, 128-wide, 8k-vocabulary LM; 10k → 3M
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results  # noqa: E402

LM_FULL = dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8,
               intermediate_size=1024, vocab_size=50304)
LM_QUICK = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                intermediate_size=512, vocab_size=8192)
LM_DTYPES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=256, vocab_size=1024)
N_INPUTS, N_CLASSES, N_EXAMPLES = 64, 10, 64


def build_lm(config: dict, seed: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM  # optional dependency

    cfg = GPTNeoXConfig(max_position_embeddings=2048, rotary_pct=0.25,
                        use_parallel_residual=True, tie_word_embeddings=False, **config)
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(cfg).eval()


def tokens(n_seq: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n_seq, length), generator=torch.Generator().manual_seed(0))


def width_for(n_parameters: int) -> int:
    """Hidden width w of the 64 → w → w → 10 MLP with about ``n_parameters`` parameters."""
    b = N_INPUTS + N_CLASSES + 2
    return max(1, round((-b + math.sqrt(b * b + 4 * (n_parameters - N_CLASSES))) / 2))


def build_mlp(width: int):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(N_INPUTS, width), torch.nn.GELU(),
                               torch.nn.Linear(width, width), torch.nn.GELU(),
                               torch.nn.Linear(width, N_CLASSES)).eval()


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Stages:
    """Time and sampled peak RSS of each pipeline stage (wrappers around its functions).

    ``clock``: the main thread's CPU time by default (with one torch thread it does all the
    work, and other processes on a shared machine do not inflate it); ``time.perf_counter``
    for wall time (a GPU).
    """

    def __init__(self, clock=time.thread_time):
        self.clock = clock
        import volsk._pipeline as pipeline
        import volsk._problem as problem

        self.times, self.peaks, self.current = {}, {}, None
        self._stop = False
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        for module, name, label in [(pipeline, "prepare", "prepare"),
                                    (problem, "find_flat_coordinates", "flat"),
                                    (pipeline, "calibrate_search", "pilot"),
                                    (pipeline, "run_directions", "directions")]:
            setattr(module, name, self._wrap(getattr(module, name), label))

    def _sample(self):
        while not self._stop:
            label = self.current
            if label is not None:
                self.peaks[label] = max(self.peaks.get(label, 0), rss())
            time.sleep(0.02)

    def _wrap(self, fn, label):
        def timed(*args, **kwargs):
            outer, self.current = self.current, label
            start = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.times[label] = self.times.get(label, 0.0) + self.clock() - start
                self.peaks[label] = max(self.peaks.get(label, 0), rss())
                self.current = outer

        return timed

    def close(self):
        self._stop = True
        self._sampler.join()


def kl_cache_bytes(anchor: torch.Tensor, cost=None) -> int:
    """Bytes of the tensors the bound "kl" cost (``cost``, default ``KL()``) keeps besides the
    anchor outputs: its attributes' and its Taylor curvature's closures' distinct storages."""
    from volsk.costs import KL

    bound = (cost or KL()).bind(anchor, output="logits")
    found = list(vars(bound).values())
    for fn in bound.taylor() or ():
        found += [cell.cell_contents for cell in (getattr(fn, "__closure__", None) or ())]
    seen = {anchor.untyped_storage().data_ptr(): 0}
    for value in found:
        if isinstance(value, torch.Tensor):
            seen.setdefault(value.untyped_storage().data_ptr(), value.untyped_storage().nbytes())
    return sum(seen.values())


def evaluator_bytes(est) -> int:
    """Bytes of the n-vectors the fitted large-model evaluator holds (θ and its two buffers)."""
    ev = est._evaluator  # diagnostics only: what the evaluation mode itself keeps
    held = [getattr(ev, name, None) for name in ("theta", "_direction", "_perturbed")]
    return sum(t.numel() * t.element_size() for t in held if isinstance(t, torch.Tensor))


# ---------------------------------------------------------------------- one fit in a child


def child(spec: dict) -> dict:
    torch.set_num_threads(1)
    from volsk import LocalVolumeEstimator
    from volsk._evaluate import extract_output

    with warnings.catch_warnings():  # what a fit imports lazily is not the fit's memory
        warnings.simplefilter("ignore")
        LocalVolumeEstimator(sigma=1.0, n_samples=1, evaluation=spec["mode"]).fit(
            torch.nn.Linear(2, 2), torch.ones(3, 2))
    if spec["kind"] == "lm":
        model = build_lm(spec["config"])
        X = tokens(spec["n_seq"], spec["length"], spec["config"]["vocab_size"])
    else:
        model = build_mlp(spec["width"])
        X = torch.randn(N_EXAMPLES, N_INPUTS, generator=torch.Generator().manual_seed(0))
    n = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    def forward_times(repeats=3):
        times = []
        with torch.no_grad():
            for _ in range(repeats):
                start = time.thread_time()
                model(X)
                times.append(time.thread_time() - start)
        return times

    forwards = forward_times()
    with torch.no_grad():
        anchor_bytes = extract_output(model(X)).numel() * 4
    base = max_rss()
    stages = Stages()
    est = LocalVolumeEstimator(cutoff=1e-2, n_samples=spec["k"], random_state=0, n_threads=1,
                               evaluation=spec["mode"], device="cpu")
    start = time.thread_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # low effective sample size at k = 8
        est.fit(model, X)
    total = time.thread_time() - start
    peak = max_rss()
    stages.close()
    forwards += forward_times()  # before and after: the machine's speed drifts
    result = {
        "n": n, "model_bytes": model_bytes, "forward_s": float(np.median(forwards[1:])),
        "fit_s": total,
        "k": spec["k"], "mode": spec["mode"],
        "evaluations": float(est.samples_["evaluations"].mean()),
        "pilot_evaluations": int(est.n_pilot_evaluations_),
        "n_flat": len(est.flat_parameters_),
        "times": stages.times,
        "extra_peak": peak - base,
        "directions_peak": stages.peaks.get("directions", 0) - base,
        "stage_peaks": {k: v - base for k, v in stages.peaks.items()},
        "anchor_bytes": anchor_bytes,
        "log_volume": float(est.log_volume_),
        "evaluator_bytes": evaluator_bytes(est),
        "data_batches": len(est._evaluator.batches),
    }
    if spec["kind"] == "lm":
        from volsk.costs import KL

        with torch.no_grad():
            one = model(X[:1]).logits  # per sequence: the bound cost's arrays are per token
        for name, cost in [("", KL()), ("_bf16", KL(anchor_dtype=torch.bfloat16)),
                           ("_top100", KL(top_k=100))]:
            result["kl_cache_bytes" + name] = kl_cache_bytes(one, cost) * X.shape[0]
    return result


def run_child(spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------- parts


def part_lm(quick: bool):
    config = LM_QUICK if quick else LM_FULL
    r = run_child({"kind": "lm", "config": config, "n_seq": 8, "length": 128, "k": 8,
                   "mode": "auto"})
    t = r["times"]
    per_direction = t["directions"] / r["k"]
    mb = r["model_bytes"]

    def share(size):
        return f"{size / 2**20:.0f} MiB = {size / mb:.1f} × model bytes"

    rows = [
        ("parameters n", f"{r['n']:,} ({mb / 2**20:.0f} MiB float32)"),
        ("flat coordinates found", f"{r['n_flat']:,} (unused embedding rows)"),
        ("one plain forward", f"{r['forward_s']:.3f} s"),
        ("seconds per direction", f"{per_direction:.2f} s"),
        ("evaluations per direction", f"{r['evaluations']:.2f}"),
        ("s/direction ÷ (evaluations × forward)",
         f"{per_direction / (r['evaluations'] * r['forward_s']):.2f}"),
        ("fit: set-up (of which flat detection)",
         f"{t['prepare']:.1f} s ({t.get('flat', 0):.1f} s)"),
        ("fit: search pilot (evaluations)", f"{t['pilot']:.1f} s ({r['pilot_evaluations']})"),
        ("fit: directions", f"{t['directions']:.1f} s"),
        ("fit: finishing (fitted attributes)",
         f"{r['fit_s'] - t['prepare'] - t['pilot'] - t['directions']:.1f} s"),
        ("extra peak RSS, whole fit", share(r["extra_peak"])),
        ("extra peak RSS, direction stage", share(r["directions_peak"])),
        ("  stage peaks (× model bytes)", ", ".join(
            f"{k} {v / mb:.1f}" for k, v in r["stage_peaks"].items())),
        ("data batches (data_batch_size=None)", f"{r['data_batches']}"),
        ("held by the evaluator (θ, u, θ + r·u)", share(r["evaluator_bytes"])),
        ("anchor outputs (tokens × vocab × 4)", share(r["anchor_bytes"])),
        ("kept by the bound KL cost besides them", share(r["kl_cache_bytes"])),
        ("  with KL(anchor_dtype=torch.bfloat16)",
         share(r["kl_cache_bytes_bf16"]) + " (instead of the anchor outputs)"),
        ("  with KL(top_k=100)",
         share(r["kl_cache_bytes_top100"]) + " (instead of the anchor outputs)"),
    ]
    width = max(len(a) for a, _ in rows)
    title = "GPT-NeoX " + ("quick config" if quick else "Pythia-31M-shaped") + \
        ", X = 8 × 128 tokens, k = 8, evaluation='auto' (large)"
    return title, "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


def part_ladder(quick: bool):
    sizes = [10_000, 100_000, 1_000_000, 3_000_000] if quick else [
        10_000, 100_000, 1_000_000, 3_000_000, 10_000_000, 30_000_000]
    lines = [f"{'n':>11}  {'mode':>5}  {'forward s':>9}  {'s/dir':>7}  {'evals':>5}  "
             f"{'ratio':>6}  {'extra MiB':>9}  {'× model':>7}"]
    large = []
    for size in sizes:
        for mode in ("vmap", "large"):
            if mode == "vmap" and size > 3_000_000:
                continue  # ≈ 225 bytes per parameter: 2–7 GB
            r = run_child({"kind": "mlp", "width": width_for(size), "k": 4, "mode": mode})
            per = r["times"]["directions"] / r["k"]
            ratio = per / (r["evaluations"] * r["forward_s"])
            lines.append(f"{r['n']:>11,}  {mode:>5}  {r['forward_s']:>9.4f}  {per:>7.3f}  "
                         f"{r['evaluations']:>5.2f}  {ratio:>6.1f}  "
                         f"{r['extra_peak'] / 2**20:>9.0f}  "
                         f"{r['extra_peak'] / r['model_bytes']:>7.1f}")
            if mode == "large":
                large.append((r["n"], per, max(r["extra_peak"], 1)))
    big = [row for row in large if row[0] >= 1_000_000]
    if len(big) >= 2:
        n, t, m = (np.log([row[i] for row in big]) for i in range(3))
        lines.append(f"large mode, n ≥ 1M: time per direction ∝ n^{np.polyfit(n, t, 1)[0]:.2f}, "
                     f"extra peak memory ∝ n^{np.polyfit(n, m, 1)[0]:.2f}")
    return "MLP ladder 64 → w → w → 10 (GELU), 64 examples, k = 4", "\n".join(lines)


def part_dtypes():
    from volsk import LocalVolumeEstimator

    torch.set_num_threads(1)
    half = build_lm(LM_DTYPES).to(torch.bfloat16)
    X = tokens(8, 64, LM_DTYPES["vocab_size"])
    fits = {}
    for name, dtype in [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                        ("float16", torch.float16)]:
        model = build_lm(LM_DTYPES)
        model.load_state_dict({k: v.to(dtype) for k, v in half.state_dict().items()})
        model = model.to(dtype)
        est = LocalVolumeEstimator(cutoff=1e-2, n_samples=32, random_state=0,
                                   evaluation="large", device="cpu", n_threads=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fits[name] = est.fit(model, X)
    ref = fits["float32"]
    lines = [f"{'dtype':>9}  {'log-volume':>14}  {'Δ vs float32':>12}  {'relative':>9}  "
             f"{'median |Δ sample|':>17}  {'median |Δ log R|':>16}"]
    for name, est in fits.items():
        d = est.sample_log_volumes_ - ref.sample_log_volumes_
        dr = np.log(est.radii_) - np.log(ref.radii_)
        shift = est.log_volume_ - ref.log_volume_
        lines.append(f"{name:>9}  {est.log_volume_:>14.2f}  {shift:>12.2f}"
                     f"  {shift / abs(ref.log_volume_):>9.1e}"
                     f"  {np.median(np.abs(d)):>17.2f}  {np.median(np.abs(dr)):>16.1e}")
    n = ref.n_parameters_
    title = (f"Half precision: GPT-NeoX hidden 64, 2 layers, vocabulary 1024 ({n:,} parameters), "
             "X = 8 × 64 tokens, k = 32; float32 = the bfloat16 weights in float32")
    return title, "\n".join(lines)


def part_kl(quick: bool):
    """The cache options of the KL on a trained byte-level GPT-NeoX: the KL's relative error
    at perturbations of a few sizes, and the estimate's shift."""
    from volsk import LocalVolumeEstimator
    from volsk.costs import KL
    from volsk.experiments.language import load_stdlib_corpus, train_language_model

    torch.set_num_threads(1)
    splits = load_stdlib_corpus(max_bytes=300_000 if quick else 1_000_000)
    run = train_language_model(splits, steps=60 if quick else 200, checkpoint_steps=[])
    model, X = run.model, splits.heldout_subset(8)
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    u = torch.randn(theta.shape, generator=torch.Generator().manual_seed(0))
    u /= u.norm()

    def logits_at(r):
        torch.nn.utils.vector_to_parameters(theta + r * u, model.parameters())
        with torch.no_grad():
            return model(X).logits

    anchor = logits_at(0.0)
    exact = KL().bind(anchor.double())
    options = [("bfloat16", KL(anchor_dtype=torch.bfloat16))] + [
        (f"top_k={k}", KL(top_k=k)) for k in (4, 16, 64)]
    bound = {name: cost.bind(anchor) for name, cost in options}
    # radii where the exact KL is about 1e-3, 1e-2, 1e-1 nats (the KL grows like r²)
    r1 = math.sqrt(1e-2 / float(exact(logits_at(1.0).double())))
    lines = [f"{'cost':>12}  {'KL at anchor':>12}" + "".join(
        f"  {f'rel. err. @ {c:.0e}':>16}" for c in (1e-3, 1e-2, 1e-1))]
    errors = {name: [] for name, _ in options}
    for c in (1e-3, 1e-2, 1e-1):
        out = logits_at(r1 * math.sqrt(c / 1e-2))
        value = float(exact(out.double()))
        for name, _ in options:
            errors[name].append(float(bound[name](out)) / value - 1)
    for name, _ in options:
        lines.append(f"{name:>12}  {float(bound[name](anchor)):>12.1e}"
                     + "".join(f"  {e:>16.1e}" for e in errors[name]))
    torch.nn.utils.vector_to_parameters(theta, model.parameters())
    fits = {}
    for name, cost in [("KL()", "kl")] + options:
        est = LocalVolumeEstimator(cutoff=1e-2, n_samples=16, cost=cost, random_state=0,
                                   device="cpu", n_threads=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fits[name] = est.fit(model, X)
    ref = fits["KL()"]
    lines += ["", f"{'cost':>12}  {'log-volume':>12}  {'Δ vs KL()':>10}  "
              f"{'median Δ log R':>14}  {'max |Δ log R|':>13}"]
    for name, est in fits.items():
        d = np.log(est.radii_) - np.log(ref.radii_)
        lines.append(f"{name:>12}  {est.log_volume_:>12.2f}  "
                     f"{est.log_volume_ - ref.log_volume_:>10.2f}  {np.median(d):>14.1e}  "
                     f"{np.abs(d).max():>13.1e}")
    tokens = X.numel()
    title = (f"KL cache options: byte-level GPT-NeoX ({ref.n_parameters_:,} parameters, "
             f"vocabulary 256) trained on the stdlib text, X = {X.shape[0]} × {X.shape[1]} "
             f"= {tokens} held-out tokens; cutoff 1e-2, k = 16, sigma='auto'; relative "
             "errors against the exact KL in float64 along one random direction")
    return title, "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", choices=["lm", "ladder", "dtypes", "kl"],
                        default=None)
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    torch.set_num_threads(1)
    parts = args.only or ["lm", "ladder", "dtypes", "kl"]
    sections = []
    for part in parts:
        start = time.perf_counter()
        title, table = {"lm": lambda: part_lm(args.quick),
                        "ladder": lambda: part_ladder(args.quick),
                        "dtypes": part_dtypes,
                        "kl": lambda: part_kl(args.quick)}[part]()
        print(f"\n{title}  ({time.perf_counter() - start:.0f} s)\n{table}", flush=True)
        sections.append(f"{title}\n\n{table}")
    if not args.no_append:
        append_results("Language models and large networks: the large-model evaluation mode"
                       + (" (quick)" if args.quick else ""), "\n\n".join(sections))


if __name__ == "__main__":
    main()
