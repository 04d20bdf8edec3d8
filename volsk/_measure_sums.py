"""Bound priors for implicit directions: per-direction coefficients as blockwise float64 sums.

The large-model evaluator never holds a direction as a row of a matrix: it generates it a block
of coordinates at a time (``volsk._sampling.stream_direction``). These bound measures reduce it
as it comes. θ stays in the model's dtype (each block is widened to float64 for the sums), and
the prior's spread and centre stay scalars when they were given as one number, so a bound
prior holds no per-parameter vector unless its spread or centre varies by parameter. The
numbers are those of the matrix-based bound measures in :mod:`volsk.measures` up to the order
of float64 summation.

A reducer's ``add(V, sel)`` takes a block of unnormalised directions V = P g, shape (B, m)
float64, whose columns are the full coordinates ``sel`` (a slice or an index tensor);
``finish(norm)`` returns the coefficients of u = V / norm as (B,) float64 arrays.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._layout import BLOCK, ActiveLayout
from ._math import (
    gaussian_saturation_radius,
    log_gaussian_radial_integral,
    log_uniform_radial_integral,
)

__all__ = ["StreamedGaussian", "StreamedUniform", "NoSums", "block_sum", "rms"]


def _at(value, sel):
    """A scalar as it is, or a per-parameter vector's entries at ``sel``."""
    return value if isinstance(value, float) else value[sel]


def block_sum(fn, n: int, device) -> float:
    """Σ over blocks [s, e) of ``fn(s, e)`` (a float64 tensor or number), as a float."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, n, BLOCK):
        total += fn(start, min(start + BLOCK, n))
    return float(total)


def rms(theta: torch.Tensor) -> float:
    """The root mean square of ``theta`` (any dtype), summed in float64 block by block.

    Examples
    --------
    >>> import torch
    >>> from volsk._measure_sums import rms
    >>> rms(torch.tensor([3.0, 4.0], dtype=torch.float16)) == (12.5) ** 0.5
    True
    """
    def squares(s, e):
        block = theta[s:e].to(torch.float64)
        return torch.dot(block, block)

    return math.sqrt(block_sum(squares, theta.numel(), theta.device) / max(1, theta.numel()))


class StreamedGaussian:
    """N(mean, diag σ²) bound to θ for implicit directions.

    Along a ray the exponent is −½(a r² + 2 b r + c): a = Σ u²/σ², b = Σ u (θ − m)/σ² over
    the active coordinates, c = Σ (θ − m)²/σ² (computed once here).

    Parameters
    ----------
    theta : torch.Tensor (n,)
        The anchor in the model's dtype.
    mask : torch.Tensor (n,) bool
        The active coordinates.
    sigma, mean : float or torch.Tensor (n,) float64
    """

    def __init__(self, theta, mask, sigma, mean):
        self.theta, self.mask, self.sigma, self.mean = theta, mask, sigma, mean
        self.layout = ActiveLayout.from_mask(mask)
        self.n = self.layout.n_active
        self.inv_var = sigma ** -2 if isinstance(sigma, float) else sigma.pow(-2)
        n_all, device = theta.numel(), theta.device

        def c_terms(s, e):
            d = theta[s:e].to(torch.float64) - _at(mean, slice(s, e))
            terms = d * d * _at(self.inv_var, slice(s, e))
            return torch.where(mask[s:e], terms, torch.zeros((), dtype=torch.float64,
                                                             device=device)).sum()

        c = block_sum(c_terms, n_all, device)
        if isinstance(sigma, float):
            log_sigma = self.n * math.log(sigma)
        else:
            log_sigma = block_sum(lambda s, e: sigma[s:e].log()[mask[s:e]].sum(), n_all, device)
        self.log_normalizer = -0.5 * self.n * math.log(2 * math.pi) - log_sigma - 0.5 * c

    def coefficient_reducer(self):
        return _GaussianSums(self)

    def ray_coefficients(self, U):
        """The coefficients of the rows of U (B, n_active) float64, unit vectors."""
        return _reduce_rows(self.coefficient_reducer(), U, self.layout)

    def search_limit(self, coef, batch):
        return gaussian_saturation_radius(self.n, coef["a"], coef["b"])

    def log_radial_integral(self, coef, R):
        return self.log_normalizer + log_gaussian_radial_integral(self.n, coef["a"], coef["b"], R)


class _GaussianSums:
    def __init__(self, bound):
        self.bound = bound
        self.a = self.b = 0.0

    def add(self, V, sel):
        g = self.bound
        offset = g.theta[sel].to(torch.float64)
        if not (isinstance(g.mean, float) and g.mean == 0.0):
            offset = offset - _at(g.mean, sel)
        if isinstance(g.inv_var, float):  # two dot products per row, no temporaries
            self.a = self.a + torch.einsum("bm,bm->b", V, V) * g.inv_var
            self.b = self.b + (V @ offset) * g.inv_var
        else:
            self.a = self.a + (V * V * g.inv_var[sel]).sum(-1)
            self.b = self.b + V @ (offset * g.inv_var[sel])

    def finish(self, norm):
        a, b = self.a / (norm * norm), self.b / norm
        return {"a": np.atleast_1d(a.cpu().numpy()), "b": np.atleast_1d(b.cpu().numpy())}


class StreamedUniform:
    """The uniform prior on the box ∏[mean − half, mean + half] bound to θ for implicit
    directions: the ray meets the box in [r_in, r_out] (the slab method, reduced blockwise)."""

    def __init__(self, theta, mask, mean, half):
        self.theta, self.mask, self.mean, self.half = theta, mask, mean, half
        self.layout = ActiveLayout.from_mask(mask)
        self.n = self.layout.n_active
        n_all, device = theta.numel(), theta.device

        def log_widths(s, e):
            mean_s, half_s = _at(mean, slice(s, e)), _at(half, slice(s, e))
            width = (mean_s + half_s) - (mean_s - half_s)
            if isinstance(width, float):
                return math.log(width) * int(mask[s:e].sum())
            return width.log()[mask[s:e]].sum()

        self.log_normalizer = -block_sum(log_widths, n_all, device)

    def coefficient_reducer(self):
        return _BoxLimits(self)

    def ray_coefficients(self, U):
        """The coefficients of the rows of U (B, n_active) float64, unit vectors."""
        return _reduce_rows(self.coefficient_reducer(), U, self.layout)

    def search_limit(self, coef, batch):
        return np.where(coef["r_out"] > coef["r_in"], coef["r_out"], 0.0)

    def log_radial_integral(self, coef, R):
        return self.log_normalizer + log_uniform_radial_integral(
            self.n, coef["r_in"], coef["r_out"], R
        )


class _BoxLimits:
    def __init__(self, bound):
        self.bound = bound
        self.near = -math.inf
        self.far = math.inf

    def add(self, V, sel):
        box = self.bound
        theta = box.theta[sel].to(torch.float64)
        mean, half = _at(box.mean, sel), _at(box.half, sel)
        low, high = mean - half, mean + half
        # u_i = 0 leaves coordinate i fixed: inside its slab or the ray misses the box
        fixed = V == 0
        safe = torch.where(fixed, torch.ones_like(V), V)
        t1, t2 = (low - theta) / safe, (high - theta) / safe
        inside = (theta >= low) & (theta <= high)
        inf = torch.full((), math.inf, dtype=torch.float64, device=V.device)
        near = torch.where(fixed, torch.where(inside, -inf, inf), torch.minimum(t1, t2))
        far = torch.where(fixed, torch.where(inside, inf, -inf), torch.maximum(t1, t2))
        self.near = torch.clamp(near.max(-1).values, min=self.near) if isinstance(
            self.near, float) else torch.maximum(self.near, near.max(-1).values)
        self.far = torch.clamp(far.min(-1).values, max=self.far) if isinstance(
            self.far, float) else torch.minimum(self.far, far.min(-1).values)

    def finish(self, norm):
        # t = (bound − θ)/u_i = norm · (bound − θ)/v_i: the limits scale with the norm
        r_in = (self.near * norm).clamp_min(0.0)
        r_out = self.far * norm
        return {"r_in": np.atleast_1d(r_in.cpu().numpy()),
                "r_out": np.atleast_1d(r_out.cpu().numpy())}


class NoSums:
    """The reducer of a measure without per-direction coefficients (Lebesgue)."""

    def add(self, V, sel):
        pass

    def finish(self, norm):
        return {}


def _reduce_rows(reducer, U, layout):
    for start, stop, sel in layout.blocks(device=U.device):
        reducer.add(U[:, start:stop], sel)
    return reducer.finish(torch.ones(U.shape[0], dtype=torch.float64, device=U.device))
