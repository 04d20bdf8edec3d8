"""Functional evaluation of a model at many parameter vectors.

The user's module is deep-copied once (:func:`volsk._private_copy.private_copy`: no hook runs
on the copy, computed weights such as weight normalisation follow their parameters); the copy
is put in eval mode and evaluated with :func:`torch.func.functional_call`, so nothing volsk
does can touch the user's parameters, buffers, mode, hooks, ``requires_grad`` flags or
``.grad`` fields.  Many directions are evaluated in one call with :func:`torch.func.vmap` over
stacked flat parameter vectors.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call, jvp, vmap

from ._private_copy import forward_hooks, observing_outputs, private_copy
from ._stacked import StackedMLP

__all__ = ["ParameterSpace", "FunctionalModel", "extract_output"]


# torch's forward-mode AD keeps its dual level in process-wide state: two threads running
# JVPs at once corrupt each other's tangents (wrong numbers or "invalid forward AD level"
# errors, seen with joblib's threading backend). Every JVP in volsk runs under this lock.
FORWARD_AD_LOCK = threading.RLock()


def extract_output(out):
    """The tensor a model's forward produced: a tensor, a tuple's first item or ``.logits``."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and len(out) > 0:
        return extract_output(out[0])
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    raise TypeError(
        f"the model returned {type(out).__name__}; volsk needs a tensor, a tuple whose first item "
        "is a tensor, or an object with a `.logits` tensor (Hugging Face). Wrap the model so that "
        "forward returns the outputs tensor."
    )


@dataclass(frozen=True)
class ParameterSpace:
    """The trainable parameters of a module, flattened in ``named_parameters()`` order.

    Attributes
    ----------
    names : list of str
    shapes : list of torch.Size
    numels : list of int
    dtypes : list of torch.dtype
    n : int
        Total number of trainable scalars.
    """

    names: list
    shapes: list
    numels: list
    dtypes: list

    @property
    def n(self) -> int:
        return int(sum(self.numels))

    @classmethod
    def of(cls, module: torch.nn.Module) -> ParameterSpace:
        named = [(k, p) for k, p in module.named_parameters() if p.requires_grad]
        return cls(
            names=[k for k, _ in named],
            shapes=[p.shape for _, p in named],
            numels=[p.numel() for _, p in named],
            dtypes=[p.dtype for _, p in named],
        )

    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.numels)]).astype(np.int64)

    def unflatten(self, flat: torch.Tensor) -> dict:
        """Split a flat vector (n,) into ``{name: tensor}`` with each parameter's shape, dtype."""
        pieces = torch.split(flat, self.numels)
        return {
            name: piece.reshape(shape).to(dtype)
            for name, piece, shape, dtype in zip(self.names, pieces, self.shapes, self.dtypes)
        }

    def coordinate_names(self, indices) -> list:
        """Human-readable names such as ``'0.weight[3, 7]'`` for flat indices."""
        flat = np.asarray(indices, dtype=np.int64).reshape(-1)
        offsets = self.offsets()
        tensor = np.searchsorted(offsets, flat, side="right") - 1
        local = flat - offsets[tensor]
        out = [""] * flat.size
        for t in np.unique(tensor):  # one vectorised unravel per parameter tensor
            where = np.flatnonzero(tensor == t)
            shape = tuple(self.shapes[t])
            coords = [c.tolist() for c in np.unravel_index(local[where], shape)] if shape else []
            for j, pos in enumerate(where.tolist()):
                out[pos] = f"{self.names[t]}[{', '.join(str(c[j]) for c in coords)}]"
        return out


def _as_model_dtype(X: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    if not torch.is_floating_point(X):
        return X  # token ids, class indices
    for p in module.parameters():
        if torch.is_floating_point(p):
            return X.to(p.dtype)
    return X


class FunctionalModel:
    """A private eval-mode copy of a module, evaluated functionally at flat parameter vectors.

    The copy runs no hooks: forward (pre-)hooks and backward hooks registered on the user's
    modules, and torch's process-wide module hooks, never see volsk's forward passes (which
    are vmapped over directions: a hook would be fed batched tensors). The user's model keeps
    its hooks, and they fire on the user's own forward passes as before. What is measured is
    ``forward`` alone; a warning is given when the model has forward hooks (a hook that
    changes a module's outputs belongs in ``forward``). Weights computed from
    other parameters (``torch.nn.utils.parametrizations.weight_norm`` and other
    parametrizations; the legacy ``weight_norm``, ``spectral_norm`` and ``prune`` pre-hooks)
    are recomputed from the perturbed parameters at every evaluation: the trainable
    parameters are the originals (g and v for weight normalisation).
    See :mod:`volsk._private_copy`.

    Parameters
    ----------
    module : torch.nn.Module
        The user's module. It is deep-copied; the original is never modified.
    X : torch.Tensor or dict of tensors
        The inputs on which the neighbourhood is defined (moved to ``device``).
    device : torch.device
    forward_kwargs : dict, optional
        Extra keyword arguments for ``forward`` (e.g. ``attention_mask``); tensors whose first
        axis has one entry per example are split with X.
    data_batch_size : int, optional
        Evaluate X in batches of this many examples (costs are exact weighted means over
        batches). None: X in one forward pass.
    batches : list of DataBatch, optional
        Pre-split data (from a DataLoader); then ``X`` is None.
    """

    def __init__(self, module, X, device, forward_kwargs=None, data_batch_size=None,
                 batches=None):
        self.device = torch.device(device)
        hooked = forward_hooks(module)
        if hooked:
            shown = ", ".join(hooked[:5]) + (f" and {len(hooked) - 5} more" if len(hooked) > 5
                                             else "")
            warnings.warn(
                f"the model has forward hooks or forward pre-hooks (on {shown}); volsk runs no "
                "hook on its private copy (they would be fed vmap-batched tensors), so it "
                "measures forward() alone. If a hook changes a module's inputs or outputs, move "
                "that computation into forward().",
                UserWarning,
                stacklevel=3,
            )
        self.module = private_copy(module).to(self.device)
        self.module.eval()
        for m in self.module.modules():
            # ReLU(inplace=True) and friends: the same numbers, but an in-place op on X (a
            # leading activation) would change the caller's data and is refused inside
            # torch.func transforms; the private copy computes out of place
            if isinstance(getattr(m, "inplace", None), bool):
                m.inplace = False
        for p in self.module.parameters():
            p.grad = None  # requires_grad is kept: it marks what is trainable (perturbed)
        self.space = ParameterSpace.of(module)
        if self.space.n == 0:
            raise ValueError(
                "model has no trainable parameters (requires_grad=True); volsk perturbs trainable "
                "parameters only."
            )
        self.model_dtype = self.space.dtypes[0]
        self.theta = self._anchor_vector()  # (n,)
        # Parameters not in the space (frozen) are passed as fixed tensors, like buffers.
        self.fixed = {
            k: v for k, v in self.module.named_parameters() if k not in set(self.space.names)
        }
        self.fixed.update(dict(self.module.named_buffers()))
        if batches is None:
            self.X = self._to_device(X)
            self.forward_kwargs = {
                k: self._to_device(v) for k, v in (forward_kwargs or {}).items()
            }
            self.n_examples = self._n_examples(self.X)
            self.batches = split_batches(self.X, self.forward_kwargs, data_batch_size)
        else:
            self.batches = [
                DataBatch(self._to_device(b.X), {k: self._to_device(v) for k, v in
                                                 b.kwargs.items()}, b.n)
                for b in batches
            ]
            self.n_examples = sum(b.n for b in self.batches)
            self.X, self.forward_kwargs = concatenate_batches(self.batches)
        # plain MLPs: costs from stacked weights, without vmap (same numbers, cheaper)
        inputs = [(b.X, b.kwargs) for b in self.batches]
        if self.X is not None:
            inputs.append((self.X, self.forward_kwargs))
        self.stacked = StackedMLP.of(self.module, self.space, self.fixed, inputs)

    def _anchor_vector(self) -> torch.Tensor:
        """θ: the trainable parameters as one flat (n,) float64 vector on the device (the
        large-model evaluator keeps it in the model's dtype instead)."""
        params = dict(self.module.named_parameters())
        theta = torch.cat([params[k].detach().reshape(-1).to(torch.float64)
                           for k in self.space.names])
        return theta.to(self.device)

    def _to_device(self, X):
        if isinstance(X, torch.Tensor):
            return _as_model_dtype(X, self.module).to(self.device)
        if isinstance(X, dict):
            return {k: self._to_device(v) for k, v in X.items()}
        if isinstance(X, (tuple, list)):
            return type(X)(self._to_device(v) for v in X)
        return X

    @staticmethod
    def _n_examples(X):
        if isinstance(X, torch.Tensor):
            return int(X.shape[0])
        if isinstance(X, dict):
            return int(next(iter(X.values())).shape[0])
        return int(X[0].shape[0])

    # -- single evaluations -------------------------------------------------------------------
    def outputs(self, flat: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        """Model outputs at the flat parameter vector ``flat`` (n,): on all of X, or on one
        data batch."""
        params = self.space.unflatten(flat.to(self.model_dtype))
        params.update(self.fixed)
        if batch is None:
            if self.X is None:
                raise ValueError(
                    "this computation needs all of X in one forward pass, but X came as "
                    "batches of different shapes; pass X as one tensor"
                )
            X, kwargs = self.X, self.forward_kwargs
        else:
            X, kwargs = self.batches[batch].X, self.batches[batch].kwargs
        return self.call(params, X, kwargs)

    def call(self, params: dict, X, kwargs: dict) -> torch.Tensor:
        """The module's output tensor with ``params`` on inputs X (a tensor, a tuple of
        positional inputs or a dict of keyword inputs) and forward keyword arguments."""
        with _math_attention():
            if isinstance(X, dict):
                out = functional_call(self.module, params, args=(), kwargs={**X, **kwargs})
            elif isinstance(X, tuple):
                out = functional_call(self.module, params, args=X, kwargs=kwargs)
            else:
                out = functional_call(self.module, params, args=(X,), kwargs=kwargs)
        return extract_output(out)

    def anchor_outputs(self, batch: int | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.outputs(self.theta, batch).detach()

    # -- batched evaluations ------------------------------------------------------------------
    def costs(self, cost, thetas: torch.Tensor) -> torch.Tensor:
        """``cost`` at each row of ``thetas`` (B, n) → (B,) float64.

        One vmapped forward pass per data batch (a plain MLP: one stacked pass, see
        volsk._stacked); a :class:`BatchedCost` is the weighted sum of its per-batch costs, a
        plain callable is evaluated on all of X.
        """
        k = thetas.shape[0]

        def one(part, b):
            if self.stacked is None:
                return _vmap_rows(lambda flat: part(self.outputs(flat, b)), thetas)
            X = self.X if b is None else self.batches[b].X
            outputs_t = self.stacked.features_first(thetas, X)  # (B', out, N), padded rows
            if hasattr(part, "features_first"):
                return part.features_first(outputs_t)[:k]
            return vmap(part)(outputs_t.transpose(1, 2))[:k]

        with torch.no_grad():
            if not isinstance(cost, BatchedCost):
                return one(cost, None).double()
            total = torch.zeros(k, dtype=torch.float64, device=self.device)
            for b, (part, weight) in enumerate(zip(cost.parts, cost.weights)):
                total += weight * one(part, b).double()
        return total

    # -- costs along rays -----------------------------------------------------------------------
    @property
    def ray_dtype(self) -> torch.dtype:
        """The dtype θ + r·u is formed in: the model's, but at least float32. A half-precision
        r (bfloat16 keeps 8 bits) would move every parameter by the same 0.4 % steps and the
        search could not resolve a crossing; in float32 each parameter is rounded once, to the
        model's dtype, as before."""
        return torch.promote_types(self.model_dtype, torch.float32)

    def ray_costs(self, cost, U: torch.Tensor, batch_size: int):
        """``evaluate(pos, r)``: the costs (numpy float64) at θ + r·U[pos] for the rows
        ``pos`` (ints) of the directions U (k, n) and radii ``r``, in batches of
        ``batch_size`` directions.

        θ + r·u is formed in :attr:`ray_dtype` with one multiply-add (a float32 model sees
        those numbers in float32 anyway): half the memory traffic of forming it in float64
        and casting, which on the digits MLP was ~15 % of an evaluation.
        """
        dtype = self.ray_dtype
        theta = self.theta.to(dtype)
        U = U.to(dtype)

        def evaluate(pos, r):
            r_t = torch.as_tensor(r, dtype=torch.float64, device=self.device).to(dtype)
            # every direction still searching (the first rounds): slices, no gather
            rows = U if len(pos) == U.shape[0] else U.index_select(
                0, torch.as_tensor(pos, device=self.device))
            parts = [
                self.costs(cost, torch.addcmul(theta, r_t[i : i + batch_size, None],
                                               rows[i : i + batch_size]))
                for i in range(0, rows.shape[0], batch_size)
            ]
            return torch.cat(parts).cpu().numpy()

        return evaluate

    def ray_taylor(self, cost, directions: torch.Tensor):
        """Value, first and second derivative of r ↦ cost(θ + r u) at r = 0, per direction.

        Nested forward-mode JVPs: one pass with second-order dual numbers per direction.
        ``directions`` (B, n) float64 unit vectors. Returns three (B,) float64 tensors.
        """
        theta = self.theta
        if isinstance(cost, BatchedCost):
            parts = list(enumerate(zip(cost.parts, cost.weights)))

            def full(th):
                return sum(w * part(self.outputs(th, b)) for b, (part, w) in parts)
        else:

            def full(th):
                return cost(self.outputs(th))

        def along(u):
            def g(r):
                return full(theta + r * u)

            def g_and_slope(r):
                return jvp(g, (r,), (torch.ones_like(r),))

            zero = torch.zeros((), dtype=torch.float64, device=theta.device)
            (g0, g1), (_, g2) = jvp(g_and_slope, (zero,), (torch.ones_like(zero),))
            return g0, g1, g2

        with torch.no_grad(), FORWARD_AD_LOCK:
            g0, g1, g2 = _vmap_rows(along, directions)
        return g0.to(torch.float64), g1.to(torch.float64), g2.to(torch.float64)

    def ray_curvature(self, transform, reduce, directions: torch.Tensor) -> torch.Tensor:
        """``reduce(tangent)`` per direction, where tangent = d/dr transform(outputs(θ + r u)) at 0.

        One first-order forward-mode JVP per direction; the primal pass is shared by the whole
        batch (θ is not batched). For costs whose second derivative at the anchor is a
        quadratic form in this tangent (KL: Σ p₀ t², MSE: 2·mean t²) this replaces the nested
        JVP of :meth:`ray_taylor` at a fraction of its price.
        """
        # the tangent pass in the model's own precision: g2 is a first guess, and float64
        # duals through a float32 model cost ~30% more (conversions on every parameter)
        theta = self.theta.to(self.model_dtype)
        directions_in = directions.to(self.model_dtype)
        reduces = reduce if isinstance(reduce, (list, tuple)) else [reduce]
        batches = [None] if len(reduces) == 1 and not isinstance(reduce, (list, tuple)) else (
            range(len(reduces)))
        total = torch.zeros(directions.shape[0], dtype=torch.float64, device=directions.device)
        with torch.no_grad(), FORWARD_AD_LOCK:
            for b, red in zip(batches, reduces):

                def along(u, b=b, red=red):
                    _, tangent = jvp(lambda th: transform(self.outputs(th, b)), (theta,), (u,))
                    return red(tangent)

                total += _vmap_rows(along, directions_in).double()
        return total

    def output_jacobian_probe(self, n_probes: int = 2, seed: int = 0) -> torch.Tensor:
        """|Jᵀ v| summed over random cotangents v: exactly zero only on zero Jacobian columns."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        theta = self.theta.to(self.model_dtype).detach().requires_grad_(True)
        total = torch.zeros_like(self.theta)
        with torch.enable_grad():
            for b in range(len(self.batches)):
                out = self.outputs(theta, b)
                mask = self.batches[b].token_mask()
                for _ in range(n_probes):
                    v = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
                    if mask is not None and mask.shape == out.shape[:-1]:
                        v = v * mask[..., None].to(v.dtype)  # masked tokens do not count
                    (g,) = torch.autograd.grad(out, theta, v, retain_graph=True)
                    total += g.detach().abs().to(torch.float64)
        return total

    # -- memory ---------------------------------------------------------------------------------
    def bytes_per_direction(self) -> int:
        """Rough memory of one direction in a vmapped forward: activations plus parameter copies."""
        sizes = []

        def record(out):
            try:
                t = extract_output(out)
                sizes.append(t.numel() * t.element_size())
            except TypeError:
                pass

        with observing_outputs(self.module, record):
            self.anchor_outputs(0)
        # activations (kept for the cost) + a float64 perturbed copy and its cast per direction
        return int(2 * sum(sizes) + 4 * 8 * self.space.n)


@dataclass
class DataBatch:
    """One slice of the data: model inputs, forward keyword arguments, number of examples."""

    X: object
    kwargs: dict
    n: int

    def token_mask(self):
        """The (N, T) attention mask that also masks the cost, if any."""
        mask = self.kwargs.get("attention_mask")
        if mask is None and isinstance(self.X, dict):
            mask = self.X.get("attention_mask")
        return mask


class BatchedCost:
    """A cost that is a weighted mean of per-data-batch costs: C = Σ_b w_b C_b.

    Exact for costs that are means over examples (or unmasked tokens): w_b is the batch's
    share of the examples (tokens). Calling it on outputs for all of X splits them by batch.
    """

    def __init__(self, parts, weights, sizes):
        self.parts = list(parts)
        self.weights = [float(w) for w in weights]
        self.sizes = list(sizes)

    def __call__(self, outputs):
        pieces = torch.split(outputs, self.sizes)
        return sum(w * part(o) for part, w, o in zip(self.parts, self.weights, pieces))

    def __len__(self):
        return len(self.parts)


def _slice(value, start, stop, n):
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n:
        return value[start:stop]
    if isinstance(value, dict):
        return {k: _slice(v, start, stop, n) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_slice(v, start, stop, n) for v in value)
    return value


def split_batches(X, kwargs, batch_size):
    """Split X (and per-example forward kwargs) into batches of ``batch_size`` examples."""
    n = FunctionalModel._n_examples(X)
    if batch_size is None or batch_size >= n:
        return [DataBatch(X, kwargs, n)]
    return [
        DataBatch(_slice(X, i, min(i + batch_size, n), n),
                  {k: _slice(v, i, min(i + batch_size, n), n) for k, v in kwargs.items()},
                  min(i + batch_size, n) - i)
        for i in range(0, n, batch_size)
    ]


def concatenate_batches(batches):
    """All of X from its batches, or (None, {}) when their shapes do not line up."""
    def cat(values):
        first = values[0]
        if isinstance(first, torch.Tensor):
            return torch.cat(values)
        if isinstance(first, dict):
            return {k: cat([v[k] for v in values]) for k in first}
        if isinstance(first, tuple):
            return tuple(cat([v[i] for v in values]) for i in range(len(first)))
        return first

    try:
        X = cat([b.X for b in batches])
        kwargs = {k: cat([b.kwargs[k] for b in batches]) for k in batches[0].kwargs}
    except (RuntimeError, KeyError):
        return None, {}
    return X, kwargs


def _math_attention():
    """Scaled-dot-product attention through the math kernel: the fused CPU/flash kernels have
    no forward-mode AD and no vmap rule (Hugging Face models use them by default)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        import contextlib

        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _vmap_rows(fn, rows):
    """``vmap(fn)(rows)``, with a single row padded to two.

    A batch of one is dispatched to different kernels (mm instead of bmm) whose rounding
    differs in the last bits; padding keeps every direction's numbers identical whatever the
    batch size, so results do not depend on ``batch_size``.
    """
    if rows.shape[0] == 1:
        return vmap(fn)(rows.expand(2, *rows.shape[1:]))[:1]
    return vmap(fn)(rows)


def memory_budget(device: torch.device) -> int:
    """Bytes volsk may use for one batch of directions on ``device``."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(0.4 * free)
    # On the CPU a batch whose activations stay near the cache is fastest (a larger batch is
    # memory bound: benchmarks/radius_search.py measured the batch sizes; this budget gives
    # ~40 directions per call on the digits MLP). Larger models get one direction at a time.
    return 128 << 20


def choose_batch_size(model: FunctionalModel, n_directions: int, factor: float = 3.0) -> int:
    """Directions per vmapped call from a memory budget (``factor`` covers the JVP's duals)."""
    per = max(1, int(factor * model.bytes_per_direction()))
    return int(max(1, min(n_directions, 512, memory_budget(model.device) // per)))
