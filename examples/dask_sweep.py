"""
A sweep on a dask cluster
=========================

:func:`volsk.sweep <volsk.sweeps.sweep>` runs its rows through ``joblib.Parallel`` and never
chooses a backend: wrap the call in ``joblib.parallel_config(backend="dask")`` with a
``distributed.Client`` alive, and the rows run on the dask workers. Every row's directions are
a pure function of its seed, so the table is the same as the sequential one — only the
``seconds`` column differs.

To keep the documentation build light, this example starts a ``LocalCluster`` with
``processes=False``: two worker *threads* inside this process. On a real cluster the workers
are processes on other machines; the recipe at the end shows that set-up, which needs the
``if __name__ == "__main__":`` guard (worker processes re-import the script).
"""

# %%
# Three networks, trained with different seeds
# --------------------------------------------
import warnings

import joblib
import pandas as pd
import torch
from dask.distributed import Client, LocalCluster

from volsk import LocalVolumeEstimator
from volsk.experiments.digits import prior_sigma, train_digits_mlp
from volsk.results import LowEffectiveSampleSizeWarning
from volsk.sweeps import sweep

torch.set_num_threads(1)  # small operations on a shared CPU: one thread is fastest
# ESS ≈ 1 is expected in thousands of dimensions (the quickstart explains why):
# the warning that says so after every fit is switched off here
warnings.filterwarnings("ignore", category=LowEffectiveSampleSizeWarning)

runs = {f"seed {s}": train_digits_mlp(epochs=10, seed=s) for s in range(3)}
models = {name: run.model for name, run in runs.items()}
X = runs["seed 0"].splits.X_test  # the same held-out digits for every network

base = LocalVolumeEstimator(sigma=prior_sigma(), preconditioner="diag_hessian",
                            preconditioner_eps=1e-2, n_samples=30)
grid = {"cutoff": [1e-3, 1e-2]}

# %%
# On the cluster
# --------------
# (Inside the guard, tables are printed: a gallery shows the value of a cell's last line only
# at the top level.)
if __name__ == "__main__":
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                     dashboard_address=None) as cluster,
        Client(cluster) as client,
        joblib.parallel_config(backend="dask"),
    ):
        on_dask = sweep(models, X, grid, estimator=base, random_state=0)

    columns = ["model", "cutoff", "log_volume", "lower_bound", "ess", "seconds"]
    print(on_dask[columns].to_string(index=False, formatters={"cutoff": "{:g}".format},
                                     float_format="{:.2f}".format))

# %%
# The same table, sequentially
# ----------------------------
if __name__ == "__main__":
    here = sweep(models, X, grid, estimator=base, random_state=0)
    numbers = ["log_volume", "lower_bound", "ess", "n_evaluations"]
    identical = on_dask[numbers].equals(here[numbers])
    print(f"dask and sequential tables identical: {identical}")
    seconds = pd.DataFrame({"model": here["model"], "cutoff": here["cutoff"],
                            "dask seconds": on_dask["seconds"],
                            "sequential seconds": here["seconds"]})
    print(seconds.to_string(index=False, formatters={"cutoff": "{:g}".format},
                            float_format="{:.2f}".format))

# %%
# A real cluster
# --------------
# The script below is what runs on many machines. ``scatter=[X]`` sends the inputs to every
# worker once instead of with every row; :class:`~volsk.sweeps.Checkpoint` objects make each
# worker load its own model from a shared filesystem, so the client never holds them all.
# Worker processes run with one torch thread each. With GPUs, start one worker per GPU
# (``dask_cuda.LocalCUDACluster()``, or ``dask worker ... --nworkers 1`` with
# ``CUDA_VISIBLE_DEVICES`` set per worker): ``device="auto"`` puts each row on its worker's
# GPU.
#
# .. code-block:: python
#
#    import joblib
#    import torch
#    from dask.distributed import Client
#
#    from volsk import LocalVolumeEstimator
#    from volsk.experiments.digits import make_digits_mlp
#    from volsk.sweeps import Checkpoint, sweep
#
#    if __name__ == "__main__":  # worker processes import this file: guard the work
#        client = Client("tcp://scheduler:8786")  # or Client(LocalCluster(n_workers=8))
#        X = torch.load("/shared/run/heldout_inputs.pt")
#        models = {step: Checkpoint(f"/shared/run/step_{step}.pt", make_digits_mlp)
#                  for step in range(0, 10_000, 500)}
#        with joblib.parallel_config(backend="dask", scatter=[X]):
#            frame = sweep(models, X, {"cutoff": [1e-3, 1e-2, 1e-1]},
#                          estimator=LocalVolumeEstimator(sigma=1.4, n_samples=1000),
#                          cache_dir="/shared/run/volumes")  # re-runs skip finished rows
#        frame.to_csv("volumes.csv")
