"""Seeded, preconditioned directions and their importance log-weights.

Direction i is a pure function of (random_state, i): a standard normal vector drawn from
``numpy.random.default_rng([random_state, i])`` (PCG64 seeded by
``SeedSequence([random_state, i])``), normalised to the unit sphere, mapped by P and normalised
again. Results therefore do not depend on how directions are batched or which
worker draws them, and a run can be extended (``partial_fit``) or sharded without storing a
k × n matrix.
"""

from __future__ import annotations

import numpy as np
import torch

from ._layout import BLOCK
from ._seeding import direction_generator

__all__ = ["draw_directions", "DirectionBlock", "draw_block", "stream_direction"]

SETUP_ROWS = 64  # directions drawn and reduced together on the CPU (their rows stay in cache)


def draw_directions(n, indices, random_state, preconditioner, device="cpu"):
    """Draw preconditioned unit directions.

    Parameters
    ----------
    n : int
        Dimension (number of active coordinates).
    indices : sequence of int
        Global direction indices.
    random_state : int
        Base seed.
    preconditioner : BoundPreconditioner
        P with det P = 1.
    device : torch.device

    Returns
    -------
    directions : torch.Tensor (B, n) float64
        Unit vectors u = P g / |P g|.
    log_weights : numpy.ndarray (B,)
        −n·log|P g| with g uniform on the unit sphere: the inverse density of u relative to the
        uniform distribution on the sphere.

    Examples
    --------
    >>> from volsk._sampling import draw_directions
    >>> from volsk.preconditioners import Identity, PreconditionerContext
    >>> import torch
    >>> P = Identity().bind(PreconditionerContext(None, None, torch.ones(3, dtype=bool)))
    >>> U, logw = draw_directions(3, [0, 1], 0, P)
    >>> U.shape, logw.tolist()
    (torch.Size([2, 3]), [0.0, 0.0])
    """
    # numpy's ziggurat normals from a PCG64 seeded by SeedSequence([random_state, i]): about
    # twice as fast as a fresh torch.Generator per direction on the CPU
    indices = list(indices)
    rows = np.empty((len(indices), n))
    for row, i in zip(rows, indices):
        direction_generator(random_state, i).standard_normal(out=row)
    G = torch.from_numpy(rows).to(device)  # (B, n) float64
    G /= torch.linalg.vector_norm(G, dim=1, keepdim=True)
    if getattr(preconditioner, "is_identity", False):
        return G, np.zeros(len(indices))
    V = preconditioner.apply(G)
    norms = torch.linalg.vector_norm(V, dim=1)  # (B,)
    log_weights = (-n * torch.log(norms)).cpu().numpy()
    return V / norms[:, None], log_weights


class DirectionBlock:
    """A block of directions ready for the radius search.

    Attributes
    ----------
    U : torch.Tensor
        (B, n) unit directions in all n coordinates (zero on flat ones), in the dtype
        θ + r·u is formed in.
    coefficients : dict of numpy arrays
        The measure's per-direction ray coefficients (float64, (B,) each).
    log_weights : numpy.ndarray
        (B,) importance log-weights.
    """

    def __init__(self, U, coefficients, log_weights):
        self.U = U
        self.coefficients = coefficients
        self.log_weights = log_weights


def draw_block(indices, seed, *, mask, preconditioner, measure, dtype, device) -> DirectionBlock:
    """Draw directions ``indices`` (ints), precondition them and reduce them to the measure's
    per-direction coefficients.

    On the CPU this runs ``SETUP_ROWS`` directions at a time, so that their float64 rows are
    still in cache for each pass over them; on a GPU all at once (each part ends in a copy of
    its coefficients to the host).
    """
    indices = np.asarray(indices, dtype=np.int64)
    device = torch.device(device)
    cols = torch.nonzero(mask).flatten()
    n_total, n_active = mask.numel(), cols.numel()
    full = n_active == n_total
    U = (torch.empty if full else torch.zeros)(indices.size, n_total, dtype=dtype, device=device)
    step = SETUP_ROWS if device.type == "cpu" else max(1, indices.size)
    coefs, log_ws = [], []
    for first in range(0, indices.size, step):
        part = indices[first : first + step]
        U_act, log_w = draw_directions(n_active, part, seed, preconditioner, device)
        coefs.append(measure.ray_coefficients(U_act))
        log_ws.append(log_w)
        if full:
            U[first : first + part.size].copy_(U_act)
        else:
            U[first : first + part.size].index_copy_(1, cols, U_act.to(dtype))
    coef = {key: np.concatenate([c[key] for c in coefs]) for key in coefs[0]}
    return DirectionBlock(U, coef, np.concatenate(log_ws))


# ------------------------------------------------------ implicit directions (large-model mode)


def _write(out, sel, values):
    if isinstance(sel, slice):
        out[sel].copy_(values)
    else:
        out.index_copy_(0, sel, values.to(out.dtype))


def stream_direction(index, seed, out, *, layout, preconditioner, measure, block=BLOCK):
    """Write direction ``index`` into ``out`` (n,) a block of coordinates at a time.

    The direction of :func:`draw_directions`, to rounding, never held as a float64 row: its
    normals are drawn from the same generator in blocks of ``block`` active coordinates
    (consecutive draws continue one stream, so the blocks are the numbers of one draw), each
    block is mapped by P (``preconditioner.apply_block``) and written into ``out`` (in its
    dtype, at the full coordinates ``layout`` gives), and |g|², |P g|² and the measure's
    coefficient sums are accumulated in float64; ``out`` is then scaled to unit length. A map
    without ``apply_block`` (a dense eigenbasis) takes :func:`draw_directions`' path: one
    float64 row of n active coordinates. ``out`` must be zero on the flat coordinates.

    Returns
    -------
    coefficients : dict of numpy arrays
        The measure's ray coefficients, shape (1,) each.
    log_weight : float
        −n·log|P g| for g = normals/|normals| (0 for the identity).

    Examples
    --------
    >>> import torch
    >>> from volsk._layout import ActiveLayout
    >>> from volsk._sampling import draw_directions, stream_direction
    >>> from volsk.measures import Lebesgue, MeasureContext
    >>> from volsk.preconditioners import Identity, PreconditionerContext
    >>> mask = torch.ones(5, dtype=torch.bool)
    >>> P = Identity().bind(PreconditionerContext(None, None, mask))
    >>> measure = Lebesgue().bind(MeasureContext(torch.zeros(5), mask))
    >>> u = torch.zeros(5)
    >>> _ = stream_direction(3, 0, u, layout=ActiveLayout(5), preconditioner=P,
    ...                      measure=measure, block=2)
    >>> U, _ = draw_directions(5, [3], 0, P)
    >>> bool(torch.allclose(u, U[0].float()))
    True
    """
    reducer = measure.coefficient_reducer()
    identity = getattr(preconditioner, "is_identity", False)
    apply_block = getattr(preconditioner, "apply_block", None)
    device = out.device
    if not identity and apply_block is None:
        U, log_w = draw_directions(layout.n_active, [index], seed, preconditioner, device)
        for start, stop, sel in layout.blocks(block, device):
            _write(out, sel, U[0, start:stop])
        return measure.ray_coefficients(U), float(log_w[0])
    generator = direction_generator(seed, index)
    host = np.empty(min(block, layout.n_active))
    g2 = torch.zeros((), dtype=torch.float64, device=device)
    v2 = torch.zeros((), dtype=torch.float64, device=device)
    for start, stop, sel in layout.blocks(block, device):
        normals = host[: stop - start]
        generator.standard_normal(out=normals)
        G = torch.from_numpy(normals).to(device)  # (m,) float64
        V = G if identity else apply_block(G, start, stop)
        g2 += torch.dot(G, G)
        if not identity:
            v2 += torch.dot(V, V)
        reducer.add(V[None], sel)
        _write(out, sel, V)
    norm = (g2 if identity else v2).sqrt()
    out.mul_(float(1.0 / norm))
    log_weight = 0.0 if identity else float(-layout.n_active * torch.log(norm / g2.sqrt()))
    return reducer.finish(norm), log_weight
