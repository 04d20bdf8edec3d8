"""A tiny GPT-NeoX trained on the standard library's source text, with checkpoints to measure.

The paper's language-model experiment (Scherlis & Belrose, *"Estimating the Probability of
Sampling a Trained Neural Network at Random"*: Pythia across training checkpoints) in
miniature, on data that ships with every Python and a model that is built from a config —
nothing is downloaded:

* :func:`load_stdlib_corpus` -- the ``.py`` files of the standard library as byte-level
  token sequences, split by file into training and held-out sequences.
* :func:`make_tiny_gpt_neox` -- a ``transformers`` GPT-NeoX from a config, seeded.
* :func:`train_language_model` -- AdamW with a cosine schedule on the CPU, keeping the
  weights at chosen steps (:class:`LanguageRun`).
* :func:`volume_along_training` -- the local volume of every checkpoint (the paper's
  Figure 4: it falls as the model learns), along the same directions for every checkpoint.
* :func:`language_demo` -- all of it, printed as one table (``volsk demo --language``).

Tokens are bytes (vocabulary 256): the vocabulary is fixed, independent of the corpus and of
the Python version, so there is nothing to build or store, and every text round-trips. The
input-embedding rows of bytes that never occur in the measured sequences cannot change the
outputs there: volsk finds these parameters flat and integrates them out under a Gaussian
prior (they are listed in ``flat_parameters_``).

Everything is deterministic given the seeds; ``transformers`` is needed for the model (an
optional dependency of volsk). Torch's thread count is the caller's: training and estimates
use whatever ``torch.set_num_threads`` says (one thread is fastest for models this small on
a shared CPU).
"""

from __future__ import annotations

import functools
import math
import os
import sys
import sysconfig
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from sklearn.base import clone

from .. import Checkpoint
from .._checks import check_int
from ..estimator import LocalVolumeEstimator
from ..priors import InitPriorWarning

__all__ = [
    "MAX_BYTES",
    "SEQ_LEN",
    "VOCAB_SIZE",
    "LanguageRun",
    "TextSplits",
    "default_checkpoint_steps",
    "language_demo",
    "load_stdlib_corpus",
    "make_tiny_gpt_neox",
    "sequence_loss",
    "train_language_model",
    "volume_along_training",
]

#: Byte-level vocabulary: every token is one byte of the UTF-8 encoded text.
VOCAB_SIZE: int = 256
#: Default sequence length T, in bytes.
SEQ_LEN: int = 64
#: Default cap on the bytes read from the standard library (its ``.py`` files hold ~5 MB).
MAX_BYTES: int = 2_000_000

#: Estimator settings of :func:`volume_along_training` unless overridden.
_VOLUME_DEFAULTS = {
    "cutoff": 1e-2,
    "measure": "gaussian",
    "sigma": "init",
    "n_samples": 20,
    "random_state": 0,
}


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True, eq=False)
class TextSplits:
    """Training and held-out byte sequences of one length, from disjoint sets of files.

    Attributes
    ----------
    train_ids : torch.Tensor
        ``int64`` tensor of shape ``(n_train, seq_len)`` with values in ``[0, 256)``.
    heldout_ids : torch.Tensor
        ``int64`` tensor of shape ``(n_heldout, seq_len)``, from files none of whose text is
        in ``train_ids``.
    train_files, heldout_files : tuple of str
        The file names each split was cut from, in name order.
    n_bytes : int
        Bytes read in all (before cutting into sequences).
    """

    train_ids: torch.Tensor
    heldout_ids: torch.Tensor
    train_files: tuple[str, ...]
    heldout_files: tuple[str, ...]
    n_bytes: int

    @property
    def seq_len(self) -> int:
        """Sequence length T, in bytes."""
        return int(self.train_ids.shape[1])

    @property
    def n_train(self) -> int:
        """Number of training sequences."""
        return int(self.train_ids.shape[0])

    @property
    def n_heldout(self) -> int:
        """Number of held-out sequences."""
        return int(self.heldout_ids.shape[0])

    def heldout_subset(self, n: int) -> torch.Tensor:
        """``n`` held-out sequences evenly spaced over the split (deterministic).

        Parameters
        ----------
        n : int
            Number of sequences, ``1 <= n <= n_heldout``.

        Returns
        -------
        torch.Tensor
            ``int64``, shape ``(n, seq_len)``: rows ``round(linspace(0, n_heldout - 1, n))``,
            so they come from across the held-out files rather than from the first one.
        """
        return _spread(self.heldout_ids, n, "n")

    def train_subset(self, n: int) -> torch.Tensor:
        """``n`` training sequences evenly spaced over the split (deterministic).

        Parameters
        ----------
        n : int
            Number of sequences, ``1 <= n <= n_train``.

        Returns
        -------
        torch.Tensor
            ``int64``, shape ``(n, seq_len)``; see :meth:`heldout_subset`.
        """
        return _spread(self.train_ids, n, "n")

    def __repr__(self) -> str:
        return (
            f"TextSplits(n_train={self.n_train}, n_heldout={self.n_heldout}, "
            f"seq_len={self.seq_len}, train_files={len(self.train_files)}, "
            f"heldout_files={len(self.heldout_files)}, n_bytes={self.n_bytes})"
        )


def load_stdlib_corpus(
    seq_len: int = SEQ_LEN,
    *,
    max_bytes: int = MAX_BYTES,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    directory: str | os.PathLike | None = None,
) -> TextSplits:
    """The standard library's own source text as byte sequences, split by file.

    Recipe, exactly:

    1. The files are the names ending in ``.py`` directly in ``directory`` (default
       ``sysconfig.get_paths()["stdlib"]``, not its subpackages), sorted by name.
    2. Each file is read as text (UTF-8, ``errors="replace"``, universal newlines) and
       encoded back to UTF-8 bytes. Files are taken in name order until ``max_bytes`` bytes
       are read; the file that crosses the cap is cut there and later files are not read.
    3. Held-out files: a permutation of the files by ``numpy.random.default_rng(seed)`` is
       walked in order, each file moving to the held-out split until the held-out bytes
       reach ``heldout_fraction`` of the total; the other files are the training split.
       No file contributes to both.
    4. Each file's bytes are cut into consecutive, non-overlapping sequences of ``seq_len``
       bytes (its last ``< seq_len`` bytes are dropped), so no sequence spans two files.
       Rows are in file-name order, then position.

    The split is by file: held-out sequences are modules the model never read, not other
    parts of the modules it did.

    Parameters
    ----------
    seq_len : int, default 64
        Sequence length T in bytes, ``>= 2`` (the model predicts bytes 2..T from their
        prefixes).
    max_bytes : int, default 2_000_000
        Cap on the bytes read, ``>= 2 * seq_len``; it bounds the time to read and hold the
        corpus. The standard library's ``.py`` files hold about 5 MB.
    heldout_fraction : float, default 0.1
        Target fraction of the bytes in held-out files, in ``(0, 1)``.
    seed : int, default 0
        Seed of the permutation that chooses the held-out files.
    directory : str or os.PathLike, optional
        Where to read ``.py`` files from; default: the standard library of the running Python.

    Returns
    -------
    TextSplits
        The training and held-out sequences.

    Raises
    ------
    ValueError
        If an argument is out of range, or the files are too few or too short to give both
        splits at least one sequence.

    Examples
    --------
    >>> from volsk.experiments.language import load_stdlib_corpus
    >>> splits = load_stdlib_corpus(max_bytes=200_000)
    >>> splits.seq_len, splits.train_ids.dtype
    (64, torch.int64)
    >>> 0 <= int(splits.train_ids.min()) and int(splits.train_ids.max()) < 256
    True
    >>> set(splits.train_files).isdisjoint(splits.heldout_files)
    True
    >>> bytes(splits.heldout_subset(1)[0].tolist()).decode("utf-8", "replace")[:1] != ""
    True
    """
    seq_len = check_int("seq_len", seq_len, low=2)
    max_bytes = check_int("max_bytes", max_bytes, low=2 * seq_len)
    if isinstance(heldout_fraction, bool) or not (
        isinstance(heldout_fraction, int | float | np.floating) and 0 < heldout_fraction < 1
    ):
        raise ValueError(f"heldout_fraction must be a number in (0, 1), got {heldout_fraction!r}")
    directory = sysconfig.get_paths()["stdlib"] if directory is None else os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"directory must be an existing directory, got {directory!r}")

    names = sorted(
        name for name in os.listdir(directory)
        if name.endswith(".py") and os.path.isfile(os.path.join(directory, name))
    )
    texts: list[bytes] = []
    total = 0
    for name in names:
        if total >= max_bytes:
            break
        with open(os.path.join(directory, name), encoding="utf-8", errors="replace") as handle:
            data = handle.read().encode("utf-8")[: max_bytes - total]
        texts.append(data)
        total += len(data)
    names = names[: len(texts)]
    if len(texts) < 2:
        raise ValueError(
            f"directory {directory!r} gave {len(texts)} .py file(s) within max_bytes="
            f"{max_bytes}; a split by file needs at least 2 (raise max_bytes or pick another "
            "directory)"
        )

    heldout = set()
    heldout_bytes = 0
    for i in np.random.default_rng(seed).permutation(len(texts)):
        if heldout_bytes >= heldout_fraction * total:
            break
        heldout.add(int(i))
        heldout_bytes += len(texts[i])
    if len(heldout) == len(texts):  # a tiny corpus: keep at least one training file
        heldout.discard(max(heldout, key=lambda i: len(texts[i])))

    def cut(indices: list[int]) -> torch.Tensor:
        rows = [
            np.frombuffer(texts[i], dtype=np.uint8)[: len(texts[i]) // seq_len * seq_len]
            for i in indices
        ]
        flat = np.concatenate(rows) if rows else np.zeros(0, dtype=np.uint8)
        return torch.from_numpy(flat.astype(np.int64)).view(-1, seq_len)

    train_idx = [i for i in range(len(texts)) if i not in heldout]
    heldout_idx = sorted(heldout)
    splits = TextSplits(
        train_ids=cut(train_idx),
        heldout_ids=cut(heldout_idx),
        train_files=tuple(names[i] for i in train_idx),
        heldout_files=tuple(names[i] for i in heldout_idx),
        n_bytes=total,
    )
    if splits.n_train == 0 or splits.n_heldout == 0:
        raise ValueError(
            f"the split has {splits.n_train} training and {splits.n_heldout} held-out "
            f"sequences of {seq_len} bytes; both need at least one (raise max_bytes, lower "
            "seq_len or change heldout_fraction)"
        )
    return splits


# ---------------------------------------------------------------------------- model


def make_tiny_gpt_neox(
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    *,
    intermediate_size: int | None = None,
    max_positions: int = SEQ_LEN,
    vocab_size: int = VOCAB_SIZE,
    seed: int = 0,
):
    """A small ``transformers.GPTNeoXForCausalLM`` built from a config (nothing downloaded).

    The config is GPT-NeoX's (Pythia's architecture: rotary position embedding on a quarter
    of each head, parallel attention and MLP residual branches, untied input and output
    embeddings) with the sizes given, dropout 0 and no key/value cache. Weights get Hugging
    Face's initialisation (``N(0, 0.02²)`` for linear and embedding weights, zero biases,
    LayerNorm weights 1), drawn from torch's global generator seeded with ``seed`` inside
    ``torch.random.fork_rng``: the caller's random state is left as it was.

    Parameters
    ----------
    hidden_size : int, default 64
        Width of the residual stream; a multiple of ``num_heads``.
    num_layers : int, default 2
        Transformer blocks.
    num_heads : int, default 4
        Attention heads per block.
    intermediate_size : int, optional
        Width of the MLP; default ``4 * hidden_size``.
    max_positions : int, default 64
        Longest sequence the model accepts.
    vocab_size : int, default 256
        Vocabulary size (256: bytes).
    seed : int, default 0
        Seed of the initialisation.

    Returns
    -------
    transformers.GPTNeoXForCausalLM
        The freshly initialised model, in training mode; its output has ``.logits`` of shape
        ``(N, T, vocab_size)``.

    Raises
    ------
    ValueError
        If a size is invalid.
    ImportError
        If ``transformers`` is not installed.

    Examples
    --------
    >>> import torch
    >>> from volsk.experiments.language import make_tiny_gpt_neox
    >>> model = make_tiny_gpt_neox()
    >>> sum(p.numel() for p in model.parameters())
    132864
    >>> model(input_ids=torch.zeros(2, 64, dtype=torch.long)).logits.shape
    torch.Size([2, 64, 256])
    >>> again = make_tiny_gpt_neox(seed=0)
    >>> all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    True
    """
    hidden_size = check_int("hidden_size", hidden_size, low=1)
    num_layers = check_int("num_layers", num_layers, low=1)
    num_heads = check_int("num_heads", num_heads, low=1)
    if hidden_size % num_heads:
        raise ValueError(
            f"hidden_size must be a multiple of num_heads, got {hidden_size} and {num_heads}"
        )
    intermediate_size = (
        4 * hidden_size if intermediate_size is None
        else check_int("intermediate_size", intermediate_size, low=1)
    )
    max_positions = check_int("max_positions", max_positions, low=1)
    vocab_size = check_int("vocab_size", vocab_size, low=2)
    try:  # optional dependency, and seconds to import
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    except ImportError as exc:  # pragma: no cover - transformers is in the test extras
        raise ImportError(
            "the language experiment needs transformers: pip install transformers"
        ) from exc

    config = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_positions,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cache=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return GPTNeoXForCausalLM(config)


def sequence_loss(model, input_ids: torch.Tensor) -> float:
    """Mean next-byte cross-entropy of ``model`` on ``input_ids``, in nats per byte.

    Every position but the first is predicted from its prefix; the mean is over those
    ``N * (T - 1)`` predictions. Evaluated in eval mode under ``torch.no_grad()``; the
    model's training / eval mode is restored afterwards.

    Parameters
    ----------
    model : transformers.GPTNeoXForCausalLM
        Or any module whose output has ``.logits`` of shape ``(N, T, V)``.
    input_ids : torch.Tensor
        ``int64`` of shape ``(N, T)``.

    Returns
    -------
    float
        Nats per byte (``/ math.log(2)`` for bits per byte; ``log(256) ≈ 5.55`` for a uniform
        guess).

    Examples
    --------
    >>> import math, torch
    >>> from volsk.experiments.language import make_tiny_gpt_neox, sequence_loss
    >>> ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    >>> abs(sequence_loss(make_tiny_gpt_neox(), ids) - math.log(256)) < 0.05
    True
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1)
            )
    finally:
        model.train(was_training)
    return float(loss)


# ------------------------------------------------------------------------- training


@dataclass(eq=False)
class LanguageRun:
    """Result of :func:`train_language_model`.

    Attributes
    ----------
    model : transformers.GPTNeoXForCausalLM
        The trained model (in eval mode), after the last step.
    optimizer : torch.optim.AdamW
        Its optimizer, with its final state.
    splits : TextSplits
        The data it was trained and measured on.
    config : dict
        Keyword arguments of :func:`make_tiny_gpt_neox` that rebuild the architecture.
    checkpoints : list of (int, dict)
        ``(step, state_dict)`` at each checkpoint step, in step order; step 0 is the
        initialisation. The state dicts are copies, on the CPU.
    history : list of dict
        One dict per checkpoint: ``step``, ``lr`` (learning rate of the next step),
        ``train_loss`` and ``heldout_loss`` (:func:`sequence_loss` on the run's evaluation
        sequences, nats per byte) and ``time`` (seconds since training started).
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    splits: TextSplits
    config: dict
    checkpoints: list[tuple[int, dict]] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)

    @property
    def steps(self) -> list[int]:
        """The checkpoint steps."""
        return [step for step, _ in self.checkpoints]

    def factory(self):
        """A zero-argument callable building a fresh model of this architecture (picklable)."""
        return functools.partial(make_tiny_gpt_neox, **self.config)

    def checkpoint_models(self) -> dict:
        """Every checkpoint as a model: ``{step: model}``, each a fresh module in eval mode."""
        build = self.factory()
        models = {}
        for step, state in self.checkpoints:
            model = build()
            model.load_state_dict(state)
            models[step] = model.eval()
        return models

    def save_checkpoints(self, directory: str | os.PathLike) -> dict:
        """Write every checkpoint with ``torch.save``; return ``{step: volsk.Checkpoint}``.

        Each file ``step_{step:06d}.pt`` holds ``{"model": state_dict, "step": step}``; the
        returned :class:`volsk.Checkpoint` objects load it into a fresh model inside
        whichever worker fits it, so ``volsk.sweep(run.save_checkpoints(d), X, ...)`` never
        holds every model in memory.

        Parameters
        ----------
        directory : str or os.PathLike
            An existing directory.

        Returns
        -------
        dict
            ``{step: Checkpoint(path, factory, key="model")}`` in step order.
        """
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise ValueError(f"directory must be an existing directory, got {directory!r}")
        sources = {}
        for step, state in self.checkpoints:
            path = os.path.join(directory, f"step_{step:06d}.pt")
            torch.save({"model": state, "step": step}, path)
            sources[step] = Checkpoint(path, self.factory(), key="model")
        return sources

    def __repr__(self) -> str:
        last = self.history[-1] if self.history else {}
        return (
            f"LanguageRun(steps={self.steps}, "
            f"heldout_loss={last.get('heldout_loss', float('nan')):.4f}, splits={self.splits!r})"
        )


def default_checkpoint_steps(steps: int) -> list[int]:
    """Checkpoint steps spaced geometrically, as Pythia's are early in training.

    Step 0 (the initialisation) and ``round(steps / 2**j)`` for ``j = 4, 3, 2, 1, 0``,
    without repeats: most of the change in a network's volume happens early.

    Parameters
    ----------
    steps : int
        Training steps, ``>= 1``.

    Returns
    -------
    list of int
        Increasing steps from 0 to ``steps``.

    Examples
    --------
    >>> from volsk.experiments.language import default_checkpoint_steps
    >>> default_checkpoint_steps(300)
    [0, 19, 38, 75, 150, 300]
    >>> default_checkpoint_steps(3)
    [0, 1, 2, 3]
    """
    steps = check_int("steps", steps, low=1)
    return sorted({0, *(int(round(steps / 2**j)) for j in range(5))})


def train_language_model(
    splits: TextSplits | None = None,
    *,
    steps: int = 300,
    checkpoint_steps=None,
    batch_size: int = 32,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    n_eval: int = 32,
) -> LanguageRun:
    """Train :func:`make_tiny_gpt_neox` on byte sequences, keeping checkpoints.

    Recipe:

    * Data: ``splits`` (default ``load_stdlib_corpus()``: fixed, it does not depend on
      ``seed``).
    * Model: ``make_tiny_gpt_neox(hidden_size, num_layers, num_heads,
      max_positions=splits.seq_len, seed=seed)``, float32.
    * Optimizer: ``torch.optim.AdamW(lr=lr, weight_decay=weight_decay)``; the learning rate
      follows ``lr * 0.5 * (1 + cos(pi * t / steps))`` at step ``t = 0 .. steps - 1``.
    * Batches: ``batch_size`` training sequences per step, taken in order from a random
      permutation of all training sequences (``torch.randperm`` from a ``torch.Generator``
      seeded with ``seed``), redrawn when it runs out.
    * Loss: mean next-byte cross-entropy (``model(input_ids=x, labels=x).loss``).
    * At every checkpoint step ``s`` (after ``s`` updates; 0 is the initialisation) the
      weights are copied into ``checkpoints`` and the losses on ``n_eval`` training and
      ``n_eval`` held-out sequences (:meth:`TextSplits.train_subset`,
      :meth:`TextSplits.heldout_subset`) go into ``history``.

    Parameters
    ----------
    splits : TextSplits, optional
        Data; default ``load_stdlib_corpus()``.
    steps : int, default 300
        Optimizer steps, ``>= 1``.
    checkpoint_steps : iterable of int, optional
        Steps in ``[0, steps]`` at which to keep the weights; default
        :func:`default_checkpoint_steps` ``(steps)``.
    batch_size : int, default 32
        Sequences per step.
    lr : float, default 3e-3
        Peak learning rate, ``> 0``.
    weight_decay : float, default 0.0
        AdamW's decoupled weight decay, ``>= 0``.
    seed : int, default 0
        Seed of the initialisation and of the batch order.
    hidden_size, num_layers, num_heads : int
        Architecture; see :func:`make_tiny_gpt_neox`.
    n_eval : int, default 32
        Sequences of each split the checkpoint losses are measured on.

    Returns
    -------
    LanguageRun
        The trained model (in eval mode), its optimizer, the data, the checkpoints and their
        losses.

    Raises
    ------
    ValueError
        If an argument is out of range.

    Examples
    --------
    >>> from volsk.experiments.language import load_stdlib_corpus, train_language_model
    >>> splits = load_stdlib_corpus(32, max_bytes=100_000)
    >>> run = train_language_model(splits, steps=20, hidden_size=32, batch_size=16)
    >>> run.steps
    [0, 1, 2, 5, 10, 20]
    >>> sorted(run.history[0])
    ['heldout_loss', 'lr', 'step', 'time', 'train_loss']
    >>> run.history[-1]["heldout_loss"] < run.history[0]["heldout_loss"]
    True
    """
    steps = check_int("steps", steps, low=1)
    batch_size = check_int("batch_size", batch_size, low=1)
    n_eval = check_int("n_eval", n_eval, low=1)
    if not (isinstance(lr, int | float) and not isinstance(lr, bool)
            and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if not (isinstance(weight_decay, int | float) and not isinstance(weight_decay, bool)
            and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a non-negative finite number, got {weight_decay!r}")
    if splits is None:
        splits = load_stdlib_corpus()
    elif not isinstance(splits, TextSplits):
        raise ValueError(f"splits must be a TextSplits or None, got {type(splits).__name__}")
    if checkpoint_steps is None:
        checkpoint_steps = set(default_checkpoint_steps(steps))
    else:
        checkpoint_steps = {
            check_int("checkpoint_steps", s, low=0, high=steps) for s in checkpoint_steps
        }
    n_eval_train = min(n_eval, splits.n_train)
    n_eval_heldout = min(n_eval, splits.n_heldout)
    eval_train = splits.train_subset(n_eval_train)
    eval_heldout = splits.heldout_subset(n_eval_heldout)

    config = {
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "max_positions": splits.seq_len,
    }
    model = make_tiny_gpt_neox(**config, seed=seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, steps) / steps))
    )
    gen = torch.Generator().manual_seed(int(seed))
    order = torch.empty(0, dtype=torch.int64)
    position = 0

    def next_batch() -> torch.Tensor:
        nonlocal order, position
        chunks, need = [], batch_size
        while need > 0:
            if position >= order.numel():
                order, position = torch.randperm(splits.n_train, generator=gen), 0
            take = order[position : position + need]
            chunks.append(take)
            position += take.numel()
            need -= take.numel()
        return splits.train_ids[torch.cat(chunks)]

    run = LanguageRun(model=model, optimizer=optimizer, splits=splits, config=config)
    start = time.perf_counter()

    def keep(step: int) -> None:
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        run.checkpoints.append((step, state))
        run.history.append({
            "step": step,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": sequence_loss(model, eval_train),
            "heldout_loss": sequence_loss(model, eval_heldout),
            "time": time.perf_counter() - start,
        })

    if 0 in checkpoint_steps:
        keep(0)
    for step in range(1, steps + 1):
        x = next_batch()
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step in checkpoint_steps:
            keep(step)
    model.eval()
    return run


# --------------------------------------------------------------------------- volume


def volume_along_training(
    run: LanguageRun,
    X: torch.Tensor | None = None,
    *,
    n_sequences: int = 16,
    estimator: LocalVolumeEstimator | None = None,
    **estimator_params,
) -> pd.DataFrame:
    """The local volume of every checkpoint of ``run``, along the same directions.

    Each checkpoint's weights are loaded into a fresh model and a clone of ``estimator``
    is fitted on ``X``. With an integer ``random_state`` (default 0) direction ``i`` is the
    same for every checkpoint (common random numbers: directions live in the coordinates
    that are not flat on X, here the same for every checkpoint), so differences between
    checkpoints are not swamped by Monte Carlo noise. This is the paper's Figure 4: under
    the initialisation prior, the neighbourhood in which a network predicts the same loses
    probability as the network learns.

    Parameters
    ----------
    run : LanguageRun
        A run of :func:`train_language_model`.
    X : torch.Tensor, optional
        ``int64`` token ids ``(N, T)`` on which each neighbourhood is defined; default
        ``run.splits.heldout_subset(n_sequences)``, text the model never trained on.
    n_sequences : int, default 16
        Held-out sequences in the default ``X``.
    estimator : LocalVolumeEstimator, optional
        Settings to start from; default ``LocalVolumeEstimator(cutoff=1e-2,
        measure="gaussian", sigma="init", n_samples=20, random_state=0)`` (the KL cost, over
        every token of X).
    **estimator_params
        Override estimator parameters, e.g. ``cutoff=1e-3`` or ``sigma=0.02``.

    Returns
    -------
    pandas.DataFrame
        One row per checkpoint: ``step``, ``train_loss``, ``heldout_loss`` (nats per byte),
        ``log_volume`` (nats), ``bits``, ``lower_bound`` (95 % lower confidence bound on
        the log-volume), ``ess``, ``n_flat`` (parameters found flat on X and integrated out),
        ``evals_per_dir`` and ``seconds``. ``frame.attrs["estimators"]`` holds the fitted
        estimators, by step.

    Raises
    ------
    ValueError
        If ``run`` has no checkpoints or an argument is invalid.

    Examples
    --------
    >>> import warnings
    >>> from volsk.experiments.language import (
    ...     load_stdlib_corpus, train_language_model, volume_along_training)
    >>> run = train_language_model(load_stdlib_corpus(32, max_bytes=100_000), steps=20,
    ...                            hidden_size=16, batch_size=16, checkpoint_steps=[0, 20])
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")  # LayerNorm's constant init: a floored prior spread
    ...     frame = volume_along_training(run, n_sequences=4, n_samples=4)
    >>> list(frame["step"])
    [0, 20]
    >>> bool(frame.log_volume.iloc[0] > frame.log_volume.iloc[1])
    True
    """
    if not isinstance(run, LanguageRun):
        raise ValueError(f"run must be a LanguageRun, got {type(run).__name__}")
    if not run.checkpoints:
        raise ValueError("run has no checkpoints; train with checkpoint_steps")
    if X is None:
        X = run.splits.heldout_subset(check_int("n_sequences", n_sequences, low=1))
    if estimator is None:
        estimator = LocalVolumeEstimator(**_VOLUME_DEFAULTS)
    elif not isinstance(estimator, LocalVolumeEstimator):
        raise ValueError(
            f"estimator must be a LocalVolumeEstimator or None, got {type(estimator).__name__}"
        )
    base = clone(estimator).set_params(**estimator_params)
    history = {row["step"]: row for row in run.history}
    rows, fitted = [], {}
    for step, model in run.checkpoint_models().items():
        est = clone(base)
        start = time.perf_counter()
        est.fit(model, X)
        seconds = time.perf_counter() - start
        fitted[step] = est
        losses = history.get(step, {})
        rows.append({
            "step": step,
            "train_loss": losses.get("train_loss", float("nan")),
            "heldout_loss": losses.get("heldout_loss", float("nan")),
            "log_volume": est.log_volume_,
            "bits": est.bits_,
            "lower_bound": est.log_volume_lower_bound(0.95),
            "ess": est.effective_sample_size_,
            "n_flat": len(est.flat_parameters_),
            "evals_per_dir": est.n_evaluations_ / len(est.sample_log_volumes_),
            "seconds": seconds,
        })
    frame = pd.DataFrame(rows)
    frame.attrs["estimators"] = fitted
    return frame


def language_demo(
    *,
    steps: int = 300,
    n_samples: int = 20,
    n_sequences: int = 16,
    seed: int = 0,
    out=None,
) -> pd.DataFrame:
    """Train the tiny GPT-NeoX on the standard library and print its checkpoint table.

    What ``volsk demo --language`` runs: :func:`train_language_model` (``steps`` steps,
    default checkpoints), then :func:`volume_along_training` on ``n_sequences`` held-out
    sequences: KL cutoff 1e-2, the Gaussian prior of the model's own initialisation
    (``sigma="init"``), ``n_samples`` directions shared by all checkpoints.

    Parameters
    ----------
    steps : int, default 300
    n_samples : int, default 20
    n_sequences : int, default 16
    seed : int, default 0
        Seed of the model, the batches and the directions.
    out : file-like, optional
        Where to print; default ``sys.stdout``.

    Returns
    -------
    pandas.DataFrame
        The table :func:`volume_along_training` returns.

    Examples
    --------
    >>> import io
    >>> from volsk.experiments.language import language_demo
    >>> buffer = io.StringIO()
    >>> table = language_demo(steps=4, n_samples=2, n_sequences=2, out=buffer)
    >>> list(table["step"])
    [0, 1, 2, 4]
    >>> "log_volume" in buffer.getvalue()
    True
    """
    out = sys.stdout if out is None else out
    start = time.perf_counter()
    splits = load_stdlib_corpus()
    run = train_language_model(splits, steps=steps, seed=seed)
    n_params = sum(p.numel() for p in run.model.parameters())
    print(
        f"GPT-NeoX {run.config}, {n_params:,} parameters; {splits.n_bytes:,} bytes of the "
        f"standard library: {splits.n_train:,} training / {splits.n_heldout:,} held-out "
        f"sequences of {splits.seq_len} bytes; {steps} steps in "
        f"{run.history[-1]['time']:.1f} s",
        file=out,
    )
    with warnings.catch_warnings():
        # LayerNorm weights and biases are initialised to constants: their prior spread is
        # floored at the random tensors' (documented with sigma="init"); no news here
        warnings.simplefilter("ignore", InitPriorWarning)
        table = volume_along_training(
            run, n_sequences=n_sequences, n_samples=n_samples, random_state=seed
        )
    print(
        f"\nlocal volume across checkpoints: Gaussian prior of the initialisation, KL cutoff "
        f"1e-2 on {n_sequences} held-out sequences, k={n_samples} directions shared by all "
        "checkpoints (losses in nats per byte, log-volume in nats)",
        file=out,
    )
    print(table.to_string(index=False, float_format=lambda v: f"{v:,.2f}"), file=out)
    print(f"\ntotal {time.perf_counter() - start:.1f} s", file=out)
    return table


# -------------------------------------------------------------------------- helpers


def _spread(ids: torch.Tensor, n, name: str) -> torch.Tensor:
    n = check_int(name, n, low=1, high=ids.shape[0])
    rows = np.round(np.linspace(0, ids.shape[0] - 1, n)).astype(np.int64)
    return ids[torch.from_numpy(rows)]
