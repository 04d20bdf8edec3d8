"""Cluster: a checkpoint sweep of a ~5M-parameter MLP, in one process and on 2 dask workers.

Four checkpoints (state dicts of a 256-2048-2048-10 GELU MLP, 4.7M parameters, four seeds) ×
k = 64 directions on 64 inputs, measured four ways:

- ``serial``: ``sweep(models, X, n_jobs=1)`` in this process — the reference table;
- ``dask rows, modules``: the sweep's rows through joblib's dask backend with the models in
  memory: each task carries its model's weights and X (before);
- ``dask rows, checkpoints``: :class:`~volsk.Checkpoint` sources and
  ``parallel_config(backend="dask", scatter=[X])``: each task carries a path, a factory and
  a key for X (after);
- ``dask shards``: ``fit_sharded(est, checkpoint, X, client=client, shard_size=k // 4)`` for
  each checkpoint: one pilot task and four shard tasks each, X scattered once.

The cluster is a ``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)``, started
and warmed (volsk imported in the workers) before any timing; everything runs with one torch
thread per process. For each way: wall time, tasks submitted, the bytes each task carries (the
cloudpickle size of what ``Client.submit`` received: function and arguments, futures as their
keys), the bytes scattered once, and whether the table (every column but ``seconds``) and the
per-direction samples equal the serial ones bit for bit.

    python benchmarks/cluster.py            # 4 checkpoints × k = 64, 4.7M parameters
    python benchmarks/cluster.py --quick    # 4 checkpoints × k = 16, 1.3M parameters
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import joblib
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results  # noqa: E402

from volsk import LocalVolumeEstimator  # noqa: E402
from volsk.sweeps import Checkpoint, fit_sharded, sweep  # noqa: E402

N_CHECKPOINTS = 4
N_INPUTS, N_FEATURES, N_CLASSES = 64, 256, 10


def make_mlp(seed, width):
    """A 256-width-width-10 GELU MLP with N(0, 1/fan_in) weights: one 'checkpoint' per seed."""
    gen = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(N_FEATURES, width), torch.nn.GELU(),
        torch.nn.Linear(width, width), torch.nn.GELU(),
        torch.nn.Linear(width, N_CLASSES),
    )
    with torch.no_grad():
        for p in net.parameters():
            scale = p.shape[-1] ** -0.5 if p.ndim > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return net


class SubmitLog:
    """Records what ``distributed.Client`` sends: the pickled size of each submitted task and
    of each scatter (times the workers it is broadcast to)."""

    def __init__(self, client_class):
        import cloudpickle

        self.tasks, self.scattered = [], 0
        submit, scatter = client_class.submit, client_class.scatter
        log = self

        def logged_submit(client, func, *args, **kwargs):
            options = {k: v for k, v in kwargs.items() if k not in ("key", "pure")}
            log.tasks.append(len(cloudpickle.dumps((func, args, options))))
            return submit(client, func, *args, **kwargs)

        def logged_scatter(client, data, *args, **kwargs):
            copies = len(client.scheduler_info()["workers"]) if kwargs.get("broadcast") else 1
            log.scattered += copies * len(cloudpickle.dumps(data))
            return scatter(client, data, *args, **kwargs)

        self.restore = lambda: (setattr(client_class, "submit", submit),
                                setattr(client_class, "scatter", scatter))
        client_class.submit, client_class.scatter = logged_submit, logged_scatter

    def reset(self):
        self.tasks, self.scattered = [], 0


def same(frame, samples, reference):
    ref_frame, ref_samples = reference
    return bool(frame.drop(columns="seconds").equals(ref_frame.drop(columns="seconds"))
                and samples.equals(ref_samples))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # low-ESS warnings of random networks: not measured here
    width, k = (1024, 16) if args.quick else (2048, 64)

    from distributed import Client, LocalCluster  # optional dependency

    folder = Path(tempfile.mkdtemp(prefix="volsk-cluster-"))
    modules, checkpoints = {}, {}
    for seed in range(N_CHECKPOINTS):
        net = make_mlp(seed, width)
        torch.save(net.state_dict(), folder / f"seed_{seed}.pt")
        modules[f"seed {seed}"] = net
        checkpoints[f"seed {seed}"] = Checkpoint(folder / f"seed_{seed}.pt",
                                                 functools.partial(make_mlp, seed, width))
    n_parameters = sum(p.numel() for p in net.parameters())
    X = torch.randn(N_INPUTS, N_FEATURES, generator=torch.Generator().manual_seed(1))
    base = LocalVolumeEstimator(n_samples=k, random_state=0, n_threads=1)
    print(f"{N_CHECKPOINTS} checkpoints × k = {k}, {n_parameters:,} parameters", flush=True)

    rows = []

    def record(way, wall, log, identical):
        rows.append({"way": way, "wall_s": wall, "tasks": len(log.tasks) if log else 0,
                     "bytes_per_task": max(log.tasks) if log and log.tasks else 0,
                     "bytes_scattered": log.scattered if log else 0,
                     "identical_to_serial": identical})
        print(f"{way:>24}: {wall:7.1f} s", flush=True)

    start = time.perf_counter()
    reference = sweep(modules, X, estimator=base, n_jobs=1, return_samples=True)
    record("serial", time.perf_counter() - start, None, True)

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                     dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(2)
        client.run(lambda: __import__("volsk.sweeps"))  # warm: imports are not timed
        log = SubmitLog(Client)
        try:
            log.reset()
            start = time.perf_counter()
            with joblib.parallel_config(backend="dask"):
                out = sweep(modules, X, estimator=base, return_samples=True)
            record("dask rows, modules", time.perf_counter() - start, log, same(*out, reference))

            log.reset()
            start = time.perf_counter()
            with joblib.parallel_config(backend="dask", scatter=[X]):
                out = sweep(checkpoints, X, estimator=base, return_samples=True)
            record("dask rows, checkpoints", time.perf_counter() - start, log,
                   same(*out, reference))

            log.reset()
            start = time.perf_counter()
            fits = {name: fit_sharded(LocalVolumeEstimator(**base.get_params()), ckpt, X,
                                      client=client, shard_size=k // 4)
                    for name, ckpt in checkpoints.items()}
            wall = time.perf_counter() - start
        finally:
            log.restore()
    ref_frame, ref_samples = reference
    identical = all(
        est.log_volume_ == ref_frame.loc[ref_frame.model == name, "log_volume"].item()
        and est.samples_.equals(ref_samples[ref_samples.model == name].reset_index(drop=True)
                                [list(est.samples_.columns)])
        for name, est in fits.items())
    record("dask shards", wall, log, identical)

    # what a task carries with nothing scattered (loky, or Ray: X and the weights every time)
    import cloudpickle

    from volsk.sweeps.sources import _ship

    name = next(iter(modules))
    inline = len(cloudpickle.dumps((0, _ship(modules[name]), X, None, base, 0)))
    table = pd.DataFrame(rows)
    text = table.to_string(index=False, float_format=lambda v: f"{v:.1f}")
    text += f"\nbytes per task with nothing scattered (module + X): {inline:,}"
    print(text)
    if not args.no_append:
        append_results(
            "Cluster: checkpoint sweep, serial vs 2 dask workers" + (" (quick)" if args.quick
                                                                     else ""),
            text,
            notes=f"{N_CHECKPOINTS} checkpoints × k = {k} directions of a {n_parameters:,}-"
                  f"parameter MLP on {N_INPUTS} inputs. bytes_per_task: the largest task "
                  "submitted (cloudpickle of function and arguments, futures as keys); "
                  "bytes_scattered: sent once per call, outside the tasks (rows, modules: "
                  "joblib's dask backend scattered each model once, X went with each task; "
                  "rows, checkpoints: scatter=[X] to both workers; shards: fit_sharded "
                  "broadcasts X for each checkpoint's fit). Workers warm before timing. Load "
                  f"average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
                  "cores (other jobs shared the machine).",
        )


if __name__ == "__main__":
    main()
