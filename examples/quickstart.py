"""
Quickstart: how much of parameter space does a trained network own?
===================================================================

Train a small network, then ask: if we drew its weights at random from a Gaussian prior, how
likely would we be to land on a network that behaves like it? volsk estimates that prior
probability — the measure of the neighbourhood of the trained weights θ in which the mean KL
divergence from θ's predictions on some inputs X stays below a cutoff — and ``-log`` of it is
the network's information content.

The network is the 64-64-10 GELU MLP of Scherlis & Belrose, trained on scikit-learn's 8x8
digits (4810 parameters, a couple of seconds on one CPU thread).
"""

# %%
# Train the network
# -----------------
# :func:`~volsk.experiments.digits.train_digits_mlp` is the paper's recipe: AdamW with a
# cosine schedule and an explicit L2 penalty ``0.5 · 5e-4 · |θ|²`` on the mean loss over 1024
# training digits. That penalty is a Gaussian prior N(0, σ²) with
# σ = 1/sqrt(5e-4 · 1024) ≈ 1.40 (:func:`~volsk.experiments.digits.prior_sigma`), the prior we
# measure with below.
import torch

from volsk import LocalVolumeEstimator
from volsk.experiments.digits import prior_sigma, train_digits_mlp
from volsk.plot import plot_samples

torch.set_num_threads(1)  # small operations on a shared CPU: one thread is fastest

run = train_digits_mlp(epochs=25, seed=0)
model = run.model
X = run.splits.X_test  # 773 held-out digits: the neighbourhood is defined on these
print(f"test accuracy {run.test_accuracy:.3f}, "
      f"{sum(p.numel() for p in model.parameters())} parameters, sigma = {prior_sigma():.4f}")

# %%
# Estimate
# --------
# The estimator is a scikit-learn estimator whose ``fit`` takes the model and the inputs.
# ``cutoff`` is in the cost's units: nats of mean KL divergence. The "diag_hessian"
# preconditioner draws directions stretched along flat directions of the cost (importance
# sampling); ``preconditioner_eps="auto"`` picks its regulariser with a short pilot run.
est = LocalVolumeEstimator(
    cutoff=1e-2,
    measure="gaussian",
    sigma=prior_sigma(),
    preconditioner="diag_hessian",
    preconditioner_eps="auto",
    n_samples=200,
    random_state=0,
)
est.fit(model, X)

print(f"log-volume        {est.log_volume_:12,.1f} nats")
print(f"log10-volume      {est.log10_volume_:12,.1f}   (the probability is 10^this)")
print(f"description length{est.bits_:12,.1f} bits")
print(f"95% lower bound   {est.log_volume_lower_bound(0.95):12,.1f} nats")
print(f"effective sample size {est.effective_sample_size_:.2f} of {est.n_samples} directions")
print(f"eps chosen by the pilot: {est.preconditioner_eps_}")

# %%
# The same numbers as a one-row table, with diagnostics (what a sweep collects per row):
est.results_frame().transpose()

# %%
# What the numbers mean
# ---------------------
# * ``log_volume_`` is log µ̂ in nats: the natural log of the estimated prior probability.
#   ``log10_volume_`` is the same number divided by ln 10, ``bits_`` is −log2 µ̂, the
#   description length of the network at this tolerance.
# * The estimate is unbiased in µ, so by Markov's inequality it overestimates log µ by more
#   than t nats with probability at most e^−t: ``log_volume_lower_bound(0.95)`` =
#   log µ̂ + log 0.05 is a 95% lower confidence bound. It can fall short by far more —
#   which is why a larger estimate (from a better preconditioner) is a better one.
# * The effective sample size is close to 1: in 4810 dimensions the per-direction estimates
#   spread over thousands of nats and the largest dominates the mean. That is expected; the
#   :ref:`user guide <aggregate-and-best-sample>` explains why it does not make the estimate
#   useless.
#
# One row per direction:
est.samples_.head()

# %%
# The per-direction estimates
# ---------------------------
# The aggregate (dashed) sits at the right edge of the histogram: log µ̂ = logsumexp(ℓ) − log k
# is within log k nats of the largest sample.
ax = plot_samples({"diag_hessian": est})
ax.set_title("Digits MLP, KL cutoff 1e-2: per-direction log-volume estimates")
