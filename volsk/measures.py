"""Measures on parameter space: Lebesgue volume, Gaussian and uniform (box) priors.

Each measure reduces, along a ray θ + r·u, to a one-dimensional radial integral
I(u) = ∫_0^R ρ(θ + r u) r^{n-1} dr (the user guide's method page derives it). A measure object
is bound to the anchor with :meth:`bind`, which returns an object that computes per-direction
coefficients (reductions over the parameter vector, float64) and the log radial integral from
them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ._math import (
    gaussian_saturation_radius,
    log_gaussian_radial_integral,
    log_uniform_radial_integral,
)
from ._measure_sums import NoSums, StreamedGaussian, StreamedUniform, rms

__all__ = ["Lebesgue", "Gaussian", "Uniform", "MeasureContext", "resolve_measure"]


@dataclass
class MeasureContext:
    """What a measure may look at when it is bound to an anchor.

    ``theta`` (n,) float64, ``mask`` (n,) bool of the coordinates directions move in (flat
    coordinates integrated out are False), ``space`` the :class:`~volsk._evaluate.ParameterSpace`,
    ``module`` the evaluator's private copy of the model (never the user's). ``streamed``:
    the directions are implicit (the large-model evaluator): ``theta`` is in the model's dtype
    and the bound measure reduces each direction block by block (see
    :mod:`volsk._measure_sums`).
    """

    theta: torch.Tensor
    mask: torch.Tensor
    space: object = None
    module: object = None
    streamed: bool = False


def _per_parameter(value, name, ctx, *, positive=True):
    """A scalar, a length-n array or a {parameter name: value} dict → (n,) float64 tensor."""
    n = ctx.theta.numel()
    if isinstance(value, dict):
        if ctx.space is None:
            raise ValueError(f"{name} given as a dict needs the model's parameter names")
        unknown = set(value) - set(ctx.space.names)
        if unknown:
            raise ValueError(
                f"{name} names parameters the model does not have (or that are frozen): "
                f"{sorted(unknown)}; trainable parameters are {ctx.space.names}"
            )
        missing = [k for k in ctx.space.names if k not in value]
        if missing:
            raise ValueError(f"{name} dict has no value for parameters {missing}")
        pieces = []
        for k, shape in zip(ctx.space.names, ctx.space.shapes, strict=True):
            v = torch.as_tensor(np.asarray(value[k], dtype=np.float64))
            try:
                pieces.append(v.expand(shape).reshape(-1))
            except RuntimeError:
                raise ValueError(
                    f"{name}[{k!r}] must be a scalar or have the parameter's shape "
                    f"{tuple(shape)}, got shape {tuple(v.shape)}"
                ) from None
        out = torch.cat(pieces)
    else:
        out = torch.as_tensor(np.asarray(value, dtype=np.float64))
        if out.ndim == 0:
            out = out.expand(n).clone()
        elif out.shape != (n,):
            raise ValueError(
                f"{name} must be a scalar or have one entry per trainable parameter "
                f"(length {n}), got shape {tuple(out.shape)}"
            )
    if not torch.isfinite(out).all():
        raise ValueError(f"{name} contains NaN or infinite entries")
    if positive and (out <= 0).any():
        raise ValueError(f"{name} must be > 0 everywhere, got min {float(out.min())}")
    return out.to(ctx.theta.device)


class Lebesgue:
    """Lebesgue measure (ρ = 1): the volume of the neighbourhood.

    Infinite when some direction never reaches the cutoff.

    Examples
    --------
    >>> from volsk.measures import Lebesgue
    >>> Lebesgue().is_probability
    False
    """

    is_probability = False
    name = "lebesgue"

    def bind(self, ctx: MeasureContext):
        return _BoundLebesgue(int(torch.count_nonzero(ctx.mask)))

    def __repr__(self):
        return "Lebesgue()"


class _BoundLebesgue:
    def __init__(self, n):
        self.n = n
        self.log_normalizer = 0.0

    def ray_coefficients(self, U):
        return {}

    def coefficient_reducer(self):
        return NoSums()

    def search_limit(self, coef, batch):
        return np.full(batch, np.inf)

    def log_radial_integral(self, coef, R):
        R = np.asarray(R, dtype=np.float64)
        with np.errstate(divide="ignore"):
            return self.n * np.log(R) - math.log(self.n)


def _resolve_mean(measure, ctx, init_kind, spread_is_init):
    """A measure's ``mean``: "auto" is the init mean when the spread is "init", else 0."""
    mean = measure.mean
    if isinstance(mean, str):
        if mean == "auto":
            mean = "init" if spread_is_init else 0.0
        if mean == "init":
            from .priors import prior_for_context

            flat = prior_for_context(ctx, init_kind).flat(ctx.space.names, "mean")
            return flat.to(ctx.theta.device)
        if isinstance(mean, str):
            raise ValueError(f'mean must be a float, an array, a dict, "auto" or "init"; got '
                             f"{mean!r}")
    return _per_parameter(mean, "mean", ctx, positive=False)


def _is_number(value) -> bool:
    return not isinstance(value, (str, dict)) and np.ndim(value) == 0


def _number(value, name, *, positive=True) -> float:
    """One number for every parameter, checked as :func:`_per_parameter` checks a vector."""
    out = float(np.asarray(value, dtype=np.float64))
    if not math.isfinite(out):
        raise ValueError(f"{name} contains NaN or infinite entries")
    if positive and out <= 0:
        raise ValueError(f"{name} must be > 0 everywhere, got min {out}")
    return out


def _streamed_mean(measure, ctx, spread_is_init, init_kind):
    """The centre for a streamed bound measure: a float when it is one number."""
    mean = measure.mean
    if isinstance(mean, str) and mean == "auto" and not spread_is_init:
        return 0.0
    if _is_number(mean):
        return _number(mean, "mean", positive=False)
    return _resolve_mean(measure, ctx, init_kind, spread_is_init)


def _short(v):
    return repr(v) if np.ndim(v) == 0 or isinstance(v, (str, dict)) else f"<array {np.shape(v)}>"


class Gaussian:
    """Gaussian prior N(mean, diag(sigma²)).

    Parameters
    ----------
    sigma : float, array-like of length n, dict {parameter name: float}, "auto" or "init"
        Standard deviation(s). "auto" is the root-mean-square of the anchor's parameters;
        "init" is, per tensor, the standard deviation of the model's own initialisation
        (:func:`volsk.priors.init_prior`).
    mean : float, array-like of length n, dict, "init" or "auto", default="auto"
        "init": the mean of the initialisation (1 for a LayerNorm weight, 0 for PyTorch's and
        Hugging Face's random inits). "auto": "init" when ``sigma="init"``, else 0.

    Examples
    --------
    >>> from volsk.measures import Gaussian
    >>> Gaussian(sigma=0.5)
    Gaussian(sigma=0.5, mean='auto')
    >>> Gaussian(sigma="init", mean=0.0)
    Gaussian(sigma='init', mean=0.0)
    """

    is_probability = True
    name = "gaussian"

    def __init__(self, sigma="auto", mean="auto"):
        self.sigma = sigma
        self.mean = mean

    def __repr__(self):
        return f"Gaussian(sigma={_short(self.sigma)}, mean={_short(self.mean)})"

    def _sigma_is_init(self):
        return isinstance(self.sigma, str) and self.sigma == "init"

    def resolve_sigma(self, ctx):
        sigma = self.sigma
        if isinstance(sigma, str):
            if sigma == "auto":
                rms = float(ctx.theta.pow(2).mean().sqrt())
                if not rms > 0:
                    raise ValueError('sigma="auto" needs a non-zero anchor; pass sigma explicitly')
                return torch.full_like(ctx.theta, rms)
            if sigma == "init":
                from .priors import init_spread

                return _per_parameter(init_spread(ctx, "gaussian"), "sigma", ctx)
            raise ValueError(f'sigma must be a float, an array, "auto" or "init"; got {sigma!r}')
        return _per_parameter(sigma, "sigma", ctx)

    def resolve_mean(self, ctx):
        return _resolve_mean(self, ctx, "gaussian", self._sigma_is_init())

    def bind(self, ctx: MeasureContext):
        if ctx.streamed:
            if _is_number(self.sigma):
                sigma = _number(self.sigma, "sigma")
            elif isinstance(self.sigma, str) and self.sigma == "auto":
                sigma = rms(ctx.theta)
                if not sigma > 0:
                    raise ValueError('sigma="auto" needs a non-zero anchor; pass sigma explicitly')
            else:
                sigma = self.resolve_sigma(ctx)
            return StreamedGaussian(ctx.theta, ctx.mask, sigma,
                                    _streamed_mean(self, ctx, self._sigma_is_init(), "gaussian"))
        sigma = self.resolve_sigma(ctx)
        mean = self.resolve_mean(ctx)
        m = ctx.mask
        return _BoundGaussian(ctx.theta[m], sigma[m], mean[m])


class _BoundGaussian:
    """Along a ray the exponent is −½(a r² + 2 b r + c): a = Σ u²/σ², b = Σ u (θ − m)/σ²."""

    def __init__(self, theta, sigma, mean):
        self.n = theta.numel()
        self.inv_var = sigma.pow(-2)  # (n,)
        self.isotropic = bool(self.inv_var.numel() > 0 and (self.inv_var == self.inv_var[0]).all())
        self.offset = (theta - mean) * self.inv_var  # (n,)
        c = float(((theta - mean).pow(2) * self.inv_var).sum())
        self.sigma = sigma
        self.log_normalizer = (
            -0.5 * self.n * math.log(2 * math.pi) - float(sigma.log().sum()) - 0.5 * c
        )

    def ray_coefficients(self, U):
        # U (B, n) float64 unit directions in the active coordinates
        if self.isotropic:  # one pass: a = |u|² / σ²
            a = torch.linalg.vector_norm(U, dim=1).pow(2) * self.inv_var[0]
        else:
            a = (U.pow(2) * self.inv_var).sum(1)
        b = (U * self.offset).sum(1)
        return {"a": a.cpu().numpy(), "b": b.cpu().numpy()}

    def search_limit(self, coef, batch):
        return gaussian_saturation_radius(self.n, coef["a"], coef["b"])

    def log_radial_integral(self, coef, R):
        return self.log_normalizer + log_gaussian_radial_integral(self.n, coef["a"], coef["b"], R)


class Uniform:
    """Uniform prior on the box ∏[mean_i − b_i, mean_i + b_i].

    PyTorch's default ``nn.Linear``/``nn.Conv`` initialisation is such a box with
    b = 1/sqrt(fan_in); ``bounds="init"`` derives it from the model. The anchor may lie outside
    the box: rays that miss it contribute zero (log −∞); if every ray does, ``fit`` raises.

    Parameters
    ----------
    bounds : float, array-like of length n, dict {parameter name: float} or "init"
        Half-widths b_i > 0. "init": per tensor, √3 × the standard deviation of the model's own
        initialisation (:func:`volsk.priors.init_prior`), which is b for a U(−b, b) init.
    mean : float, array-like, dict, "init" or "auto", default="auto"
        The box's centre. "auto": the initialisation's mean when ``bounds="init"`` (so a
        LayerNorm weight's box is centred on 1), else 0.

    Examples
    --------
    >>> from volsk.measures import Uniform
    >>> Uniform(bounds=0.1)
    Uniform(bounds=0.1, mean='auto')
    """

    is_probability = True
    name = "uniform"

    def __init__(self, bounds="init", mean="auto"):
        self.bounds = bounds
        self.mean = mean

    def __repr__(self):
        return f"Uniform(bounds={_short(self.bounds)}, mean={_short(self.mean)})"

    def _bounds_is_init(self):
        return isinstance(self.bounds, str) and self.bounds == "init"

    def resolve_bounds(self, ctx):
        bounds = self.bounds
        if isinstance(bounds, str):
            if bounds != "init":
                raise ValueError(f'bounds must be a float, an array or "init"; got {bounds!r}')
            from .priors import init_spread

            bounds = init_spread(ctx, "uniform")
        return _per_parameter(bounds, "bounds", ctx)

    def resolve_mean(self, ctx):
        return _resolve_mean(self, ctx, "uniform", self._bounds_is_init())

    def bind(self, ctx: MeasureContext):
        if ctx.streamed:
            half = (_number(self.bounds, "bounds") if _is_number(self.bounds)
                    else self.resolve_bounds(ctx))
            return StreamedUniform(ctx.theta, ctx.mask,
                                   _streamed_mean(self, ctx, self._bounds_is_init(), "uniform"),
                                   half)
        half = self.resolve_bounds(ctx)
        mean = self.resolve_mean(ctx)
        m = ctx.mask
        return _BoundUniform(ctx.theta[m], mean[m] - half[m], mean[m] + half[m])


class _BoundUniform:
    """The ray meets the box in [r_in, r_out] (a convex set); the density is 1/vol inside."""

    def __init__(self, theta, low, high):
        self.n = theta.numel()
        self.theta, self.low, self.high = theta, low, high
        self.log_normalizer = -float((high - low).log().sum())

    def ray_coefficients(self, U):
        # slab method; u_i = 0 leaves coordinate i fixed: inside its slab or the ray misses
        with torch.no_grad():
            safe = torch.where(U == 0, torch.ones_like(U), U)
            t1 = (self.low - self.theta) / safe
            t2 = (self.high - self.theta) / safe
            near = torch.minimum(t1, t2)
            far = torch.maximum(t1, t2)
            inside = (self.theta >= self.low) & (self.theta <= self.high)
            fixed = U == 0
            near = torch.where(fixed, torch.where(inside, -np.inf, np.inf), near)
            far = torch.where(fixed, torch.where(inside, np.inf, -np.inf), far)
            r_in = near.max(1).values.clamp_min(0.0)
            r_out = far.min(1).values
        return {"r_in": r_in.cpu().numpy(), "r_out": r_out.cpu().numpy()}

    def search_limit(self, coef, batch):
        # beyond r_out the density is 0: a crossing there changes nothing; a ray that misses
        # the box (r_out <= r_in) needs no search at all
        return np.where(coef["r_out"] > coef["r_in"], coef["r_out"], 0.0)

    def log_radial_integral(self, coef, R):
        return self.log_normalizer + log_uniform_radial_integral(
            self.n, coef["r_in"], coef["r_out"], R
        )


MEASURES = ("lebesgue", "gaussian", "uniform")


def resolve_measure(measure, sigma="auto", bounds="init"):
    """Turn the estimator's ``measure``/``sigma``/``bounds`` parameters into a measure object.

    Examples
    --------
    >>> from volsk.measures import resolve_measure
    >>> resolve_measure("gaussian", sigma=0.5)
    Gaussian(sigma=0.5, mean='auto')
    >>> resolve_measure("lebesgue")
    Lebesgue()
    """
    if isinstance(measure, str):
        if measure == "lebesgue":
            return Lebesgue()
        if measure == "gaussian":
            return Gaussian(sigma=sigma)
        if measure == "uniform":
            return Uniform(bounds=bounds)
        raise ValueError(
            f"measure must be one of {MEASURES} or a volsk.measures object, got {measure!r}"
        )
    if hasattr(measure, "bind") and hasattr(measure, "is_probability"):
        return measure
    raise TypeError(
        f"measure must be one of {MEASURES} or a volsk.measures object (Lebesgue, Gaussian, "
        f"Uniform), got {type(measure).__name__}"
    )
