"""Small models whose neighbourhoods have closed forms (shared by the tests)."""

import math

import numpy as np
import torch


def quadratic_problem(curvatures, anchor=None, dtype=torch.float64):
    """A bias-free linear model and inputs X such that mse(outputs, anchor) = Σ λ_i δ_i².

    X = diag(sqrt(n λ_i)) (n examples): mean_j (δ·x_j)² = (1/n) Σ_j n λ_j δ_j².
    """
    lam = np.asarray(curvatures, dtype=np.float64)
    n = lam.size
    model = torch.nn.Linear(n, 1, bias=False).to(dtype)
    with torch.no_grad():
        w = torch.zeros(1, n) if anchor is None else torch.as_tensor(anchor, dtype=dtype)
        model.weight.copy_(w.reshape(1, n))
    X = torch.diag(torch.as_tensor(np.sqrt(n * lam), dtype=dtype))
    return model, X


def rotated_quadratic_problem(H, anchor=None, dtype=torch.float64):
    """mse(outputs, anchor) = δᵀ H δ for a symmetric positive-definite H (X = sqrt(n)·H^{1/2})."""
    H = np.asarray(H, dtype=np.float64)
    n = H.shape[0]
    vals, vecs = np.linalg.eigh(H)
    root = vecs @ np.diag(np.sqrt(vals)) @ vecs.T
    model = torch.nn.Linear(n, 1, bias=False).to(dtype)
    with torch.no_grad():
        w = torch.zeros(1, n) if anchor is None else torch.as_tensor(anchor, dtype=dtype)
        model.weight.copy_(w.reshape(1, n))
    X = torch.as_tensor(math.sqrt(n) * root, dtype=dtype)
    return model, X


def log_ellipsoid_volume(curvatures, cutoff):
    """log volume of {δ : Σ λ_i δ_i² < ε}."""
    from scipy.special import gammaln

    lam = np.asarray(curvatures, dtype=np.float64)
    n = lam.size
    return (n / 2) * math.log(math.pi) - gammaln(n / 2 + 1) + 0.5 * np.sum(np.log(cutoff / lam))


def small_mlp(seed=0, n=40):
    """A 5-8-3 GELU MLP with N(0, 0.7²) parameters and ``n`` standard-normal inputs."""
    gen = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.7)
    X = torch.randn(n, 5, generator=gen)
    return net, X


def trained(model, optimizer, steps=3):
    """A few optimizer steps on a fixed X (16 × 3) of squared outputs; returns X."""
    X = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        optimizer.zero_grad()
        model(X).pow(2).mean().backward()
        optimizer.step()
    return X
