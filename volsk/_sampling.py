"""Seeded, preconditioned directions and their importance log-weights.

Direction i is a pure function of (random_state, i): a standard normal vector g, normalised to
the unit sphere, mapped by P and normalised again. Its normals come from one of two generators
(the estimator's ``generator``), read in order by :class:`NormalStream`:

- ``"host"``: ``numpy.random.default_rng([random_state, i]).standard_normal`` (PCG64 seeded by
  ``SeedSequence([random_state, i])``), drawn on the host and copied to the fit's device.
  Direction i is the same float64 vector on every machine and every device.
- ``"device"``: the normals are cut into chunks of :data:`DEVICE_CHUNK` = 2**15 coordinates;
  chunk c is ``torch.randn(DEVICE_CHUNK, generator=g, dtype=torch.float64, device=device)``
  with ``g`` a ``torch.Generator`` on the fit's device re-seeded (``g.manual_seed``) with word
  c of ``SeedSequence([random_state, i, DEVICE_STREAM]).generate_state(n_chunks, uint64)``
  (:func:`volsk._seeding.device_chunk_seeds`), the last chunk truncated to n. On CUDA that is
  torch's Philox generator (the 64-bit word is its seed); on the CPU torch's MT19937, which
  takes the word's low 32 bits. No host round trip: the normals are made where they are used.
  Direction i is the same on one device type — on CUDA, one GPU model and torch version;
  torch's CUDA kernel sizes its grid from the GPU's multiprocessor count, capped by
  ceil(numel / 256) blocks, so chunks of 128 blocks are expected (not verified) to give the
  same numbers on any GPU with at least 22 multiprocessors — but it is another vector on the
  CPU than on CUDA (another generator): estimates from the two agree statistically, not bit
  for bit. The chunk size is a constant, never a batch or block size.
- ``"auto"`` (:func:`resolve_generator`): "device" when the fit's device is CUDA, else "host".

What is bit for bit: for either generator, the normals of direction i do not depend on how many
a consumer reads at a time (whole rows in :func:`draw_directions`, blocks in
:func:`stream_direction`, the boundary fit's pilot rows), so directions — and the records
computed from them — do not depend on ``batch_size``, ``data_batch_size``, ``n_jobs``, the
joblib backend, the number of workers or GPUs, shard splits, or ``partial_fit``. The
per-direction scalars (|g|, |P g|, the importance log-weight, the measure's coefficients) are
reduced in float64: over whole rows in the vmapped mode, block by block in the large-model mode
(``evaluation="large"``), so the two modes agree to rounding (their partitions of the sums
differ) and each is bit for bit with itself.
"""

from __future__ import annotations

import numpy as np
import torch

from ._layout import BLOCK
from ._seeding import device_chunk_seeds, direction_generator

__all__ = ["GENERATORS", "DEVICE_CHUNK", "resolve_generator", "NormalStream",
           "draw_directions", "DirectionBlock", "draw_block", "stream_direction"]

#: The estimator's ``generator`` values.
GENERATORS = ("auto", "host", "device")
#: Normals per seeded chunk of the "device" generator (independent of every batch/block size).
DEVICE_CHUNK = 1 << 15
SETUP_ROWS = 64  # directions drawn and reduced together on the CPU (their rows stay in cache)


def resolve_generator(generator, device) -> str:
    """The direction generator a fit on ``device`` uses: "host" or "device".

    "auto" is "device" on CUDA and "host" elsewhere; "host" and "device" are kept.

    Examples
    --------
    >>> from volsk._sampling import resolve_generator
    >>> resolve_generator("auto", "cpu"), resolve_generator("device", "cpu")
    ('host', 'device')
    """
    if not isinstance(generator, str) or generator not in GENERATORS:
        raise ValueError(
            f"generator must be one of {', '.join(map(repr, GENERATORS))}; got {generator!r}"
        )
    if generator == "auto":
        return "device" if torch.device(device).type == "cuda" else "host"
    return generator


def _check_resolved(generator) -> str:
    if generator not in ("host", "device"):
        raise ValueError(f'generator must be "host" or "device" here (resolve "auto" with '
                         f"resolve_generator first); got {generator!r}")
    return generator


def _home(device) -> torch.device:
    """``device`` with its index (a generator lives on one GPU)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class NormalStream:
    """The n standard normals of direction ``index`` of ``seed``, read in order.

    ``next(m, device)`` returns the next m normals as an (m,) float64 tensor on ``device``;
    consecutive calls continue one sequence, so the normals do not depend on how many are read
    at a time. "host": PCG64 (:func:`volsk._seeding.direction_generator`) into a reused host
    buffer, then copied to ``device`` (on the CPU the tensor is that buffer: valid until the
    next call). "device": seeded chunks of :data:`DEVICE_CHUNK` normals made on the device of
    the first call (see the module docstring); later calls must ask for the same device.

    Parameters
    ----------
    seed : int
        The stream's base seed (the fit's, or a pilot stream's).
    index : int
        The direction.
    n : int
        Normals in the direction (its active coordinates); reading past them raises.
    generator : {"host", "device"}, default="host"

    Examples
    --------
    >>> import torch
    >>> from volsk._sampling import NormalStream
    >>> stream = NormalStream(0, 5, 10, "device")
    >>> parts = torch.cat([stream.next(3, "cpu"), stream.next(7, "cpu")])
    >>> torch.equal(parts, NormalStream(0, 5, 10, "device").next(10, "cpu"))
    True
    """

    def __init__(self, seed, index, n, generator="host"):
        self.n = int(n)
        self.generator = _check_resolved(generator)
        self.drawn = 0
        if self.generator == "host":
            self._rng = direction_generator(seed, index)
            self._buffer = None
        else:
            self._seeds = device_chunk_seeds(seed, index, -(-self.n // DEVICE_CHUNK))
            self._torch_generator = None  # made on the device of the first call
            self._chunk, self._chunk_index = None, -1

    def next(self, m, device="cpu", out=None) -> torch.Tensor:
        """The next ``m`` normals: an (m,) float64 tensor on ``device`` (written into ``out``,
        an (m,) float64 tensor, when given)."""
        m = int(m)
        if m < 0 or self.drawn + m > self.n:
            raise ValueError(f"asked for {m} normals after {self.drawn} of a direction of "
                             f"{self.n}")
        if out is not None and (tuple(out.shape) != (m,) or out.dtype != torch.float64):
            raise ValueError(f"out must be an ({m},) float64 tensor, got {tuple(out.shape)} "
                             f"{out.dtype}")
        if self.generator == "host":
            return self._next_host(m, device, out)
        return self._next_device(m, device, out)

    def _next_host(self, m, device, out):
        if out is not None and out.device.type == "cpu" and out.is_contiguous():
            self._rng.standard_normal(out=out.numpy())  # straight into the caller's row
            self.drawn += m
            return out
        if self._buffer is None or self._buffer.size < m:
            self._buffer = np.empty(m)
        normals = self._buffer[:m]
        self._rng.standard_normal(out=normals)
        self.drawn += m
        G = torch.from_numpy(normals)  # (m,) float64
        return G.to(device) if out is None else out.copy_(G)

    def _next_device(self, m, device, out):
        device = _home(device if out is None else out.device)
        if self._torch_generator is None:
            self._torch_generator = torch.Generator(device=device)
        elif self._torch_generator.device != device:
            raise ValueError(f"this direction's normals are made on "
                             f"{self._torch_generator.device}, not {device}")
        pieces, filled = [], 0
        while filled < m:
            c, pos = divmod(self.drawn, DEVICE_CHUNK)
            if c != self._chunk_index:  # one generator, re-seeded per chunk
                self._torch_generator.manual_seed(int(self._seeds[c]))
                self._chunk = torch.randn(DEVICE_CHUNK, generator=self._torch_generator,
                                          dtype=torch.float64, device=device)
                self._chunk_index = c
            take = min(m - filled, DEVICE_CHUNK - pos)
            piece = self._chunk[pos : pos + take]
            if out is None:
                pieces.append(piece)
            else:
                out[filled : filled + take].copy_(piece)
            filled += take
            self.drawn += take
        if out is not None:
            return out
        if len(pieces) == 1:
            return pieces[0]
        return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.float64,
                                                            device=device)


def draw_directions(n, indices, random_state, preconditioner, device="cpu", generator="host"):
    """Draw preconditioned unit directions (whole float64 rows).

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
    generator : {"host", "device"}, default="host"
        Where the normals come from (see the module docstring).

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
    # "host": numpy's ziggurat normals, about twice as fast on the CPU as torch's, drawn
    # straight into host rows that go to the device in one copy; "device": made there
    indices = list(indices)
    home = torch.device(device) if _check_resolved(generator) == "device" else torch.device("cpu")
    G = torch.empty((len(indices), n), dtype=torch.float64, device=home)
    for row, i in zip(G, indices):
        NormalStream(random_state, i, n, generator).next(n, home, out=row)
    G = G.to(device)  # (B, n) float64
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


def draw_block(indices, seed, *, mask, preconditioner, measure, dtype, device,
               generator="host") -> DirectionBlock:
    """Draw directions ``indices`` (ints) with ``generator``, precondition them and reduce
    them to the measure's per-direction coefficients.

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
        U_act, log_w = draw_directions(n_active, part, seed, preconditioner, device, generator)
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


def stream_direction(index, seed, out, *, layout, preconditioner, measure, block=BLOCK,
                     generator="host"):
    """Write direction ``index`` into ``out`` (n,) a block of coordinates at a time.

    The direction of :func:`draw_directions`, to rounding, never held as a float64 row: its
    normals are read from the same :class:`NormalStream` (``generator`` "host" or "device")
    in blocks of ``block`` active coordinates (the same numbers whatever ``block``), each
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
        U, log_w = draw_directions(layout.n_active, [index], seed, preconditioner, device,
                                   generator)
        for start, stop, sel in layout.blocks(block, device):
            _write(out, sel, U[0, start:stop])
        return measure.ray_coefficients(U), float(log_w[0])
    normals = NormalStream(seed, index, layout.n_active, generator)
    g2 = torch.zeros((), dtype=torch.float64, device=device)
    v2 = torch.zeros((), dtype=torch.float64, device=device)
    for start, stop, sel in layout.blocks(block, device):
        G = normals.next(stop - start, device)  # (m,) float64
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
