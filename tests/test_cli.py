"""The volsk command line."""

import io
import json

import numpy as np
import torch

from volsk.cli import demo, main


def test_demo_prints_the_table_for_clean_and_poisoned_nets():
    out = io.StringIO()
    table = demo(n_samples=6, preconditioners=("naive",), out=out)
    text = out.getvalue()
    assert "clean" in text and "poisoned" in text and "log_volume" in text
    assert list(table["net"]) == ["clean", "clean", "poisoned"]
    assert np.isfinite(table["log_volume"]).all()
    assert (table["lower_bound_95"] < table["log_volume"]).all()
    assert np.allclose(table["bits"], -table["log_volume"] / np.log(2))


def test_estimate_runs_on_a_saved_model(tmp_path, capsys):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    torch.save(net, tmp_path / "net.pt")
    np.save(tmp_path / "X.npy", np.random.default_rng(0).normal(size=(20, 3)).astype("f4"))
    main([
        "estimate", str(tmp_path / "net.pt"), str(tmp_path / "X.npy"), "--sigma", "0.5",
        "--n-samples", "5", "--json",
    ])
    row = json.loads(capsys.readouterr().out)
    assert np.isfinite(row["log_volume"]) and row["n_parameters"] == 32
