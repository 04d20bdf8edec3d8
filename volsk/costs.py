"""Costs: how far a perturbed network's behaviour is from the anchor's on the data.

A cost specification (:class:`KL`, :class:`CrossEntropy`, :class:`MSE`, :class:`CallableCost`)
is bound to the anchor's outputs on one data batch (and its labels and token mask) by
:meth:`Cost.bind`; the bound cost is a callable ``outputs -> scalar tensor``. Every cost is a
mean over examples (and unmasked tokens), is >= 0 and is 0 at the anchor for "kl" and "mse";
"cross_entropy" measures the increase of the loss over the anchor's.

A bound cost also carries what the rest of volsk needs to know about it, so that nothing else
branches on the cost's name:

- ``n_terms(n_examples)``: how many terms its mean runs over (a data batch's share of the
  whole cost is its share of the terms);
- ``taylor()``: its second directional derivative at the anchor as a quadratic form in one
  output tangent (the radius search's first guess), or None;
- ``ggn_factor(anchor, weight)``: the output-space factor of its Gauss–Newton matrix, or None;
- ``output_hessian_diagonal(...)``: the closed-form diagonal of its Hessian in the outputs;
- ``at_anchor(anchor)``: the same cost bound to other anchor outputs (a float64 twin);
- ``features_first``: present on (N, out) "kl"-on-logits and "mse" costs — the same cost for a
  batch of B transposed outputs (B, out, N) → (B,), as the plain-MLP fast path produces them.

The bound KL keeps one array of the anchor outputs' size and evaluates chunk by chunk of
tokens (rows), so that a language model's (tokens × vocabulary) outputs are never copied whole.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings

import torch

__all__ = [
    "OUTPUT_KINDS",
    "COSTS",
    "Cost",
    "BoundCost",
    "KL",
    "CrossEntropy",
    "MSE",
    "CallableCost",
    "resolve_cost",
    "resolve_output",
    "make_cost",
    "to_log_probs",
    "check_token_mask",
]

OUTPUT_KINDS = ("logits", "probabilities", "log_probabilities", "binary_logits",
                "binary_probabilities")
BINARY_KINDS = ("binary_logits", "binary_probabilities")
COSTS = ("kl", "cross_entropy", "mse")
IGNORE_INDEX = -100  # labels equal to this are ignored, as in torch.nn.CrossEntropyLoss


def to_log_probs(outputs: torch.Tensor, output: str) -> torch.Tensor:
    """Log-probabilities over the last axis from logits, probabilities or log-probabilities.

    A binary classifier's single output per example (the last axis of size 1, as with
    ``BCEWithLogitsLoss``/``BCELoss``) — a logit z or a probability q of class 1 — becomes the
    two log-probabilities (log(1 − q), log q) over a last axis of size 2.

    Examples
    --------
    >>> import torch
    >>> from volsk.costs import to_log_probs
    >>> to_log_probs(torch.tensor([[0.25, 0.75]]), "probabilities").exp()
    tensor([[0.2500, 0.7500]])
    >>> to_log_probs(torch.tensor([[0.0]]), "binary_logits").exp()
    tensor([[0.5000, 0.5000]])
    """
    if output == "binary_logits":
        z = outputs[..., :1] if outputs.shape[-1:] == (1,) else outputs.unsqueeze(-1)
        return torch.cat([torch.nn.functional.logsigmoid(-z), torch.nn.functional.logsigmoid(z)],
                         dim=-1)
    if output == "binary_probabilities":
        q = outputs[..., :1] if outputs.shape[-1:] == (1,) else outputs.unsqueeze(-1)
        tiny = torch.finfo(q.dtype).tiny
        return torch.cat([torch.log((1 - q).clamp_min(tiny)), torch.log(q.clamp_min(tiny))],
                         dim=-1)
    if output == "logits":
        return torch.log_softmax(outputs, dim=-1)
    if output == "probabilities":
        # clamp: a softmax output can underflow to exactly 0, whose log would poison the mean
        return torch.log(outputs.clamp_min(torch.finfo(outputs.dtype).tiny))
    if output == "log_probabilities":
        return outputs
    raise ValueError(f"output must be one of {OUTPUT_KINDS}, got {output!r}")


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Half-precision outputs are compared in float32: a 1e-3-nat cutoff is below their ulp."""
    if t.is_floating_point() and torch.finfo(t.dtype).bits < 32:
        return t.float()
    return t


def _masked_mean(values: torch.Tensor, mask) -> torch.Tensor:
    """Mean over all leading axes of ``values`` where ``mask`` is 1 (mask shape = values shape)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum()


def check_token_mask(mask, anchor_outputs, name="attention_mask"):
    """The token mask the cost averages with, or None.

    For sequence outputs (N, T, V) the mask must be (N, T) and keep some token. For outputs
    with one row per example (N, V) — a sequence classifier — the mask only served the forward
    pass: the cost averages over examples and None is returned.

    Examples
    --------
    >>> import torch
    >>> from volsk.costs import check_token_mask
    >>> check_token_mask(torch.ones(2, 3), torch.zeros(2, 3, 5)).shape
    torch.Size([2, 3])
    """
    if mask is None or anchor_outputs.ndim <= 2:
        return None
    if tuple(mask.shape) != tuple(anchor_outputs.shape[:-1]):
        raise ValueError(
            f"{name} of shape {tuple(mask.shape)} does not fit the model's outputs of shape "
            f"{tuple(anchor_outputs.shape)}: it must be (N, T) for sequence outputs (N, T, V)"
        )
    if not bool((mask != 0).any()):
        raise ValueError(f"{name} is 0 everywhere: no token is left to compare outputs on")
    return mask


def _position_weights(weight, anchor, mask):
    """Each example/token position's weight in the whole cost (shape anchor.shape[:-1]) when
    the part of the cost bound to ``anchor`` has weight ``weight``: uniform, or over unmasked
    tokens."""
    if mask is not None and anchor.ndim >= 3 and tuple(mask.shape) == tuple(anchor.shape[:-1]):
        m = mask.to(anchor.dtype)
        return weight * m / m.sum()
    shape = anchor.shape[:-1]
    return torch.full(shape, weight / max(1, math.prod(shape)), dtype=anchor.dtype,
                      device=anchor.device)


def resolve_output(cost, anchor_outputs, output, *, from_model=False):
    """What the model's outputs are, checked against what ``cost`` can read.

    Parameters
    ----------
    cost : Cost
    anchor_outputs : torch.Tensor
        The anchor's outputs on (a batch of) X.
    output : str or None
        One of :data:`OUTPUT_KINDS`, or None: decide from the outputs' shape — one output per
        example ((N, 1)) is a binary classifier's logit, anything else logits over the last
        axis.
    from_model : bool, default=False
        ``output`` was guessed, not told (``output="auto"`` for a plain module): warn when the
        outputs look like probabilities (rows non-negative, summing to 1) although read as
        logits.

    Returns
    -------
    str
        The output kind.

    Examples
    --------
    >>> import torch
    >>> from volsk.costs import KL, resolve_output
    >>> resolve_output(KL(), torch.zeros(4, 1), None)
    'binary_logits'
    """
    shape = tuple(anchor_outputs.shape)
    if output is None:
        output = "binary_logits" if len(shape) >= 2 and shape[-1] == 1 else "logits"
        from_model = True
    if output not in OUTPUT_KINDS:
        raise ValueError(f"output must be 'auto' or one of {OUTPUT_KINDS}, got {output!r}")
    if not getattr(cost, "reads_distributions", False):
        return output
    if output in BINARY_KINDS:
        if len(shape) >= 2 and shape[-1] != 1:
            raise ValueError(
                f"output={output!r} needs one output per example (shape (N, 1) or (N,)); the "
                f"model's outputs have shape {shape}. Use output='logits' for (N, C) outputs."
            )
        return output
    if len(shape) < 2:
        raise ValueError(
            f"the model's outputs have shape {shape}: cost={cost.name!r} needs a distribution "
            "per example, outputs of shape (N, C) (or (N, T, C) for sequences). If these are "
            "one logit per example of a binary classifier, pass output='binary_logits' (or "
            "'binary_probabilities' for a sigmoid output)."
        )
    if shape[-1] == 1:
        raise ValueError(
            f"the model's outputs have shape {shape}: a distribution over one class is "
            f"constant, so cost={cost.name!r} would be identically 0. For a binary classifier "
            "with one logit per example pass output='binary_logits' (or "
            "'binary_probabilities' for a sigmoid output)."
        )
    if from_model and output == "logits" and anchor_outputs.is_floating_point():
        # no vocabulary-sized float64 copy: a min, then row sums accumulated in float64
        rows = anchor_outputs.detach()
        if bool(rows.min() >= 0) and bool(
            ((rows.sum(-1, dtype=torch.float64) - 1).abs() < 1e-4).all()
        ):
            warnings.warn(
                "the model's outputs look like probabilities (every row is non-negative and "
                "sums to 1, e.g. it ends in Softmax) but are read as logits; pass "
                "output='probabilities' (or 'log_probabilities') if they are",
                UserWarning,
                stacklevel=4,
            )
    return output


# ------------------------------------------------------------------------------ bound costs


class BoundCost:
    """A cost bound to the anchor's outputs on one data batch: ``cost(outputs) -> scalar``.

    Attributes
    ----------
    spec : Cost
        The specification it was bound from.
    anchor : torch.Tensor
        The anchor's outputs, (N, V) or (N, T, V).
    output : str
        What the outputs are ("logits", "probabilities", "log_probabilities").
    mask : torch.Tensor or None
        The (N, T) token mask the mean runs over.
    """

    def __init__(self, spec, anchor, output, mask):
        self.spec = spec
        self.anchor = anchor
        self.output = output
        self.mask = mask

    def __call__(self, outputs):  # pragma: no cover - interface
        raise NotImplementedError

    def n_terms(self, n_examples: int) -> float:
        """How many terms the cost's mean runs over: unmasked tokens, else examples."""
        if self.mask is not None:
            return float(self.mask.sum())
        return float(n_examples)

    def at_anchor(self, anchor) -> BoundCost:
        """The same cost bound to other anchor outputs (default: this one, unchanged)."""
        return self

    def taylor(self):
        """``(transform, reduce)`` with d²C/dr² at the anchor = reduce(d transform(out)/dr), or
        None when the second derivative needs nested JVPs."""
        return None

    def ggn_factor(self, anchor, weight):
        """``(transform, root)``: this part's GGN is Σ_x J_xᵀ diag(root_x²) J_x with J_x the
        Jacobian of transform(outputs); None when there is no known factorisation."""
        return None

    def hessian_equals_ggn(self) -> bool:
        """Whether the cost's Hessian at the anchor equals its Gauss–Newton matrix."""
        return False

    def output_hessian_diagonal(self, out, weight, *, logits: bool, folded: bool):
        """The closed-form diagonal of ∂²(weight·C)/∂out², or None (then autograd).

        ``logits``: ``out`` are the logits of the compared distribution; ``folded``: a final
        normaliser was split off the model, so ``out`` are not the model's outputs."""
        return None


# One chunk of the KL's vocabulary-sized temporaries: rows (tokens) × V elements take at most
# this many bytes in float64 (half of it in float32). Anchors of up to one chunk are evaluated
# in one piece, exactly as before chunking; larger ones chunk by chunk of rows.
_KL_CHUNK_BYTES = 8 * 2**20


class _BoundKL(BoundCost):
    """KL(p₀ ‖ p) keeping one vocabulary-sized array, the cache, and per-token vectors.

    The cache is the anchor outputs as the model returned them (``KL()``), their
    log-probabilities rounded to ``spec.anchor_dtype``, or only each token's top-k
    log-probabilities and indices plus the remainder's (``spec.top_k``; then ``anchor`` is
    None). Every vocabulary-sized temporary spans at most one chunk of rows.
    """

    def __init__(self, spec, anchor, output, mask):
        super().__init__(spec, anchor, output, mask)
        anchor = anchor.detach()
        top_k, anchor_dtype = spec.top_k, spec.anchor_dtype
        binary = output in BINARY_KINDS
        if binary and (top_k is not None or anchor_dtype is not None):
            raise ValueError(
                f"KL(top_k=..., anchor_dtype=...) shrinks the cache of distributions over many "
                f"classes; output={output!r} has two classes, kept as they are: use KL()"
            )
        n_classes = 2 if binary else anchor.shape[-1]
        self._positions = anchor.shape[:-1] if not binary else anchor.shape[:1]
        self._rows = math.prod(self._positions)
        self._step = max(1, _KL_CHUNK_BYTES // (8 * n_classes))
        self._single = binary or self._rows <= self._step
        self._rounded = anchor_dtype is not None and anchor_dtype != anchor.dtype
        self._index = None  # (positions, k) int32: the top-k classes, with top_k
        if top_k is not None:
            self.anchor = None
            self._cache_output = "logits"  # the cache holds log-probabilities
            self._bind_top_k(anchor, min(top_k, n_classes), anchor_dtype)
            return
        if self._rounded:
            self._cache_output = "logits"
            self._cache = self.anchor = self._chunked_log_probs(anchor, anchor_dtype)
        else:
            self._cache_output = output
            self._cache = anchor
        if output == "logits":
            # KL = lse(z) − lse(z₀) − ⟨p₀, z − z₀⟩ (Σ p₀ = 1): no log_softmax of the perturbed
            # logits (it costs ~5× a logsumexp over a short last axis on the CPU), and exactly
            # 0 at the anchor. The mean over examples (tokens) as weighted sums with per-row
            # weights w; plain elementwise products and sums (not torch.dot, whose batched
            # kernel rounds differently for different numbers of directions).
            self.lse0 = self._over_rows(
                lambda _, z0: torch.logsumexp(_upcast(z0), -1), self._cache, self._cache)
            w = torch.ones_like(self.lse0) if mask is None else mask.to(self.lse0.dtype)
            self.w = w / w.sum()
            if self._cache.ndim == 2 and self._single and not self._rounded:
                self.features_first = self._features_first

    # -- the cache -----------------------------------------------------------------------------
    def _slices(self):
        return [slice(s, min(s + self._step, self._rows)) for s in range(0, self._rows,
                                                                          self._step)]

    def _over_rows(self, fn, outputs, cache):
        """``fn(outputs rows, cache rows)`` → one value per row, chunk by chunk of rows, in the
        positions' shape (one chunk: on the whole arrays as they are)."""
        if self._single:
            return fn(outputs, cache)
        out = outputs.reshape(-1, outputs.shape[-1])
        rows = cache.reshape(-1, cache.shape[-1])
        return torch.cat([fn(out[sl], rows[sl]) for sl in self._slices()]).reshape(
            self._positions)

    def _chunked_log_probs(self, anchor, dtype):
        """Logits of the anchor's distribution rounded to ``dtype``: log p − ⟨p, log p⟩.

        Rounding perturbs each value x_v by about x_v·2^-p, and the KL from the rounded
        distribution is about half the p-weighted variance of these errors; of all shifts of
        log p (all logits of p), the one centred on its p-weighted mean makes Σ_v p_v x_v²
        smallest (lower than raw logits or log p, whose shifts are arbitrary)."""
        cache = torch.empty(anchor.shape, dtype=dtype, device=anchor.device)
        rows, V = cache.view(-1, anchor.shape[-1]), anchor.shape[-1]
        flat = anchor.reshape(-1, V)
        for sl in self._slices():
            log_p = to_log_probs(_upcast(flat[sl]), self.output)
            p = log_p.exp()
            rows[sl] = log_p - torch.special.xlogy(p, p).sum(-1, keepdim=True)
        return cache

    def _bind_top_k(self, anchor, k, dtype):
        V = anchor.shape[-1]
        self._has_rest = k < V
        flat = anchor.reshape(-1, V)
        coarse, index, normalised = [], [], True
        for sl in self._slices():
            log_p = to_log_probs(_upcast(flat[sl]), self.output)
            top, idx = log_p.topk(k, -1)
            normalised &= bool((torch.logsumexp(log_p.double(), -1).abs() < 1e-6).all())
            if self._has_rest:
                rest = torch.logsumexp(log_p.scatter(-1, idx, float("-inf")), -1, keepdim=True)
                top = torch.cat([top, rest], -1)
            coarse.append(top if dtype is None else top.to(dtype))
            index.append(idx.to(torch.int32))
        self._cache = torch.cat(coarse).reshape(*self._positions, -1)  # (positions, k [+ 1])
        self._index = torch.cat(index).reshape(*self._positions, k)
        self._normalised = normalised and not self._rounded

    def _coarse_log_q(self, outputs):
        """log q of the classes {top-k of the anchor, the rest}: (positions, k [+ 1])."""
        V = outputs.shape[-1]

        def rows(out, index):
            log_q = to_log_probs(_upcast(out), self.output)
            idx = index.long()
            top = log_q.gather(-1, idx)
            if not self._has_rest:
                return top
            kept = torch.zeros(idx.shape[:-1] + (V,), dtype=torch.bool, device=idx.device)
            kept.scatter_(-1, idx, True)
            rest = torch.logsumexp(log_q.masked_fill(kept, float("-inf")), -1, keepdim=True)
            return torch.cat([top, rest], -1)

        if self._single:
            return rows(outputs, self._index)
        out, index = outputs.reshape(-1, V), self._index.reshape(-1, self._index.shape[-1])
        return torch.cat([rows(out[sl], index[sl]) for sl in self._slices()]).reshape(
            *self._positions, -1)

    # -- the cost -----------------------------------------------------------------------------
    def __call__(self, outputs):
        if self._index is not None:
            log_p0 = torch.log_softmax(_upcast(self._cache), -1)  # (positions, k [+ 1])
            return _masked_mean(_kl_terms(log_p0, self._coarse_log_q(outputs)), self.mask)
        if self.output == "logits":
            return self._logits_kl(_upcast(outputs))

        def rows(out, z0):
            return _kl_terms(to_log_probs(_upcast(z0), self._cache_output),
                             to_log_probs(_upcast(out), self.output))

        return _masked_mean(self._over_rows(rows, outputs, self._cache), self.mask)

    def _logits_kl(self, z):
        if self._single:
            return _logits_kl_rows(z, self._cache, self.w, self.lse0)
        V = z.shape[-1]
        z, z0 = z.reshape(-1, V), self._cache.reshape(-1, V)
        w, lse0 = self.w.reshape(-1), self.lse0.reshape(-1)
        total = None
        for sl in self._slices():
            part = _logits_kl_rows(z[sl], z0[sl], w[sl], lse0[sl])
            total = part if total is None else total + part
        return total

    def _features_first(self, outputs_t):
        z = _upcast(outputs_t)
        z0 = _upcast(self._cache)
        w_p0 = self.w.unsqueeze(-1) * to_log_probs(z0, "logits").exp()
        shift = ((torch.logsumexp(z, 1) - self.lse0) * self.w).sum(1)
        return shift - ((z - z0.t().contiguous()) * w_p0.t().contiguous()).sum((1, 2))

    def at_anchor(self, anchor):
        return _BoundKL(self.spec, anchor, self.output, self.mask)

    def taylor(self):
        # KL(p₀ ‖ p): value and slope are 0 at the anchor and d²/dr² = Σ_v p₀ (d log p_v/dr)²
        # (because Σ_v d²p_v = 0); p₀ from the cache, chunk by chunk, at each call
        mask = self.mask
        if self._index is not None:

            def reduce_coarse(t):
                p0 = torch.log_softmax(_upcast(self._cache), -1).exp()
                terms = torch.where(p0 > 0, p0 * t * t, torch.zeros_like(t))
                return _masked_mean(terms.sum(-1), mask)

            return self._coarse_log_q, reduce_coarse
        if self.output == "logits":
            # d log p/dr = t − ⟨p, t⟩ for logit tangents t: the curvature is p₀'s variance of t
            rounded = self._rounded

            def variance_rows(t, z0):
                p0 = torch.softmax(_upcast(z0) if rounded else z0, -1)
                mean = (p0 * t).sum(-1, keepdim=True)
                return (p0 * (t - mean) ** 2).sum(-1)

            def reduce_logits(t):
                return _masked_mean(self._over_rows(variance_rows, t, self._cache), mask)

            return (lambda out: out), reduce_logits
        output, cache_output = self.output, self._cache_output

        def square_rows(t, z0):
            p0 = to_log_probs(z0, cache_output).exp()
            return torch.where(p0 > 0, p0 * t * t, torch.zeros_like(t)).sum(-1)

        def reduce(t):
            return _masked_mean(self._over_rows(square_rows, t, self._cache), mask)

        return (lambda out: to_log_probs(out, output)), reduce

    def ggn_factor(self, anchor, weight):
        if self._index is None:
            return _fisher_factor(anchor, weight, self.output, self.mask)
        # the Fisher of the coarse-grained distribution {top-k classes, the rest}
        with torch.no_grad():
            p = self._coarse_log_q(anchor.detach()).to(torch.float64).exp_()
        root = p.mul_(_position_weights(weight, p, self.mask)[..., None]).sqrt_()
        return self._coarse_log_q, root

    def hessian_equals_ggn(self):
        # the KL's gradient vanishes at the anchor; its Hessian is the Fisher there when the
        # model's probabilities sum to one (not so against a rounded anchor distribution)
        if self._rounded:
            return False
        if self._index is not None:
            return self._normalised
        log_p_sums = self._over_rows(
            # in float64: a float32 log-softmax over ~50k classes is ~1e-6 off from rounding
            lambda _, z0: torch.logsumexp(to_log_probs(z0.to(torch.float64), self.output), -1),
            self._cache, self._cache)
        return bool((log_p_sums.abs() < 1e-6).all())

    def output_hessian_diagonal(self, out, weight, *, logits, folded):
        if not logits:
            return None
        diagonal = _fisher_logit_diagonal(out, weight, self.mask)
        if self._index is None or not self._has_rest:
            return diagonal
        # coarse classes G: ∂²C/∂z_v² = q_v − q_v² − p₀(G_v)·(r_v − r_v²), r the softmax within
        # v's class; singletons have r = 1, so only the rest's classes get the correction
        with torch.no_grad():
            idx = self._index.long()
            kept = torch.zeros(out.shape, dtype=torch.bool, device=out.device)
            kept.scatter_(-1, idx, True)
            r = torch.softmax(out.detach().masked_fill(kept, float("-inf")), -1)
            p_rest = torch.softmax(_upcast(self._cache), -1)[..., -1].to(diagonal.dtype)
            scale = _position_weights(weight, diagonal, self.mask) * p_rest
            diagonal -= scale[..., None] * (r - r * r)
        return diagonal


def _logits_kl_rows(z, z0, w, lse0):
    """Σ w (lse(z) − lse0) − Σ w p₀ (z − z₀) over rows of logits z and the anchor's z₀."""
    z0 = _upcast(z0)
    shift = (w * (torch.logsumexp(z, -1) - lse0)).sum()
    w_p0 = to_log_probs(z0, "logits").exp_().mul_(w.unsqueeze(-1))
    return shift - (w_p0 * (z - z0)).sum()


def _kl_terms(log_p0, log_p):
    """Σ_v p₀ (log p₀ − log p) per row; p₀ = 0 entries add 0 even where log p = -inf (0·inf
    would be NaN)."""
    p0 = log_p0.exp()
    return torch.where(p0 > 0, p0 * (log_p0 - log_p), torch.zeros_like(log_p)).sum(-1)


def _fisher_factor(anchor, weight, output, mask):
    """The Fisher of the predictive distribution, Σ_x w_x Σ_c p_c ∇log q_c ∇log q_cᵀ."""
    log_p = to_log_probs(anchor.detach(), output)
    # the factor is the one float64 array of the outputs' size: built in place
    root = log_p.to(torch.float64, copy=log_p.data_ptr() == anchor.data_ptr())
    root.exp_().mul_(_position_weights(weight, root, mask)[..., None]).sqrt_()
    return (lambda out: to_log_probs(out, output)), root


def _fisher_logit_diagonal(logits, weight, mask):
    """diag ∂²C/∂z² = w (q − q²) for the softmax's logits z, w each position's weight."""
    q = torch.softmax(logits.detach(), dim=-1)
    q.sub_(q * q)  # one array besides the result
    return q.mul_(_position_weights(weight, q, mask)[..., None])


class _BoundCrossEntropy(BoundCost):
    def __init__(self, spec, anchor, output, mask, y):
        super().__init__(spec, anchor, output, mask)
        if y is None:
            raise ValueError(
                'cost="cross_entropy" needs labels: call fit(model, X, y) with y the class '
                "indices."
            )
        if y.is_floating_point():
            if not bool((y == y.round()).all()):
                raise ValueError("y must hold integer class indices for cost='cross_entropy'")
        y = y.long()
        rows = anchor.shape if output in BINARY_KINDS and anchor.shape[-1:] != (1,) else (
            anchor.shape[:-1])
        if tuple(y.shape) != tuple(rows):
            raise ValueError(
                f"y of shape {tuple(y.shape)} does not fit the model's outputs of shape "
                f"{tuple(anchor.shape)}: cost='cross_entropy' needs one class index per "
                "example (per token for sequence outputs)"
            )
        keep = y != IGNORE_INDEX
        n_classes = 2 if output in BINARY_KINDS else anchor.shape[-1]
        if bool(((y[keep] < 0) | (y[keep] >= n_classes)).any()):
            raise ValueError(f"y must hold class indices in [0, {n_classes}) (or -100 to ignore)")
        self.weights = keep if mask is None else keep & (mask != 0)
        if not bool(self.weights.any()):
            raise ValueError("every label is ignored (y = -100 or masked): nothing to compare")
        self.index = torch.where(keep, y, torch.zeros_like(y)).unsqueeze(-1)
        self.base = self._loss(anchor).detach()

    def _loss(self, outputs):
        log_p = to_log_probs(_upcast(outputs), self.output)
        nll = -log_p.gather(-1, self.index).squeeze(-1)
        return _masked_mean(nll, self.weights)

    def __call__(self, outputs):
        return self._loss(outputs) - self.base

    def n_terms(self, n_examples):
        # the mean runs over the labels that are kept (not -100, not masked)
        return float(self.weights.sum())

    def ggn_factor(self, anchor, weight):
        return _fisher_factor(anchor, weight, self.output, self.mask)

    def output_hessian_diagonal(self, out, weight, *, logits, folded):
        return _fisher_logit_diagonal(out, weight, self.mask) if logits else None


class _BoundMSE(BoundCost):
    def __init__(self, spec, anchor, output, mask):
        super().__init__(spec, anchor, output, mask)
        self.anchor_up = _upcast(anchor).detach()
        if mask is None and self.anchor_up.ndim == 2:
            self.anchor_t = self.anchor_up.t().contiguous()
            self.features_first = self._features_first

    def __call__(self, outputs):
        outputs = _upcast(outputs)
        if self.mask is None:
            return torch.nn.functional.mse_loss(outputs, self.anchor_up)
        return _masked_mean((outputs - self.anchor_up).pow(2).mean(-1), self.mask)

    def _features_first(self, outputs_t):
        return (_upcast(outputs_t) - self.anchor_t).pow(2).mean((1, 2))

    def at_anchor(self, anchor):
        return _BoundMSE(self.spec, anchor, self.output, self.mask)

    def taylor(self):
        # d²/dr² mse = 2·mean (d f/dr)², the residual term vanishing at the anchor
        mask = self.mask
        return (lambda out: out), (lambda t: 2.0 * _masked_mean(t * t, _unit_mask(mask, t)))

    def ggn_factor(self, anchor, weight):
        if self.mask is None:
            root = torch.full(anchor.shape, math.sqrt(2.0 * weight / anchor.numel()),
                              dtype=torch.float64, device=anchor.device)
        else:
            # mean over unmasked tokens and all units
            per = _position_weights(weight, anchor, self.mask).to(torch.float64)
            root = (2.0 * per[..., None] / anchor.shape[-1]).expand(anchor.shape).sqrt()
        return (lambda out: out), root

    def hessian_equals_ggn(self):
        return True  # the residual term vanishes where outputs = anchor outputs

    def output_hessian_diagonal(self, out, weight, *, logits, folded):
        if folded:
            return None
        if self.mask is None:
            return torch.full_like(out, 2.0 * weight / out.numel())
        per = _position_weights(weight, out, self.mask)
        return (2.0 * per[..., None] / out.shape[-1]).expand(out.shape).clone()


def _unit_mask(mask, t):
    """A token mask broadcast over the output units (None: no mask)."""
    return None if mask is None else mask[..., None].expand(t.shape)


def _callable_arity(fn):
    """(positional parameters accepted, required; accepts a ``mask`` keyword)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: assume (outputs, anchor[, y])
        return 3, 2, False
    accepted = required = 0
    for p in sig.parameters.values():
        if p.kind == p.VAR_POSITIONAL:
            accepted = 3
        elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            accepted += 1
            required += p.default is p.empty
    takes_mask = "mask" in sig.parameters or any(
        p.kind == p.VAR_KEYWORD for p in sig.parameters.values()
    )
    return accepted, required, takes_mask


class _BoundCallable(BoundCost):
    def __init__(self, spec, anchor, output, mask, y):
        super().__init__(spec, anchor, output, mask)
        fn = spec.fn
        accepted, required, takes_mask = _callable_arity(fn)
        if accepted < 2:
            raise TypeError("a cost callable must take (outputs, anchor_outputs[, y])")
        if required >= 3 and y is None:
            raise ValueError("the cost callable takes labels y, but fit got y=None: pass y")
        anchor = anchor.detach()
        self.args = (anchor, y) if (y is not None and accepted >= 3) else (anchor,)
        self.kwargs = {"mask": mask} if (mask is not None and takes_mask) else {}

    def __call__(self, outputs):
        value = self.spec.fn(outputs, *self.args, **self.kwargs)
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"the cost callable returned {type(value).__name__}; it must return a scalar "
                "torch.Tensor computed with torch operations (it runs under torch.func.vmap)"
            )
        if value.ndim != 0:
            raise ValueError(
                f"the cost callable returned a tensor of shape {tuple(value.shape)}; it must "
                "return a scalar (reduce over examples, e.g. with .mean())"
            )
        return value


# ----------------------------------------------------------------------------- specifications


class Cost:
    """A cost specification; :meth:`bind` ties it to the anchor's outputs on a data batch."""

    name: str = "cost"
    reads_distributions = False  # whether outputs must be a distribution per example
    uses_labels = False  # whether y enters the cost (a scorer passes y only then)

    def bind(self, anchor_outputs, *, output="logits", y=None, mask=None) -> BoundCost:
        """The cost bound to ``anchor_outputs`` (and labels ``y``, token ``mask``)."""
        raise NotImplementedError  # pragma: no cover - interface

    def __repr__(self):
        return f"{type(self).__name__}()"


class KL(Cost):
    """KL(p_anchor ‖ p_θ') averaged over examples (and unmasked tokens): the paper's cost.

    Outputs are read as a distribution per example (or token): logits, probabilities or
    log-probabilities over the last axis, or a binary classifier's single logit/probability.

    The bound cost keeps one array of the anchor outputs' size (the cache) and per-token
    vectors; it evaluates the KL chunk by chunk of tokens, so that no temporary spans more
    than one chunk of (tokens × vocabulary) values. Two options shrink the cache of a
    language model's (tokens × vocabulary) outputs further, each changing the cost a little.

    Parameters
    ----------
    anchor_dtype : torch.dtype or str, optional
        Cache the anchor's log-probabilities in this floating dtype (``torch.bfloat16`` or
        ``"bfloat16"`` halves a float32 cache). The KL is then measured from the rounded anchor
        distribution: it is not exactly 0 at the anchor (about the squared rounding error of
        the likely classes' log-probabilities), and the radii shrink accordingly. Rounding log
        p (close to 0 where p is large) disturbs the KL far less than rounding the logits.
        None (default): the outputs as the model returns them.
    top_k : int, optional
        Keep, per token, only the anchor's k most likely classes and the remaining mass, and
        compare the coarse-grained distributions over {the k classes, the rest}. By the
        data-processing inequality this KL is at most the full one: radii are at least as long
        and the estimated volume is biased upwards; it equals the full KL when k is the number
        of classes. The cache takes tokens × (k + 1) values and k int32 indices.

    Examples
    --------
    >>> import torch
    >>> from volsk.costs import KL
    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    >>> float(KL().bind(logits)(logits))
    0.0
    >>> gen = torch.Generator().manual_seed(0)
    >>> anchor = torch.randn(4, 16, 1000, generator=gen)  # 4 sequences × 16 tokens × 1000
    >>> moved = anchor + 0.1 * torch.randn(4, 16, 1000, generator=gen)
    >>> full = float(KL().bind(anchor)(moved))
    >>> coarse = float(KL(top_k=100).bind(anchor)(moved))
    >>> coarse <= full
    True
    >>> rounded = float(KL(anchor_dtype=torch.bfloat16).bind(anchor)(moved))
    >>> abs(rounded - full) < 0.01 * full
    True
    """

    name = "kl"
    reads_distributions = True

    def __init__(self, *, anchor_dtype=None, top_k=None):
        self.anchor_dtype = _check_anchor_dtype(anchor_dtype)
        self.top_k = _check_top_k(top_k)

    def bind(self, anchor_outputs, *, output="logits", y=None, mask=None):
        return _BoundKL(self, anchor_outputs, output, check_token_mask(mask, anchor_outputs))

    def __repr__(self):
        options = [f"{name}={value!r}" for name, value in
                   (("anchor_dtype", self.anchor_dtype), ("top_k", self.top_k))
                   if value is not None]
        return f"KL({', '.join(options)})"


def _check_anchor_dtype(anchor_dtype):
    if anchor_dtype is None:
        return None
    dtype = getattr(torch, anchor_dtype, None) if isinstance(anchor_dtype, str) else (
        anchor_dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"anchor_dtype must be None (cache the anchor outputs as the model returns them) "
            f"or a floating torch dtype such as torch.bfloat16, got {anchor_dtype!r}"
        )
    return dtype


def _check_top_k(top_k):
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
        raise ValueError(
            f"top_k must be None (compare the full distributions) or a positive int, the "
            f"number of each token's most likely classes kept, got {top_k!r}"
        )
    return int(top_k)


class CrossEntropy(Cost):
    """Mean cross-entropy against labels y minus the anchor's (negative where it decreases).

    Labels equal to -100 are ignored (as in :class:`torch.nn.CrossEntropyLoss`), and so are
    tokens whose mask is 0.

    Examples
    --------
    >>> import torch
    >>> from volsk.costs import CrossEntropy
    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    >>> cost = CrossEntropy().bind(logits, y=torch.tensor([0, 0]))
    >>> round(float(cost(torch.zeros(2, 2))), 4)  # uniform predictions lower this loss
    -0.0269
    """

    name = "cross_entropy"
    reads_distributions = True
    uses_labels = True

    def bind(self, anchor_outputs, *, output="logits", y=None, mask=None):
        mask = check_token_mask(mask, anchor_outputs)
        return _BoundCrossEntropy(self, anchor_outputs, output, mask, y)


class MSE(Cost):
    """``torch.nn.functional.mse_loss(outputs, anchor_outputs)``: mean over examples and units.

    With a token mask (N, T), the mean runs over unmasked tokens (and all units).

    Examples
    --------
    >>> import torch
    >>> from volsk.costs import MSE
    >>> float(MSE().bind(torch.zeros(2, 2))(torch.ones(2, 2)))
    1.0
    """

    name = "mse"

    def bind(self, anchor_outputs, *, output="logits", y=None, mask=None):
        return _BoundMSE(self, anchor_outputs, output, check_token_mask(mask, anchor_outputs))


class CallableCost(Cost):
    """A user callable ``fn(outputs, anchor_outputs[, y][, mask=...]) -> scalar tensor``.

    ``y`` is passed as a third argument when ``fn`` accepts one and labels are given, ``mask=``
    when ``fn`` has a ``mask`` parameter and a token mask is given. It must be written with
    torch operations (it runs under :func:`torch.func.vmap`).

    Examples
    --------
    >>> import torch
    >>> from volsk.costs import CallableCost
    >>> cost = CallableCost(lambda out, anchor: (out - anchor).abs().mean())
    >>> float(cost.bind(torch.zeros(2, 2))(torch.ones(2, 2)))
    1.0
    """

    name = "callable"

    def __init__(self, fn):
        self.fn = fn

    @property
    def uses_labels(self) -> bool:
        """Whether ``fn`` requires labels (a third positional parameter without default)."""
        return _callable_arity(self.fn)[1] >= 3

    def bind(self, anchor_outputs, *, output="logits", y=None, mask=None):
        mask = check_token_mask(mask, anchor_outputs)
        return _BoundCallable(self, anchor_outputs, output, mask, y)

    def __repr__(self):
        return f"CallableCost({getattr(self.fn, '__qualname__', self.fn)!r})"


_BY_NAME = {"kl": KL, "cross_entropy": CrossEntropy, "mse": MSE}


def resolve_cost(cost) -> Cost:
    """The cost specification for the estimator's ``cost`` parameter.

    Examples
    --------
    >>> from volsk.costs import resolve_cost
    >>> resolve_cost("kl"), resolve_cost("mse")
    (KL(), MSE())
    """
    if isinstance(cost, Cost):
        return cost
    if isinstance(cost, str):
        if cost in _BY_NAME:
            return _BY_NAME[cost]()
        raise ValueError(f"cost must be one of {COSTS} or a callable, got {cost!r}")
    if callable(cost):
        return CallableCost(cost)
    raise ValueError(f"cost must be one of {COSTS} or a callable, got {cost!r}")


def make_cost(cost, anchor_outputs, *, output="logits", y=None, mask=None) -> BoundCost:
    """Bind a cost specification to the anchor's outputs.

    Parameters
    ----------
    cost : {"kl", "cross_entropy", "mse"}, callable or a :class:`Cost`
        "kl": KL(anchor ‖ perturbed) averaged over examples (and unmasked tokens); "mse": the
        mean squared difference from the anchor's outputs (over unmasked tokens with a mask);
        "cross_entropy": the mean cross-entropy against ``y`` minus the anchor's (negative
        where the loss decreases; labels -100 are ignored). A callable is called as
        ``cost(outputs, anchor_outputs)``, with ``y`` as a third argument when it accepts one
        and ``y`` is given, and with ``mask=`` when it has a ``mask`` parameter and a token
        mask is given; it must return a scalar tensor built with torch operations (it is
        evaluated under :func:`torch.func.vmap`).
    anchor_outputs : torch.Tensor
        (N, V), or (N, T, V) for sequence models.
    output : {"logits", "probabilities", "log_probabilities"}
    y : torch.Tensor, optional
        Class indices, (N,) or (N, T).
    mask : torch.Tensor, optional
        (N, T) token mask for sequence outputs (N, T, V): tokens where it is 0 are ignored.

    Returns
    -------
    BoundCost
        ``outputs -> scalar tensor``.

    Examples
    --------
    >>> import torch
    >>> from volsk.costs import make_cost
    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    >>> kl = make_cost("kl", logits)
    >>> float(kl(logits))
    0.0
    >>> ce = make_cost("cross_entropy", logits, y=torch.tensor([0, 0]))
    >>> round(float(ce(torch.zeros(2, 2))), 4)  # uniform predictions lower this loss
    -0.0269
    """
    return resolve_cost(cost).bind(anchor_outputs, output=output, y=y, mask=mask)
