"""Tests for volsk.experiments.language: the stdlib corpus, the tiny GPT-NeoX, its checkpoints."""

import io
import math
import os
import sysconfig
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from volsk import Checkpoint, LocalVolumeEstimator, sweep  # noqa: E402
from volsk.experiments import language  # noqa: E402
from volsk.experiments.language import (  # noqa: E402
    LanguageRun,
    TextSplits,
    default_checkpoint_steps,
    load_stdlib_corpus,
    make_tiny_gpt_neox,
    sequence_loss,
    train_language_model,
    volume_along_training,
)
from volsk.priors import InitPriorWarning  # noqa: E402

# small enough that the whole module runs in well under a minute on one thread
SEQ_LEN = 32
MAX_BYTES = 400_000


@pytest.fixture(scope="module")
def splits():
    return load_stdlib_corpus(SEQ_LEN, max_bytes=MAX_BYTES)


@pytest.fixture(scope="module")
def run(splits):
    torch.set_num_threads(1)
    return train_language_model(splits, steps=120, hidden_size=32, batch_size=32,
                                checkpoint_steps=[0, 30, 120], seed=0)


@pytest.fixture(scope="module")
def volumes(run):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InitPriorWarning)
        return volume_along_training(run, n_sequences=8, n_samples=8, random_state=0)


# ----------------------------------------------------------------------------- corpus


def _file_bytes(directory, name):
    with open(os.path.join(directory, name), encoding="utf-8", errors="replace") as handle:
        return handle.read().encode("utf-8")


def test_corpus_is_deterministic_nonempty_bytes(splits):
    again = load_stdlib_corpus(SEQ_LEN, max_bytes=MAX_BYTES)
    assert torch.equal(splits.train_ids, again.train_ids)
    assert torch.equal(splits.heldout_ids, again.heldout_ids)
    assert splits.train_files == again.train_files and splits.heldout_files == again.heldout_files
    for ids in (splits.train_ids, splits.heldout_ids):
        assert ids.dtype == torch.int64 and ids.ndim == 2 and ids.shape[1] == SEQ_LEN
        assert ids.shape[0] > 0
        assert int(ids.min()) >= 0 and int(ids.max()) < 256
    assert splits.n_bytes == MAX_BYTES  # the stdlib holds far more than the cap


def test_corpus_splits_by_file_and_rows_are_the_files_bytes(splits):
    directory = sysconfig.get_paths()["stdlib"]
    assert set(splits.train_files).isdisjoint(splits.heldout_files)
    names = sorted(n for n in os.listdir(directory)
                   if n.endswith(".py") and os.path.isfile(os.path.join(directory, n)))
    read = sorted(splits.train_files + splits.heldout_files)
    assert read == names[: len(read)]  # files in name order, none skipped
    # held-out rows are exactly the held-out files' bytes, cut per file (the last file read
    # may be cut by the byte cap, so rebuild the cap too)
    used, expected = 0, {}
    for name in read:
        data = _file_bytes(directory, name)[: MAX_BYTES - used]
        used += len(data)
        expected[name] = data[: len(data) // SEQ_LEN * SEQ_LEN]
    for ids, files in ((splits.heldout_ids, splits.heldout_files),
                       (splits.train_ids, splits.train_files)):
        assert bytes(ids.flatten().tolist()) == b"".join(expected[f] for f in files)
    heldout_bytes = sum(len(expected[f]) for f in splits.heldout_files)
    assert 0.05 < heldout_bytes / MAX_BYTES < 0.5


def test_corpus_recipe_on_a_small_directory(tmp_path):
    (tmp_path / "b.py").write_bytes(b"0123456789")
    (tmp_path / "a.py").write_text("x = 'caf\u00e9'\n", encoding="utf-8")  # 12 bytes in UTF-8
    (tmp_path / "c.py").write_bytes(b"\xff\xfeabcdefgh")  # invalid UTF-8: replaced
    (tmp_path / "notes.txt").write_text("not python")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.py").write_text("ignored: not directly in the directory")
    splits = load_stdlib_corpus(4, max_bytes=30, heldout_fraction=0.3, seed=0,
                                directory=tmp_path)
    replaced = "\ufffd\ufffdabcdefgh".encode()  # 14 bytes, cut to 8 by the cap
    texts = {"a.py": "x = 'caf\u00e9'\n".encode(), "b.py": b"0123456789", "c.py": replaced[:8]}
    assert splits.n_bytes == 30
    assert sorted(splits.train_files + splits.heldout_files) == ["a.py", "b.py", "c.py"]
    for ids, files in ((splits.train_ids, splits.train_files),
                       (splits.heldout_ids, splits.heldout_files)):
        want = b"".join(texts[f][: len(texts[f]) // 4 * 4] for f in files)
        assert bytes(ids.flatten().tolist()) == want
    first = np.random.default_rng(0).permutation(3)[0]
    assert ["a.py", "b.py", "c.py"][first] in splits.heldout_files


def test_corpus_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="seq_len"):
        load_stdlib_corpus(1)
    with pytest.raises(ValueError, match="max_bytes"):
        load_stdlib_corpus(64, max_bytes=100)
    with pytest.raises(ValueError, match="heldout_fraction"):
        load_stdlib_corpus(heldout_fraction=1.0)
    with pytest.raises(ValueError, match="directory"):
        load_stdlib_corpus(directory=tmp_path / "missing")
    (tmp_path / "only.py").write_text("x = 1\n" * 100)
    with pytest.raises(ValueError, match="at least 2"):
        load_stdlib_corpus(directory=tmp_path)


def test_subsets_are_evenly_spaced_rows(splits):
    sub = splits.heldout_subset(3)
    last = splits.n_heldout - 1
    assert torch.equal(sub, splits.heldout_ids[[0, round(last / 2), last]])
    assert torch.equal(splits.train_subset(1), splits.train_ids[:1])
    with pytest.raises(ValueError, match="n must be in"):
        splits.heldout_subset(splits.n_heldout + 1)


# ------------------------------------------------------------------------------ model


def test_default_model_has_a_few_hundred_thousand_parameters_and_is_seeded():
    state = torch.random.get_rng_state()
    model = make_tiny_gpt_neox()
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG untouched
    n = sum(p.numel() for p in model.parameters())
    assert 100_000 <= n <= 1_000_000
    assert model.config.vocab_size == 256 and model.config.max_position_embeddings == 64
    again, other = make_tiny_gpt_neox(seed=0), make_tiny_gpt_neox(seed=1)
    pairs = list(zip(model.parameters(), again.parameters(), other.parameters()))
    assert all(torch.equal(a, b) for a, b, _ in pairs)
    assert not all(torch.equal(a, c) for a, _, c in pairs)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        make_tiny_gpt_neox(hidden_size=30, num_heads=4)


def test_untrained_model_predicts_nearly_uniform_bytes(splits):
    loss = sequence_loss(make_tiny_gpt_neox(32, max_positions=SEQ_LEN), splits.heldout_subset(8))
    assert abs(loss - math.log(256)) < 0.1


def test_default_checkpoint_steps():
    assert default_checkpoint_steps(300) == [0, 19, 38, 75, 150, 300]
    assert default_checkpoint_steps(1) == [0, 1]


# --------------------------------------------------------------------------- training


def test_training_lowers_the_heldout_loss(run):
    assert run.steps == [0, 30, 120]
    losses = [row["heldout_loss"] for row in run.history]
    assert abs(losses[0] - math.log(256)) < 0.1
    # a byte model that learned Python's spelling: well below the uniform guess, improving
    assert losses[0] > losses[1] > losses[2]
    assert losses[2] < losses[0] - 1.5
    assert not run.model.training


def test_checkpoints_are_copies_and_load_into_fresh_models(run, tmp_path):
    models = run.checkpoint_models()
    assert list(models) == [0, 30, 120]
    final = dict(run.model.named_parameters())
    for name, p in models[120].named_parameters():
        assert torch.equal(p, final[name])
    assert not torch.equal(models[0].gpt_neox.embed_in.weight, run.model.gpt_neox.embed_in.weight)
    initial = make_tiny_gpt_neox(**run.config, seed=0)
    for (name, p), q in zip(models[0].named_parameters(), initial.parameters()):
        assert torch.equal(p, q), name
    sources = run.save_checkpoints(tmp_path)
    assert all(isinstance(s, Checkpoint) for s in sources.values())
    loaded = sources[30].load()
    for (name, p), q in zip(loaded.named_parameters(), models[30].parameters()):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="directory"):
        run.save_checkpoints(tmp_path / "missing")


def test_training_rejects_bad_arguments(splits):
    with pytest.raises(ValueError, match="checkpoint_steps"):
        train_language_model(splits, steps=5, checkpoint_steps=[0, 6])
    with pytest.raises(ValueError, match="lr"):
        train_language_model(splits, steps=5, lr=0.0)
    with pytest.raises(ValueError, match="splits"):
        train_language_model(splits.train_ids, steps=5)


# ----------------------------------------------------------------------------- volume


def test_checkpoints_give_decreasing_volume_on_the_stdlib_corpus(volumes):
    """The paper's Figure 4: log-volume falls as the model learns on real text.

    Every checkpoint is probed along the same 8 directions. The aggregate log µ̂ lies
    between max(ℓ) − log k and max(ℓ) of the per-direction estimates ℓ, so when every
    direction of the untrained network exceeds every direction of the trained one, no draw
    of directions could reverse the order.
    """
    assert list(volumes.step) == [0, 30, 120]
    assert volumes.log_volume.is_monotonic_decreasing
    estimators = volumes.attrs["estimators"]
    first, last = estimators[0].sample_log_volumes_, estimators[120].sample_log_volumes_
    assert np.isfinite(first).all() and np.isfinite(last).all()
    assert first.min() > last.max()
    # and the margin dwarfs the spread of either checkpoint's per-direction estimates
    spread = max(np.ptp(first), np.ptp(last))
    assert volumes.log_volume.iloc[0] - volumes.log_volume.iloc[-1] > 10 * spread


def test_volume_table_columns_and_flat_embeddings(volumes, run):
    assert {"step", "train_loss", "heldout_loss", "log_volume", "bits", "lower_bound", "ess",
            "n_flat", "evals_per_dir", "seconds"} <= set(volumes.columns)
    assert (volumes.lower_bound < volumes.log_volume).all()
    np.testing.assert_allclose(volumes.bits, -volumes.log_volume / math.log(2))
    # bytes absent from the 8 sequences: their input embeddings are flat on X
    X = run.splits.heldout_subset(8)
    absent = 256 - int(X.unique().numel())
    assert (volumes.n_flat >= absent * run.config["hidden_size"]).all()


def test_volume_along_training_matches_a_sweep_over_saved_checkpoints(run, volumes, tmp_path):
    sources = run.save_checkpoints(tmp_path)
    base = LocalVolumeEstimator(cutoff=1e-2, sigma="init", n_samples=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InitPriorWarning)
        frame = sweep({120: sources[120]}, run.splits.heldout_subset(8), estimator=base,
                      random_state=0)
    assert frame.log_volume.iloc[0] == volumes.log_volume.iloc[-1]


def test_volume_along_training_rejects_bad_input(run):
    empty = LanguageRun(model=run.model, optimizer=run.optimizer, splits=run.splits,
                        config=run.config)
    with pytest.raises(ValueError, match="no checkpoints"):
        volume_along_training(empty)
    with pytest.raises(ValueError, match="run must be"):
        volume_along_training(run.model)
    with pytest.raises(ValueError, match="estimator must be"):
        volume_along_training(run, estimator="kl")


# -------------------------------------------------------------------------------- CLI


def test_cli_demo_language_flag_runs_the_language_demo(monkeypatch):
    from volsk.cli import main

    calls = []
    monkeypatch.setattr(language, "language_demo", lambda **kw: calls.append(kw))
    threads = torch.get_num_threads()
    try:
        assert main(["demo", "--language", "--n-samples", "3", "--seed", "2"]) == 0
        assert main(["demo", "--language"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert calls == [{"n_samples": 3, "seed": 2}, {"n_samples": 20, "seed": 0}]


def test_language_demo_prints_the_checkpoint_table():
    out = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("error", InitPriorWarning)  # the demo has dealt with it
        table = language.language_demo(steps=2, n_samples=2, n_sequences=2, out=out)
    assert list(table.step) == [0, 1, 2]
    text = out.getvalue()
    assert "132,864 parameters" in text and "log_volume" in text


def test_text_splits_repr(splits):
    assert isinstance(splits, TextSplits)
    assert repr(splits).startswith(f"TextSplits(n_train={splits.n_train}")
