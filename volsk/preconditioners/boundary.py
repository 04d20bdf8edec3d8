"""Boundary-fitted preconditioners: a base map corrected by a diagonal fitted to pilot radii.

Every preconditioned estimate is the naive estimate in the base map's coordinates z
(δ = P_base z, det P_base = 1): there the neighbourhood is P_base⁻¹ S, and a direction w on the
sphere of z meets its boundary at the radius ρ(w). Under an ellipsoid-like model of that region,
1/ρ(w)² ≈ Σ_t a_t |w_t|² with w_t the direction's part in group t of coordinates (a parameter
tensor, an output row of a weight matrix or an input column), which is linear in a ≥ 0. A pilot's
radii therefore fit a by non-negative least squares (relative residuals, shrunk towards the
isotropic fit), and the map becomes

    P = P_base · D,   D = diag(s),   s_j ∝ c_j^{−1/2},   c_j = Σ_partitions a_{group(j)},

normalised so Σ_j log s_j = 0 (det P = det P_base = 1). D acts *before* the base map, on z: a
correction after it (D·P_base) would fit the curvature in parameter coordinates and count the
base's own stretch twice. With ``groups="row+column"`` each weight's c is a row term plus a
column term (both fitted at once, still linear).

Validity: the fit uses only pilots drawn from seed streams of their own (one per round), and the
map of the final directions is fixed before any of them is drawn, so no direction both shapes
the map and is weighted by it — the estimate stays an unbiased importance-sampling estimate.
A round's map is kept only when its own fresh pilot's estimate does not fall more than the eps
rule's tie threshold below the best kept so far; the last kept map is the result.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from .._sampling import NormalStream
from ..results import summarise_samples
from .context import PreconditionerContext
from .kfac import _repr
from .maps import BoundPreconditioner
from .selection import EPS_TIE_NATS

__all__ = ["BoundaryFitted", "BoundaryMap", "BoundaryStart", "GROUPS", "ROUND_COLUMNS",
           "group_partitions", "fit_group_curvature", "correction_log_scales", "fit_boundary"]

#: The groupings a correction can be constant on.
GROUPS = ("tensor", "row", "column", "row+column")

#: Columns of the rounds table (the estimator's ``boundary_pilot_``).
ROUND_COLUMNS = ("round", "groups", "directions", "log_volume", "max_sample", "ess",
                 "evaluations_per_direction", "accepted", "selected")

_DRAW_ROWS = 64  # pilot directions redrawn together to measure their group norms…
_DRAW_BYTES = 64 << 20  # …as long as their float64 rows stay under 64 MiB (else fewer, ≥ 1)


def group_partitions(space, mask, groups) -> list[torch.Tensor]:
    """Group ids of the active coordinates, one (n_active,) int64 tensor per partition.

    ``"tensor"``: one group per parameter tensor. ``"row"``: a tensor of two or more
    dimensions gets one group per index of its first (output) dimension, a vector one group.
    ``"column"``: the same with the remaining dimensions (inputs). ``"row+column"``: both
    partitions. Groups left without active coordinates are dropped (ids stay contiguous).

    Examples
    --------
    >>> import torch
    >>> from volsk._evaluate import ParameterSpace
    >>> from volsk.preconditioners.boundary import group_partitions
    >>> space = ParameterSpace.of(torch.nn.Linear(3, 2))
    >>> [p.tolist() for p in group_partitions(space, torch.ones(8, dtype=bool), "row")]
    [[0, 0, 0, 1, 1, 1, 2, 2]]
    """
    if groups not in GROUPS:
        raise ValueError(f"groups must be one of {GROUPS}, got {groups!r}")
    kinds = ("row", "column") if groups == "row+column" else (groups,)
    cols = torch.nonzero(torch.as_tensor(mask).cpu()).flatten()
    out = []
    for kind in kinds:
        ids, first = [], 0
        for shape, numel in zip(space.shapes, space.numels):
            shape = tuple(shape)
            if kind == "tensor" or len(shape) < 2:
                local = torch.zeros(numel, dtype=torch.int64)
            elif kind == "row":
                local = torch.arange(shape[0]).repeat_interleave(numel // shape[0])
            else:
                local = torch.arange(numel // shape[0]).repeat(shape[0])
            ids.append(local + first)
            first += int(local.max()) + 1 if numel else 0
        active = torch.cat(ids)[cols]
        out.append(torch.unique(active, return_inverse=True)[1])
    return out


def _n_groups(partitions) -> int:
    return sum(int(p.max()) + 1 for p in partitions if p.numel())


def _features(W, partitions):
    """(B, F) group sums of the squared rows of W (B, n): the model's linear features."""
    W2 = W * W
    parts = []
    for ids in partitions:
        F = torch.zeros(W.shape[0], int(ids.max()) + 1, dtype=W.dtype)
        parts.append(F.index_add_(1, ids, W2))
    return torch.cat(parts, 1)


def _per_coordinate(a, partitions) -> torch.Tensor:
    """c_j = Σ over partitions of the coefficient of coordinate j's group."""
    c, first = 0.0, 0
    for ids in partitions:
        size = int(ids.max()) + 1
        c = c + a[first : first + size][ids]
        first += size
    return c


def fit_group_curvature(features, inverse_square_radii, *, shrinkage=0.0) -> np.ndarray:
    """Non-negative coefficients a with 1/ρ_i² ≈ Σ_f a_f X_if, by relative least squares.

    Minimises Σ_i (X_i·a / y_i − 1)² + shrinkage · Σ_f (a_f / a_iso − 1)² over a ≥ 0, where
    a_iso is the best isotropic fit (every a_f equal): relative residuals make every pilot
    direction count alike whatever its radius, and the penalty pulls the groups the pilot
    says little about towards the isotropic map.

    Parameters
    ----------
    features : array of shape (m, F)
        Group sums of each pilot direction's squared coordinates (rows sum to the number of
        partitions).
    inverse_square_radii : array of shape (m,)
        1/ρ_i², finite and > 0.
    shrinkage : float, default=0.0

    Returns
    -------
    numpy.ndarray of shape (F,)

    Examples
    --------
    >>> import numpy as np
    >>> from volsk.preconditioners.boundary import fit_group_curvature
    >>> X = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    >>> fit_group_curvature(X, X @ np.array([4.0, 1.0]), shrinkage=0.0).round(6).tolist()
    [4.0, 1.0]
    """
    # import time: scipy.optimize is needed only when a boundary map is fitted
    from scipy.optimize import nnls

    X = np.asarray(features, dtype=np.float64)
    y = np.asarray(inverse_square_radii, dtype=np.float64)
    A = X / y[:, None]
    per_direction = A.sum(1)  # the isotropic model: a_f = a_iso for every f
    a_iso = float(per_direction.sum() / (per_direction @ per_direction))
    rows, target = [A], [np.ones(len(y))]
    if shrinkage > 0:
        # ridge on a_f / a_iso: as if each group had also been measured isotropic once, so
        # that groups the pilot says little about (small or weakly-seen) stay near isotropic
        rows.append(math.sqrt(shrinkage) / a_iso * np.eye(X.shape[1]))
        target.append(np.full(X.shape[1], math.sqrt(shrinkage)))
    a, _ = nnls(np.vstack(rows), np.concatenate(target), maxiter=50 * X.shape[1])
    return a


def correction_log_scales(coefficients, partitions, floor) -> torch.Tensor:
    """log s of the correction fitted as group ``coefficients`` a: s_j ∝ c_j^{−1/2}, Σ log s = 0.

    c_j = Σ over partitions of a_{group(j)}, floored at ``floor`` × its mean (a group fitted
    to 0 is flat as far as the pilot saw: the floor keeps s finite).

    Examples
    --------
    >>> import torch
    >>> from volsk.preconditioners.boundary import correction_log_scales
    >>> ids = torch.tensor([0, 0, 1, 1])
    >>> [round(s, 6) for s in correction_log_scales([4.0, 1.0], [ids], floor=1e-3).exp().tolist()]
    [0.707107, 0.707107, 1.414214, 1.414214]
    """
    c = _per_coordinate(torch.as_tensor(coefficients, dtype=torch.float64), partitions)
    c = torch.clamp(c, min=floor * float(c.mean()))
    log_s = -0.5 * torch.log(c)
    return log_s - log_s.mean()


class BoundaryMap(BoundPreconditioner):
    """P = P_base · diag(exp(log_s)) with Σ log_s = 0: a fitted correction before a base map.

    Used as it is: it has no ``with_eps`` (eps was chosen for the base before the fit). It
    offers ``apply_block`` when the base does (the correction is diagonal), so the large-model
    evaluator streams it.

    Parameters
    ----------
    base : BoundPreconditioner
        The base map (det 1), acting on the same active coordinates.
    log_s : torch.Tensor
        (n,) log of the correction, summing to 0.
    coefficients : numpy.ndarray, optional
        The group coefficients ``log_s`` was made of (:meth:`BoundaryStart.corrected`): what
        binds the same map again elsewhere (a sharded fit's workers), far smaller than n.

    Examples
    --------
    >>> import torch
    >>> from volsk.preconditioners import BoundaryMap
    >>> from volsk.preconditioners.maps import IdentityMap
    >>> P = BoundaryMap(IdentityMap(2), torch.tensor([0.5, -0.5], dtype=torch.float64))
    >>> P.apply(torch.eye(2, dtype=torch.float64)).diagonal().exp().log().tolist()
    [1.6487212707001282, 0.6065306597126334]
    """

    def __init__(self, base, log_s, coefficients=None):
        self.base = base
        self.coefficients = coefficients
        self.log_s = torch.as_tensor(log_s, dtype=torch.float64).cpu()
        self.n = self.log_s.numel()
        if self.n != base.n:
            raise ValueError(f"log_s has {self.n} entries, the base map acts on {base.n}")
        log_det = float(self.log_s.sum())
        if not (torch.isfinite(self.log_s).all() and abs(log_det) <= 1e-9 * max(1.0, self.n)):
            raise ValueError(f"log_s must be finite and sum to 0 (det D = 1), got {log_det}")
        self.scale = self.log_s.exp()
        self._scale_on = {}
        if hasattr(base, "apply_block"):
            self.apply_block = self._apply_block

    def _scale(self, device):
        key = str(device)
        if key not in self._scale_on:
            self._scale_on = {key: self.scale.to(device)}
        return self._scale_on[key]

    def apply(self, G):
        s = self._scale(G.device)
        return self.base.apply(G * s.to(G.dtype))

    def _apply_block(self, G, start, stop):
        s = self._scale(G.device)[start:stop]
        return self.base.apply_block(G * s.to(G.dtype), start, stop)


class BoundaryStart(BoundPreconditioner):
    """What :class:`BoundaryFitted` binds to: its base map, not yet corrected, and how to fit.

    It acts as the base (``apply``, and ``with_eps``, ``with_exponent`` and ``apply_block``
    where the base has them), so that the eps pilot chooses eps for the base; the pipeline's
    boundary stage then replaces it by the fitted map (see :func:`fit_boundary`).
    """

    def __init__(self, base, partitions, strategy):
        self.base = base
        self.partitions = partitions
        self.strategy = strategy
        self.n = base.n
        self.is_identity = bool(getattr(base, "is_identity", False))
        if hasattr(base, "apply_block"):
            self.apply_block = base.apply_block
        if hasattr(base, "with_eps"):
            self.with_eps = self._with_eps
        if hasattr(base, "with_exponent"):
            self.with_exponent = self._with_exponent

    def _with_eps(self, eps):
        return BoundaryStart(self.base.with_eps(eps), self.partitions, self.strategy)

    def _with_exponent(self, exponent):
        return BoundaryStart(self.base.with_exponent(exponent), self.partitions, self.strategy)

    def corrected(self, coefficients):
        """The map with the correction fitted as group ``coefficients`` (None: the base).

        A pure function of the coefficients and this start, so that another process that
        bound the same start makes the same map from a fit's few coefficients.
        """
        if coefficients is None:
            return self.base
        log_s = correction_log_scales(coefficients, self.partitions, self.strategy.floor)
        return BoundaryMap(self.base, log_s, coefficients=coefficients)

    def apply(self, G):
        return self.base.apply(G)


def _pilot_measurements(base, log_s, partitions, seed, radii, n, generator="host",
                        device="cpu"):
    """Features (m, F) and 1/ρ² (m,) of pilot directions 0 … m−1 drawn from ``seed``.

    Each direction is redrawn as the sampler draws it (g unit normal from ``generator`` on the
    fit's ``device``, y = D g, v = P_base y, u = v/|v|); its radius r along u is the radius
    ρ = r·|y|/|v| along w = y/|y| in the base's coordinates z.
    """
    s = log_s.exp()
    feats, inv = [], []
    step = max(1, min(_DRAW_ROWS, _DRAW_BYTES // (8 * n)))  # a language model: one at a time
    for first in range(0, len(radii), step):
        home = device if generator == "device" else "cpu"  # where the sampler made them
        G = torch.empty((min(step, len(radii) - first), n), dtype=torch.float64, device=home)
        for j, row in enumerate(G):
            NormalStream(seed, first + j, n, generator).next(n, home, out=row)
        G = G.cpu()
        G /= torch.linalg.vector_norm(G, dim=1, keepdim=True)
        Y = G * s
        V = Y if getattr(base, "is_identity", False) else base.apply(Y)
        y_norm = torch.linalg.vector_norm(Y, dim=1)
        ratio = (y_norm / torch.linalg.vector_norm(V.to(torch.float64), dim=1)).numpy()
        rho = radii[first : first + len(G)] * ratio
        feats.append(_features(Y / y_norm[:, None], partitions).numpy())
        with np.errstate(divide="ignore"):
            inv.append(1.0 / rho**2)
    return np.concatenate(feats), np.concatenate(inv)


def fit_boundary(start: BoundaryStart, run_pilot, seeds, *, tie=EPS_TIE_NATS,
                 generator="host", device="cpu"):
    """Fit the correction round by round; the map to use and the rounds table.

    Parameters
    ----------
    start : BoundaryStart
    run_pilot : callable
        ``run_pilot(bound_map, seed) -> DirectionRecords`` of the pilot directions
        0 … m−1 drawn from ``seed`` with that map (radii, log-volumes, evaluations).
    seeds : sequence of int
        One pilot seed per round: round 0 measures the base, round r ≥ 1 the map fitted to
        all the pilots before it.
    tie : float
        A round is kept when its pilot estimate is within ``tie`` nats of the best kept.
    generator : {"host", "device"}, default="host"
        The direction generator ``run_pilot`` draws with, and ``device`` the fit's device:
        the pilot directions are redrawn with them (see ``volsk._sampling.NormalStream``).
    device : str or torch.device, default="cpu"

    Returns
    -------
    bound : BoundPreconditioner
        The last kept map: the base when no fitted round was kept, else a
        :class:`BoundaryMap` whose ``coefficients`` are the fitted ones
        (``start.corrected(bound.coefficients)`` makes it again).
    table : pandas.DataFrame
        One row per round (:data:`ROUND_COLUMNS`).
    evaluations : int
        Cost evaluations the pilots spent.
    """
    # import time: pandas is needed only for tables
    import pandas as pd

    base, partitions = start.base, start.partitions
    n_groups = _n_groups(partitions)
    a = None  # the group coefficients of the next round's map (None: the base)
    chosen, chosen_round, best = base, 0, -math.inf
    X_all, y_all, rows, evaluations = [], [], [], 0
    for r, seed in enumerate(seeds):
        candidate = start.corrected(a)
        log_s = candidate.log_s if a is not None else torch.zeros(base.n, dtype=torch.float64)
        rec = run_pilot(candidate, int(seed))
        evaluations += int(np.sum(rec.evaluations))
        summary = summarise_samples(rec.log_volume, rec.evaluations)
        accepted = r == 0 or summary["log_volume"] >= best - tie
        if accepted:
            chosen, chosen_round = candidate, r
            best = max(best, summary["log_volume"])
        rows.append({"round": r, "groups": 0 if r == 0 else n_groups,
                     "directions": len(rec), "log_volume": summary["log_volume"],
                     "max_sample": summary["max_sample"], "ess": summary["ess"],
                     "evaluations_per_direction": summary["evaluations_per_direction"],
                     "accepted": accepted})
        if r == len(seeds) - 1:
            break
        radii = np.where(rec.status == 0, rec.radius, np.nan)
        X, y = _pilot_measurements(base, log_s, partitions, seed, radii, base.n, generator,
                                   device)
        X_all.append(X)
        y_all.append(y)
        X, y = np.concatenate(X_all), np.concatenate(y_all)
        ok = np.isfinite(y) & (y > 0)
        if ok.sum() < 2:
            break  # nothing crossed: no shape to fit
        a = fit_group_curvature(X[ok], y[ok], shrinkage=start.strategy.shrinkage)
    table = pd.DataFrame(rows, columns=list(ROUND_COLUMNS[:-1]))
    table["selected"] = table["round"] == chosen_round
    return chosen, table[list(ROUND_COLUMNS)], evaluations


class BoundaryFitted:
    """A base preconditioner corrected by a diagonal fitted to a pilot's boundary radii.

    In the base map's coordinates, 1/ρ² along a pilot direction w is fitted as
    Σ_t a_t |w_t|² over groups t of coordinates (non-negative least squares); the correction
    D = diag(a^{−1/2}), normalised to det D = 1, is applied before the base map
    (P = P_base · D). It is refitted for ``rounds`` rounds, each measured by a fresh pilot of
    ``pilot_directions`` directions from a seed stream of its own; a round whose pilot
    estimate falls more than the eps rule's tie threshold below the best kept is rejected.
    The map of the estimate is fixed before its directions are drawn, so the estimate stays
    unbiased. With ``preconditioner_eps="auto"`` eps is chosen for the base first. The
    pilots' cost is counted in ``n_pilot_evaluations_`` and the rounds are tabled in the
    estimator's ``boundary_pilot_``.

    Parameters
    ----------
    base : str or preconditioner object, default="kfac"
        The base map (any name the estimator accepts, or an object; not another
        ``BoundaryFitted``).
    groups : {"tensor", "row", "column", "row+column"}, default="tensor"
        Coordinates the correction is constant on: parameter tensors, output rows of weight
        matrices (vectors such as biases: one group each), input columns, or a row plus a
        column term per weight.
    rounds : int, default=4
        Fitted rounds (0: the base as it is, after one measuring pilot).
    pilot_directions : int or None, default=None
        Directions of each round's pilot; None: max(128, 4 × the number of groups).
    shrinkage : float, default=0.0
        Pull of every group's coefficient towards the isotropic fit (see
        :func:`fit_group_curvature`).
    floor : float, default=1e-3
        Least fitted curvature of a coordinate, as a fraction of the mean: a group the fit
        sets to 0 (flat as far as the pilot saw, or noise) is stretched at most about
        ``floor^(−1/2)`` times the typical scale.

    Examples
    --------
    >>> import torch
    >>> from volsk import LocalVolumeEstimator
    >>> from volsk.preconditioners import BoundaryFitted
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> est = LocalVolumeEstimator(sigma=1.0, n_samples=4, random_state=0,
    ...                            preconditioner=BoundaryFitted(rounds=2, pilot_directions=16))
    >>> est = est.fit(net, torch.randn(16, 3))
    >>> est.boundary_pilot_["round"].tolist()
    [0, 1, 2]
    """

    name = "boundary"

    def __init__(self, base="kfac", groups="tensor", rounds=4, pilot_directions=None,
                 shrinkage=0.0, floor=1e-3):
        self.base = base
        self.groups = groups
        self.rounds = rounds
        self.pilot_directions = pilot_directions
        self.shrinkage = shrinkage
        self.floor = floor

    def __repr__(self):
        return _repr(self)

    def _check(self):
        if isinstance(self.base, BoundaryFitted):
            raise ValueError("BoundaryFitted base must be another preconditioner, not a "
                             "BoundaryFitted")
        if self.groups not in GROUPS:
            raise ValueError(f"BoundaryFitted groups must be one of {GROUPS}, got "
                             f"{self.groups!r}")
        if not (isinstance(self.rounds, int) and not isinstance(self.rounds, bool)
                and self.rounds >= 0):
            raise ValueError(f"BoundaryFitted rounds must be an integer >= 0, got "
                             f"{self.rounds!r}")
        m = self.pilot_directions
        if m is not None and not (isinstance(m, int) and not isinstance(m, bool) and m >= 2):
            raise ValueError("BoundaryFitted pilot_directions must be None or an integer >= 2, "
                             f"got {m!r}")
        for name in ("shrinkage", "floor"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"BoundaryFitted {name} must be a finite number >= 0, got "
                                 f"{value!r}")

    def resolved(self, resolve) -> BoundaryFitted:
        """A copy whose base is a preconditioner object: ``resolve`` (the name resolver,
        :func:`volsk.preconditioners.resolve_preconditioner`) turns a name into one. The
        resolver is handed in, so this module does not import the one that names it."""
        out = copy.copy(self)
        out.base = resolve(self.base)
        return out

    def directions(self, partitions) -> int:
        """Pilot directions per round for these partitions."""
        if self.pilot_directions is not None:
            return int(self.pilot_directions)
        return max(128, 4 * _n_groups(partitions))

    def bind(self, ctx: PreconditionerContext) -> BoundaryStart:
        self._check()
        if not hasattr(self.base, "bind"):
            raise ValueError(
                f"BoundaryFitted's base {self.base!r} is not resolved to a preconditioner "
                "object: bind the result of volsk.preconditioners.resolve_preconditioner("
                "BoundaryFitted(...)), as the estimator does"
            )
        base = self.base.bind(ctx)
        partitions = group_partitions(ctx.evaluator.space, ctx.mask, self.groups)
        return BoundaryStart(base, partitions, self)
