"""K-FAC: a preconditioner from the Kronecker-factored Gauss–Newton matrix, layer by layer.

Each supported layer's block of the GGN is approximated by G ⊗ A (see
:mod:`volsk.preconditioners.curvature.kronecker`); with A = U_A diag(α) U_Aᵀ and
G = U_G diag(γ) U_Gᵀ its eigenvectors are U_G ⊗ U_A and its eigenvalues λ = γ ⊗ α (or, with
eigenvalue correction, the GGN's own second moments in that basis). The map is

    P ∝ (U_G ⊗ U_A) diag(1/(|λ|^exponent + eps)) (U_G ⊗ U_A)ᵀ

on each block, applied to a (d_out, d_in) slice M of a direction as U_G (D ⊙ (U_Gᵀ M U_A))
U_Aᵀ — two small matrix products on each side — and P ∝ 1/(|h|^exponent + eps) on every other
coordinate, h its GGN diagonal. det P = 1 holds exactly: the log-scales of all blocks and
the diagonal are normalised together, over all active coordinates.
"""

from __future__ import annotations

import inspect

import torch

from .._checks import is_integer
from .context import PreconditionerContext
from .curvature.ggn import ggn_diagonal, sampled_ggn_diagonal
from .curvature.kronecker import (
    corrected_eigenvalues,
    exact_outputs,
    kronecker_factors,
    kronecker_layers,
)
from .curvature.target import CurvatureTarget, curvature_target
from .maps import BoundPreconditioner, _check_log_det, diagonal_scales

__all__ = ["KFAC", "KroneckerMap", "KroneckerBlock"]


class KroneckerBlock:
    """One layer's block of a :class:`KroneckerMap`: coordinates, eigenbases, eigenvalues.

    Attributes
    ----------
    name : str
        The layer's path in the model.
    index : torch.Tensor
        (d_g, d_a) int64 positions among the active coordinates (rows: output units).
    U_G, U_A : torch.Tensor or None
        Orthonormal eigenbases of G (d_g, d_g) and A (d_a, d_a); None for the identity (a
        factor kept diagonal).
    eigenvalues : torch.Tensor
        (d_g, d_a) float64 curvature in the basis U_G ⊗ U_A.
    """

    def __init__(self, name, index, U_G, U_A, eigenvalues):
        self.name = name
        self.index = index
        self.U_G = U_G
        self.U_A = U_A
        self.eigenvalues = eigenvalues

    def __repr__(self):
        d_g, d_a = self.index.shape
        return f"KroneckerBlock({self.name!r}, {d_g} × {d_a})"


class KroneckerMap(BoundPreconditioner):
    """P block-diagonal: Kronecker-factored blocks plus a diagonal on the other coordinates.

    Parameters
    ----------
    blocks : list of KroneckerBlock
    diagonal_index : torch.Tensor
        (m,) int64 positions among the active coordinates outside every block.
    diagonal_curvature : torch.Tensor
        (m,) their curvature h.
    n : int
        The number of active coordinates (the blocks and the diagonal cover each once).
    eps, exponent : float

    Examples
    --------
    >>> import torch
    >>> from volsk.preconditioners import KroneckerMap
    >>> from volsk.preconditioners.kfac import KroneckerBlock
    >>> block = KroneckerBlock("layer", torch.arange(4).reshape(2, 2), None, None,
    ...                        torch.tensor([[1.0, 4.0], [16.0, 1.0]], dtype=torch.float64))
    >>> P = KroneckerMap([block], torch.tensor([4]), torch.tensor([4.0]), 5, eps=0.0,
    ...                  exponent=0.5)
    >>> dense = P.apply(torch.eye(5, dtype=torch.float64))
    >>> abs(float(torch.linalg.slogdet(dense).logabsdet)) < 1e-12  # det P = 1
    True
    """

    def __init__(self, blocks, diagonal_index, diagonal_curvature, n, eps, exponent):
        self.blocks = list(blocks)
        self.diagonal_index = torch.as_tensor(diagonal_index, dtype=torch.int64).cpu()
        self.diagonal_curvature = torch.as_tensor(diagonal_curvature, dtype=torch.float64).cpu()
        self.n = int(n)
        self.eps, self.exponent = float(eps), float(exponent)
        covered = torch.zeros(self.n, dtype=torch.int64)
        for block in self.blocks:
            covered.index_add_(0, block.index.reshape(-1).cpu(),
                               torch.ones(block.index.numel(), dtype=torch.int64))
        covered.index_add_(0, self.diagonal_index, torch.ones_like(self.diagonal_index))
        if not bool((covered == 1).all()):
            raise ValueError("the Kronecker blocks and the diagonal must cover every active "
                             "coordinate exactly once")
        curvature = torch.cat([b.eigenvalues.reshape(-1).cpu() for b in self.blocks]
                              + [self.diagonal_curvature])
        log_p = diagonal_scales(curvature, eps, exponent)  # det P = 1 over all coordinates
        _check_log_det(log_p)
        sizes = [b.index.numel() for b in self.blocks] + [self.diagonal_index.numel()]
        pieces = torch.split(log_p, sizes)
        self.block_scales = [p.reshape(b.index.shape).exp() for p, b in zip(pieces, self.blocks)]
        self.diagonal_scale = pieces[-1].exp()
        self._cache = {}

    def with_eps(self, eps) -> KroneckerMap:
        return KroneckerMap(self.blocks, self.diagonal_index, self.diagonal_curvature, self.n,
                            eps, self.exponent)

    def with_exponent(self, exponent) -> KroneckerMap:
        return KroneckerMap(self.blocks, self.diagonal_index, self.diagonal_curvature, self.n,
                            self.eps, exponent)

    def _on(self, dtype, device):
        key = (dtype, str(device))
        if key not in self._cache:
            def cast(t):
                return None if t is None else t.to(device=device, dtype=dtype)

            blocks = [(b.index.to(device), cast(b.U_G), cast(b.U_A), cast(d))
                      for b, d in zip(self.blocks, self.block_scales)]
            self._cache = {key: (blocks, self.diagonal_index.to(device),
                                 cast(self.diagonal_scale))}
        return self._cache[key]

    def apply(self, G):
        blocks, diagonal_index, diagonal_scale = self._on(G.dtype, G.device)
        out = torch.empty_like(G)
        for index, U_G, U_A, scale in blocks:
            M = G[:, index]  # (B, d_g, d_a)
            if U_G is not None:
                M = U_G.T @ M
            if U_A is not None:
                M = M @ U_A
            M = M * scale
            if U_G is not None:
                M = U_G @ M
            if U_A is not None:
                M = M @ U_A.T
            out[:, index] = M
        if diagonal_index.numel():
            out[:, diagonal_index] = G[:, diagonal_index] * diagonal_scale
        return out


def _eigen(factor):
    """(eigenvalues, eigenvectors or None) of a factor kept dense (matrix) or diagonal."""
    if factor.ndim == 1:
        return factor, None
    values, vectors = torch.linalg.eigh(0.5 * (factor + factor.T))
    return values, vectors


def _repr(obj):
    """``Name(arg=value, ...)`` with the arguments that differ from their defaults."""
    defaults = inspect.signature(type(obj).__init__).parameters
    args = [f"{k}={getattr(obj, k)!r}" for k, p in defaults.items()
            if k != "self" and getattr(obj, k) != p.default]
    return f"{type(obj).__name__}({', '.join(args)})"


def _cpu(t):
    return None if t is None else t.cpu()


def _gauss_newton_diagonal(target, positions, *, max_exact_outputs=256, probes=64, seed=0):
    """The GGN diagonal on some of the active coordinates: exact (per-example Jacobians)
    when every example has at most ``max_exact_outputs`` outputs, otherwise the Monte-Carlo
    estimate over output-space Rademacher vectors with ``probes`` backward passes per data
    batch (``sampled_ggn_diagonal``: relative variance per sample at most 2, where
    parameter-space Hutchinson's grows with the GGN's off-diagonal mass — orders of magnitude
    more on a small GPT-NeoX)."""
    if positions.numel() == 0:
        return torch.zeros(0, dtype=torch.float64)
    sub = CurvatureTarget(target.evaluator, target.parts,
                          target.cols[positions.to(target.cols.device)], target.random_state)
    if exact_outputs(target, max_exact_outputs):
        return ggn_diagonal(sub).cpu()
    return sampled_ggn_diagonal(sub, probes, seed=seed).cpu()


class KFAC:
    """Kronecker-factored Gauss–Newton/Fisher curvature (K-FAC), layer by layer.

    For each ``nn.Linear`` (also those inside Hugging Face blocks, e.g. GPT-NeoX's
    ``query_key_value``, ``dense``, ``dense_h_to_4h``, ``dense_4h_to_h`` and the unembedding),
    ``nn.Conv1d``/``nn.Conv2d`` (``groups=1``, by unfolding into patches) and transformers'
    ``Conv1D``, the GGN block of its weight and bias is approximated by G ⊗ A: A the
    cost-weighted mean of its inputs' outer products (bias as an appended 1; token masks
    respected), G the sum of the output-side gradients' outer products for the cost's
    output-space factor — the model's own predictive Fisher for "kl"/"cross_entropy", the
    exact output Hessian for "mse". Exact (one backward pass per output) when an example has
    at most ``max_exact_outputs`` outputs, Monte-Carlo (``samples`` Rademacher-signed
    backward passes, seeded by ``random_state``) otherwise. P ∝ (G ⊗ A)^(−exponent)
    regularised by eps in the Kronecker eigenbasis (see :class:`KroneckerMap`); det P = 1.

    Every other active coordinate (embeddings, normalisation layers, biases of unsupported
    layers, a layer with a single coordinate integrated out, shared weights) gets its exact
    GGN diagonal (a Monte-Carlo estimate beyond ``max_exact_outputs`` outputs per example).
    A layer whose integrated-out coordinates are whole inputs or output units (pixels that are
    zero on every example) keeps its block, restricted to the rest — which is still a
    Kronecker product. A factor wider than ``max_factor_size`` (a large vocabulary's
    unembedding G: 50 304² for Pythia) is kept as its diagonal: the block is diag(G) ⊗ A.
    Memory: the factors, d_in² + d_out² per layer; never n².

    Exact on a single bias-free linear layer under "mse" (and on every layer of a deep linear
    network under "mse", per block): there G is constant over examples.

    Parameters
    ----------
    eigenvalue_correction : bool, default=False
        Replace γ ⊗ α by the GGN's own second moments in the Kronecker eigenbasis (EKFAC,
        George et al. 2018): a second round of backward passes.
    samples : int, default=16
        Backward passes of the Monte-Carlo factors.
    max_exact_outputs : int, default=256
    max_factor_size : int, default=4096
    probes : int, default=64
        Backward passes per data batch of the diagonal part's Monte-Carlo estimate when it
        cannot be exact (output-space Rademacher vectors, see
        :func:`~volsk.preconditioners.curvature.ggn.sampled_ggn_diagonal`).
    dtype : torch.dtype or None, default=torch.float64
        Precision of the curvature computation (None: the model's dtype).

    Examples
    --------
    >>> import torch
    >>> from volsk import LocalVolumeEstimator
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> est = LocalVolumeEstimator(sigma=1.0, n_samples=4, preconditioner="kfac",
    ...                            random_state=0).fit(net, torch.randn(16, 3))
    >>> bool(est.log_volume_ < 0)
    True
    """

    name = "kfac"

    def __init__(self, eigenvalue_correction=False, samples=16, max_exact_outputs=256,
                 max_factor_size=4096, probes=64, dtype=torch.float64):
        self.eigenvalue_correction = eigenvalue_correction
        self.samples = samples
        self.max_exact_outputs = max_exact_outputs
        self.max_factor_size = max_factor_size
        self.probes = probes
        self.dtype = dtype

    def __repr__(self):
        return _repr(self)

    def _check(self):
        for name in ("samples", "max_exact_outputs", "max_factor_size", "probes"):
            value = getattr(self, name)
            if not is_integer(value, 1):
                raise ValueError(f"KFAC {name} must be a positive integer, got {value!r}")

    def blocks(self, ctx: PreconditionerContext):
        """The Kronecker blocks and the diagonal part's (positions, curvature) for ``ctx``."""
        self._check()
        target = curvature_target(ctx, self.dtype)
        options = {"max_exact_outputs": self.max_exact_outputs, "samples": self.samples,
                   "seed": target.random_state}
        layers, rest = kronecker_layers(target)
        factors = kronecker_factors(target, layers, max_factor_size=self.max_factor_size,
                                    **options)
        eigen = [(_eigen(A), _eigen(G)) for A, G in factors]
        if self.eigenvalue_correction:
            bases = [(U_A, U_G) for (_a, U_A), (_g, U_G) in eigen]
            values = corrected_eigenvalues(target, layers, bases, **options)
        else:
            values = [torch.outer(gamma, alpha) for (alpha, _), (gamma, _) in eigen]
        blocks = [
            KroneckerBlock(layer.name, layer.index, _cpu(U_G), _cpu(U_A), lam.cpu())
            for layer, ((_a, U_A), (_g, U_G)), lam in zip(layers, eigen, values, strict=True)
        ]
        h = _gauss_newton_diagonal(target, rest, max_exact_outputs=self.max_exact_outputs,
                                  probes=self.probes, seed=target.random_state)
        return blocks, rest, h

    def bind(self, ctx: PreconditionerContext) -> BoundPreconditioner:
        blocks, rest, h = self.blocks(ctx)
        values = [b.eigenvalues for b in blocks] + [h]
        if not all(torch.isfinite(v).all() for v in values):
            raise ValueError(f"{self!r} produced a curvature with NaN or infinite entries")
        return KroneckerMap(blocks, rest, h, ctx.n, ctx.eps, ctx.exponent)
