"""Large-model evaluation: one direction at a time through one perturbed copy of the parameters.

:class:`LargeModel` is the evaluator of ``evaluation="large"``, behind the interface of
:class:`~volsk._evaluate.FunctionalModel` (``costs``, ``ray_costs``, ``ray_curvature``,
``ray_taylor``, ``output_jacobian_probe``). Its memory does not grow with the number of
directions: the anchor θ is one flat vector in the model's dtype whose views are the private
copy's parameters (no second copy), and a fit adds one perturbed parameter vector (the model's
dtype), one direction vector (the dtype θ + r·u is formed in, at least float32) and the
activations of one data batch's forward pass (without a ``data_batch_size``, X is split so
that one batch's outputs stay within ``BATCH_OUTPUT_BYTES``). A direction is never a row of a
matrix: it is generated into its buffer block by block from its seed
(:func:`volsk._sampling.stream_direction`) and regenerated when it is needed again. Each cost
evaluation writes θ + r·u into the perturbed buffer in place (``torch.add(θ, u, alpha=r,
out=...)``), passes that buffer's views to :func:`torch.func.functional_call`, and runs each
data batch under ``torch.inference_mode``. JVPs (the search's Taylor guesses) free a large
perturbed buffer while they run, and the C heap's free pages are handed back to the system
before each new direction (:func:`volsk._memory.trim`).

Batch invariance: every forward pass carries exactly one direction and the data batches are
the same for every direction, so a direction's numbers cannot depend on which other directions
are searched, how they are grouped or how many workers share them — no vmap, no padding. Its
numbers differ from the vmapped evaluator's by float rounding only (a batch of one parameter
set runs different kernels than a vmapped batch); ``tests/test_large_mode.py`` checks both
against each other.

:func:`make_evaluator` chooses between the two evaluators (``evaluation="auto"``).
"""

from __future__ import annotations

import copy
import threading

import numpy as np
import torch
from torch.func import jvp

from ._evaluate import (
    FORWARD_AD_LOCK,
    BatchedCost,
    FunctionalModel,
    _slice,
    choose_batch_size,
    memory_budget,
    split_batches,
)
from ._layout import ActiveLayout
from ._memory import trim
from ._sampling import DirectionBlock, stream_direction

__all__ = ["LargeModel", "StreamedDirections", "make_evaluator", "EVALUATIONS",
           "LARGE_MODEL_PARAMETERS"]

EVALUATIONS = ("auto", "vmap", "large")
# "auto" evaluates models with at least this many trainable parameters one direction at a
# time, whatever the memory budget. On the CPU the vmapped evaluator already falls to one
# (padded) direction per call from ~650k parameters, which is where the MLP ladder of
# benchmarks/language_model.py finds the two modes equally fast; a GPU's budget would allow
# vmapped batches of larger models, but one direction per pass keeps their memory bounded.
LARGE_MODEL_PARAMETERS = 1 << 20
# With data_batch_size=None the large-model evaluator splits X so that one batch's outputs
# take at most this many bytes on the CPU (a language model's tokens × vocabulary logits:
# every forward, JVP and backward then holds one batch's activations, not all of X's; one
# sequence at a time is no slower on the CPU than eight, benchmarks/language_model.py). On a
# GPU the budget is an eighth of the memory budget (fewer, larger batches keep it busy).
BATCH_OUTPUT_BYTES = 32 << 20
RELEASE_BYTES = 64 << 20  # a perturbed vector this large is freed while JVPs run
MIXED_CHUNK = 1 << 20  # elements per θ + r·u when θ and u differ in dtype (CPU temporaries)


class StreamedDirections:
    """Directions ``indices`` of one seed, regenerated into the evaluator's buffer on demand.

    Slicing gives the same directions' subset; ``load(pos)`` puts direction ``pos`` into the
    evaluator's direction buffer (generating it unless it is there already) and returns its
    measure coefficients and importance log-weight.
    """

    def __init__(self, source, indices):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)

    def __len__(self):
        return int(self.indices.size)

    def __getitem__(self, item):
        return StreamedDirections(self.source, self.indices[item])

    def load(self, pos: int):
        return self.source.load(int(self.indices[pos]))

    def block(self, pos: int) -> DirectionBlock:
        """Direction ``pos`` alone, loaded: a one-direction :class:`DirectionBlock`."""
        coef, log_w = self.load(pos)
        return DirectionBlock(self[pos : pos + 1], coef, np.array([log_w]))


class _Source:
    """What regenerates a direction: the seed and generator, the active coordinates, P and
    the measure."""

    def __init__(self, evaluator, seed, layout, preconditioner, measure, generator="host"):
        self.evaluator, self.seed, self.layout = evaluator, int(seed), layout
        self.generator = generator
        self.preconditioner, self.measure = preconditioner, measure
        self.found = {}  # index -> (coefficients, log-weight): scalars, kept

    def load(self, index: int):
        ev = self.evaluator
        with ev._lock:
            if ev._loaded != (self, index):
                trim()  # the last direction's temporaries: freed, but kept by the C heap
                direction = ev._direction_buffer()
                if not self.layout.all_active:
                    direction.zero_()  # flat coordinates are not written
                self.found[index] = stream_direction(
                    index, self.seed, direction, layout=self.layout,
                    preconditioner=self.preconditioner, measure=self.measure,
                    generator=self.generator)
                ev._loaded = (self, index)
            return self.found[index]


class LargeModel(FunctionalModel):
    """A private eval-mode copy of a module, evaluated one parameter vector at a time.

    Same parameters as :class:`~volsk._evaluate.FunctionalModel`. Every trainable parameter
    must have one floating dtype (the flat θ holds them all). ``theta`` is (n,) in the model's
    dtype; the private copy's parameters are its views. With joblib's threading backend the
    workers share the buffers and take turns (a lock); process workers each get their own.

    Examples
    --------
    >>> import torch
    >>> from volsk._evaluate_large import LargeModel
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> ev = LargeModel(net, torch.randn(5, 3), "cpu")
    >>> ev.theta.dtype, ev.theta.shape
    (torch.float32, torch.Size([26]))
    >>> ev.module[0].weight.data_ptr() == ev.theta.data_ptr()
    True
    """

    streams_directions = True

    def __init__(self, module, X, device, forward_kwargs=None, data_batch_size=None,
                 batches=None):
        super().__init__(module, X, device, forward_kwargs=forward_kwargs,
                         data_batch_size=data_batch_size, batches=batches)
        self.stacked = None  # one parameter set per forward: the plain forward is the fast path
        if data_batch_size is None and batches is None:
            size = self._auto_batch_size()
            if size is not None:
                self.batches = split_batches(self.X, self.forward_kwargs, size)
        self._init_buffers()

    def _auto_batch_size(self) -> int | None:
        """Examples per data batch whose outputs fit ``BATCH_OUTPUT_BYTES`` (the GPU's: an
        eighth of its memory budget), or None when all of X fits (or X does not fit the model:
        binding the cost then says so clearly). One forward of one example measures them."""
        if self.n_examples < 2:
            return None
        params = self.space.unflatten(self.theta)
        params.update(self.fixed)
        try:
            with torch.inference_mode():
                one = self.call(params, _slice(self.X, 0, 1, self.n_examples),
                                {k: _slice(v, 0, 1, self.n_examples)
                                 for k, v in self.forward_kwargs.items()})
        except (RuntimeError, ValueError, IndexError, TypeError):
            return None
        budget = BATCH_OUTPUT_BYTES
        if self.device.type == "cuda":
            budget = max(budget, memory_budget(self.device) // 8)
        per_example = max(1, one.numel() * one.element_size())
        size = max(1, budget // per_example)
        return int(size) if size < self.n_examples else None

    def _init_buffers(self):
        self._direction = self._perturbed = None
        self._loaded = None  # (source, index) of the direction in the buffer
        self._layout = None  # (mask, its ActiveLayout)
        self._lock = threading.RLock()

    def _anchor_vector(self) -> torch.Tensor:
        dtypes = sorted({str(d) for d in self.space.dtypes})
        if len(dtypes) != 1 or not self.model_dtype.is_floating_point:
            raise ValueError(
                f"evaluation='large' needs every trainable parameter in one floating dtype, "
                f"got {', '.join(dtypes)}; cast the model (e.g. model.float()) or use "
                "evaluation='vmap'"
            )
        theta = torch.empty(self.space.n, dtype=self.model_dtype, device=self.device)
        self._share_parameters(theta, copy_values=True)
        return theta

    def _share_parameters(self, theta, copy_values):
        """Make the private copy's trainable parameters views of ``theta`` (one copy of θ)."""
        params = dict(self.module.named_parameters())
        for name, shape, piece in zip(self.space.names, self.space.shapes,
                                      torch.split(theta, self.space.numels)):
            p = params[name]
            if copy_values:
                piece.copy_(p.detach().reshape(-1))
            p.data = piece.view(shape)  # the parameter's own storage is freed

    def _buffers(self):
        """(direction, perturbed): the two n-vectors a fit adds, allocated once."""
        return self._direction_buffer(), self._perturbed_buffer()

    def _direction_buffer(self):
        """The direction n-vector alone (a direction is loaded before its JVP, which needs no
        perturbed copy)."""
        if self._direction is None:
            self._direction = torch.zeros(self.space.n, dtype=self.ray_dtype, device=self.device)
        return self._direction

    def _perturbed_buffer(self):
        """The perturbed n-vector alone (the flat-coordinate test needs no direction)."""
        if self._perturbed is None:
            self._perturbed = torch.empty_like(self.theta)
        return self._perturbed

    def _release_perturbed(self):
        """Free a large perturbed vector while JVPs run: they never use it, and their dual
        activations are the largest of a fit (a language model's head holds primal, tangent
        and a temporary of one batch's logits); the next cost evaluation allocates it again.
        Below ``RELEASE_BYTES`` it is kept: the CPU allocator serves such blocks from its heap,
        where freeing and re-allocating one between JVPs fragments memory instead of freeing
        it (glibc maps blocks above 32 MiB directly and returns them at once)."""
        if self._perturbed is not None and (
                self._perturbed.numel() * self._perturbed.element_size() >= RELEASE_BYTES):
            self._perturbed = None
        trim()

    # -- pickling (joblib process workers) ---------------------------------------------------
    def __getstate__(self):
        state = self.__dict__.copy()
        for key in ("_direction", "_perturbed", "_loaded", "_lock", "_layout"):
            state.pop(key)
        # the parameters are views of θ: pickled as views, each would carry all of θ
        trainable = [p for name, p in self.module.named_parameters() if name in
                     set(self.space.names)]
        saved = [p.data for p in trainable]
        try:
            for p in trainable:
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            state["module"] = copy.deepcopy(self.module)
        finally:
            for p, data in zip(trainable, saved):
                p.data = data
        state["fixed"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._share_parameters(self.theta, copy_values=False)
        names = set(self.space.names)
        self.fixed = {k: v for k, v in self.module.named_parameters() if k not in names}
        self.fixed.update(dict(self.module.named_buffers()))
        self._init_buffers()

    # -- costs ------------------------------------------------------------------------------
    def _cost_at(self, cost, flat: torch.Tensor) -> float:
        """``cost`` at the flat parameter vector ``flat`` (n,), summed over the data batches."""
        params = self.space.unflatten(flat)  # views when flat is in the model's dtype
        params.update(self.fixed)
        with torch.inference_mode():
            if not isinstance(cost, BatchedCost):
                X, kwargs = (self.X, self.forward_kwargs) if self.X is not None else (
                    self.batches[0].X, self.batches[0].kwargs)
                return float(cost(self.call(params, X, kwargs)))
            # summed in float64 where the outputs are: one transfer to the host per
            # evaluation, not one per data batch (the same numbers as Python floats)
            total = torch.zeros((), dtype=torch.float64, device=self.device)
            for b, (part, weight) in enumerate(zip(cost.parts, cost.weights)):
                batch = self.batches[b]
                value = part(self.call(params, batch.X, batch.kwargs))
                total += weight * torch.as_tensor(value, device=self.device).double()
            return float(total)

    def costs(self, cost, thetas: torch.Tensor) -> torch.Tensor:
        """``cost`` at each row of ``thetas`` (B, n) → (B,) float64, one forward per row."""
        with self._lock:
            return torch.tensor([self._cost_at(cost, row) for row in thetas],
                                dtype=torch.float64, device=self.device)

    def moved_costs(self, cost, coords, step: float, generator, draws: int = 2) -> torch.Tensor:
        """The cost at θ with θ[coords] += step·N(0, 1) noise, for ``draws`` draws (float64).

        The flat-coordinate test of :func:`volsk._problem.find_flat_coordinates`. ``coords``:
        an index tensor or a list of them (pieces of one set, never concatenated: a language
        model's millions of candidates are held once); the noise is drawn from ``generator``
        a chunk of coordinates at a time, and only a chunk is on the device at once.
        """
        parts = [coords] if isinstance(coords, torch.Tensor) else list(coords)
        out = []
        with self._lock:
            perturbed = self._perturbed_buffer()
            self._loaded = None
            for _ in range(draws):
                perturbed.copy_(self.theta)
                for part in parts:
                    for start in range(0, part.numel(), MIXED_CHUNK):
                        where = part[start : start + MIXED_CHUNK].to(self.device)
                        noise = torch.randn(where.numel(), generator=generator,
                                            dtype=torch.float64).to(self.device)
                        moved = self.theta[where].to(torch.float64) + step * noise
                        perturbed[where] = moved.to(perturbed.dtype)
                out.append(self._cost_at(cost, perturbed))
        return torch.tensor(out, dtype=torch.float64, device=self.device)

    # -- rays -------------------------------------------------------------------------------
    def stream_directions(self, indices, seed, *, mask, preconditioner, measure,
                          generator="host") -> StreamedDirections:
        """The directions ``indices`` of ``seed`` (drawn with ``generator``), generated on
        demand (never a matrix)."""
        if self._layout is None or self._layout[0] is not mask:
            self._layout = (mask, ActiveLayout.from_mask(mask))  # one per problem's mask
        return StreamedDirections(_Source(self, seed, self._layout[1], preconditioner, measure,
                                          generator), indices)

    def _perturb(self, r: float):
        """The perturbed buffer ← θ + r·u (u: the direction in the buffer), in place."""
        direction, perturbed = self._buffers()
        if direction.dtype == self.theta.dtype:
            torch.add(self.theta, direction, alpha=r, out=perturbed)
            return perturbed
        # θ + r·u formed in u's dtype and rounded once to the model's; on the CPU mixed
        # dtypes go through temporaries, so a chunk at a time
        for start in range(0, self.space.n, MIXED_CHUNK):
            part = slice(start, start + MIXED_CHUNK)
            torch.add(self.theta[part], direction[part], alpha=r, out=perturbed[part])
        return perturbed

    def _tangent(self, directions, j):
        """Direction j of a StreamedDirections (loaded) or of a (B, n) tensor, in the model's
        dtype."""
        if isinstance(directions, StreamedDirections):
            directions.load(j)
            return self._direction.to(self.model_dtype)
        return directions[j].to(self.model_dtype)

    def ray_costs(self, cost, U, batch_size: int = 1):
        """``evaluate(pos, r)``: the costs (numpy float64) at θ + r·U[pos] for the positions
        ``pos`` of the directions U (a :class:`StreamedDirections` or a (k, n) tensor).

        One forward per (direction, radius); the positions are visited direction by direction
        so each direction is loaded (generated) once per call. ``batch_size`` is unused.
        """

        def evaluate(pos, r):
            pos = np.asarray(pos, dtype=np.int64)
            r = np.asarray(r, dtype=np.float64)
            out = np.empty(pos.size)
            with self._lock:
                for j in np.argsort(pos, kind="stable"):
                    if isinstance(U, StreamedDirections):
                        U.load(int(pos[j]))
                    else:
                        self._direction_buffer().copy_(U[int(pos[j])])
                        self._loaded = None
                    out[j] = self._cost_at(cost, self._perturb(float(r[j])))
            return out

        return evaluate

    def ray_curvature(self, transform, reduce, directions) -> torch.Tensor:
        """``reduce(tangent)`` per direction (one JVP each, no vmap); see
        :meth:`FunctionalModel.ray_curvature`."""
        reduces = list(reduce) if isinstance(reduce, (list, tuple)) else [reduce]
        batches = range(len(reduces)) if isinstance(reduce, (list, tuple)) else [None]
        total = torch.zeros(len(directions), dtype=torch.float64, device=self.device)
        with self._lock, torch.no_grad(), FORWARD_AD_LOCK:
            self._release_perturbed()
            for j in range(len(directions)):
                u = self._tangent(directions, j)
                for b, red in zip(batches, reduces):
                    _, tangent = jvp(lambda th, b=b: transform(self.outputs(th, b)),
                                     (self.theta,), (u,))
                    total[j] += red(tangent).double()
                    del tangent
                    trim()  # a batch's duals: the next batch's are as large
        return total

    def ray_taylor(self, cost, directions):
        """Value, slope and curvature of r ↦ cost(θ + r u) at 0 per direction (nested JVPs,
        one direction at a time); see :meth:`FunctionalModel.ray_taylor`."""
        if isinstance(cost, BatchedCost):
            parts = list(enumerate(zip(cost.parts, cost.weights)))

            def full(th):
                return sum(w * part(self.outputs(th, b)) for b, (part, w) in parts)
        else:

            def full(th):
                return cost(self.outputs(th))

        out = torch.zeros(3, len(directions), dtype=torch.float64, device=self.device)
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        with self._lock, torch.no_grad(), FORWARD_AD_LOCK:
            self._release_perturbed()
            for j in range(len(directions)):
                u = self._tangent(directions, j)

                def g_and_slope(r, u=u):
                    return jvp(lambda s: full(self.theta + s.to(u.dtype) * u), (r,),
                               (torch.ones_like(r),))

                (g0, g1), (_, g2) = jvp(g_and_slope, (zero,), (torch.ones_like(zero),))
                out[:, j] = torch.stack([g0, g1, g2]).to(torch.float64)
        return out[0], out[1], out[2]

    def output_jacobian_probe(self, n_probes: int = 2, seed: int = 0) -> torch.Tensor:
        """1 where some random cotangent v gives a non-zero (Jᵀ v)_i, else 0 (uint8, (n,)):
        0 only on zero Jacobian columns. The gradients are taken per parameter (views of θ)
        and each is read and dropped as soon as the backward pass has formed it (a hook), so
        besides this mask no more than a layer's gradients exist at once, never a full one."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        leaves = [piece.detach().requires_grad_(True)  # views of θ: no copy
                  for piece in self.space.unflatten(self.theta).values()]
        params = dict(zip(self.space.names, leaves))
        params.update(self.fixed)
        seen = torch.zeros(self.space.n, dtype=torch.uint8, device=self.device)

        def reader(piece):
            def read(leaf):
                piece.view(leaf.shape).logical_or_(leaf.grad != 0)
                leaf.grad = None
            return read

        hooks = [leaf.register_post_accumulate_grad_hook(reader(piece))
                 for leaf, piece in zip(leaves, torch.split(seen, self.space.numels))]
        try:
            with torch.enable_grad():
                for batch in self.batches:
                    out = self.call(params, batch.X, batch.kwargs)
                    mask = batch.token_mask()
                    for _ in range(n_probes):
                        v = torch.randn(out.shape, generator=gen,
                                        dtype=out.dtype).to(out.device)
                        if mask is not None and mask.shape == out.shape[:-1]:
                            v = v * mask[..., None].to(v.dtype)  # masked tokens do not count
                        out.backward(v, retain_graph=True, inputs=leaves)
                    del out
        finally:
            for hook in hooks:
                hook.remove()
        return seen


def _trainable(module) -> tuple[int, set]:
    params = [p for p in module.parameters() if p.requires_grad]
    return sum(p.numel() for p in params), {p.dtype for p in params}


def make_evaluator(module, X, device, *, evaluation="auto", forward_kwargs=None,
                   data_batch_size=None, batches=None):
    """The evaluator of ``evaluation``: "vmap" (:class:`~volsk._evaluate.FunctionalModel`),
    "large" (:class:`LargeModel`) or "auto".

    "auto" chooses the large-model evaluator for models of at least
    ``LARGE_MODEL_PARAMETERS`` trainable parameters in one floating dtype, and for smaller
    ones when a vmapped batch of two directions would not fit the memory budget
    (:func:`volsk._evaluate.memory_budget`); else the vmapped one.

    Examples
    --------
    >>> import torch
    >>> from volsk._evaluate_large import make_evaluator
    >>> net = torch.nn.Linear(3, 2)
    >>> type(make_evaluator(net, torch.randn(4, 3), "cpu")).__name__
    'FunctionalModel'
    >>> type(make_evaluator(net, torch.randn(4, 3), "cpu", evaluation="large")).__name__
    'LargeModel'
    """
    if evaluation not in EVALUATIONS:
        raise ValueError(f"evaluation must be one of {EVALUATIONS}, got {evaluation!r}")
    kwargs = dict(forward_kwargs=forward_kwargs, data_batch_size=data_batch_size,
                  batches=batches)
    if evaluation == "large":
        return LargeModel(module, X, device, **kwargs)
    n, dtypes = _trainable(module)
    one_dtype = len(dtypes) == 1 and next(iter(dtypes)).is_floating_point
    if evaluation == "auto" and one_dtype and n >= LARGE_MODEL_PARAMETERS:
        return LargeModel(module, X, device, **kwargs)
    evaluator = FunctionalModel(module, X, device, **kwargs)
    if evaluation == "vmap" or not one_dtype:
        return evaluator
    try:
        vmapped_fits = choose_batch_size(evaluator, 2) >= 2  # one anchor forward
    except (RuntimeError, ValueError, IndexError, TypeError):
        return evaluator  # X does not fit the model: the cost's binding says so clearly
    return evaluator if vmapped_fits else LargeModel(module, X, device, **kwargs)
