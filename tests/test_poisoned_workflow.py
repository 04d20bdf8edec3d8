"""The workflow users came for, end to end: clean vs poisoned skorch nets, cross-validated with
accuracy and the volume scorer (examples/poisoned_vs_clean.py, at a smaller size).

This asserts the workflow and the validity of its numbers, not the scientific outcome (which
net owns more volume); that is measured in benchmarks/RESULTS.md.
"""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from volsk.experiments.digits import N_POISON, accuracy, load_digits_splits, train_digits_mlp

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "poisoned_vs_clean.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("poisoned_vs_clean", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def table(example):
    torch.set_num_threads(1)
    return example.compare(n_seeds=2, n_samples=10, epochs=8)


def test_example_has_a_title_and_a_main_guard():
    source = EXAMPLE.read_text()
    assert source.startswith('"""\nPoisoned vs clean')
    assert 'if __name__ == "__main__":' in source


def test_workflow_table_has_one_valid_row_per_net_and_split(table):
    assert list(table.columns) == ["net", "split", "accuracy", "log_volume", "lower_bound_95",
                                   "fit_time"]
    assert sorted(zip(table["net"], table["split"], strict=True)) == [
        ("clean", 0), ("clean", 1), ("poisoned", 0), ("poisoned", 1)]
    assert np.all(np.isfinite(table["log_volume"])) and np.all(table["log_volume"] < 0)
    assert np.all(table["lower_bound_95"] <= table["log_volume"])
    np.testing.assert_allclose(table["lower_bound_95"], table["log_volume"] + math.log(0.05))
    assert np.all((table["accuracy"] > 0.5) & (table["accuracy"] <= 1.0))


def test_poisoned_nets_generalise_worse_on_every_split(table, example):
    summary = example.summarize(table)
    assert summary.shape == (2, 5)
    assert np.all(summary["poisoned_accuracy"] < summary["clean_accuracy"])
    np.testing.assert_allclose(summary["clean_minus_poisoned_nats"],
                               summary["clean_log_volume"] - summary["poisoned_log_volume"])


def test_skorch_poisoning_follows_the_reference_recipe(example):
    splits = load_digits_splits(n_poison=N_POISON)
    torch.manual_seed(0)
    net = example.make_net(0.3, splits, epochs=8).fit(splits.X_train.numpy(),
                                                      splits.y_train.numpy())
    parts = [(splits.X_train, splits.y_train), (splits.X_poison, splits.y_poison),
             (splits.X_test, splits.y_test)]
    train, poison, test = (net.score(X.numpy(), y.numpy()) for X, y in parts)
    # fits its training set, generalises worse, worst on the digits it was pushed away from
    assert train > 0.9 and poison < test < train
    # same accuracies (up to batch-order noise) as volsk.experiments.digits.train_digits_mlp
    reference = train_digits_mlp(splits, poison=0.3, epochs=8, seed=0)
    expected = [accuracy(reference.model, X, y) for X, y in parts]
    np.testing.assert_allclose([train, poison, test], expected, atol=0.04)
    # skorch bookkeeping survives the custom training step
    assert len(net.history) == 8 and np.isfinite(net.history[-1, "train_loss"])
    assert net.poison_rng_ is not None and net.get_params()["poison"] == 0.3
    with pytest.raises(ValueError, match="X_poison"):
        example.PoisonedNeuralNetClassifier(
            example.make_digits_mlp, criterion=torch.nn.CrossEntropyLoss, max_epochs=1,
            train_split=None, poison=0.3, verbose=0,
        ).fit(splits.X_train.numpy()[:64], splits.y_train.numpy()[:64])


def test_main_prints_the_tables(example, capsys):
    out = example.main(["--seeds", "1", "--n-samples", "4", "--epochs", "2"])
    printed = capsys.readouterr().out
    assert isinstance(out, pd.DataFrame) and len(out) == 2
    assert "clean_minus_poisoned_nats" in printed and "nats (mean ± sd over 1 splits)" in printed
