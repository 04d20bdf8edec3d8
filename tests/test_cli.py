"""The volsk command line."""

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import logsumexp

from volsk import LocalVolumeEstimator
from volsk._estimate_command import (
    COST_NAMES,
    ESTIMATOR_DEFAULTS,
    EVALUATION_NAMES,
    GENERATOR_NAMES,
    MEASURE_NAMES,
    OUTPUT_NAMES,
    PRECONDITIONER_NAMES,
)
from volsk._evaluate_large import EVALUATIONS
from volsk._sampling import GENERATORS
from volsk.cli import demo, main
from volsk.costs import COSTS, OUTPUT_KINDS
from volsk.measures import MEASURES
from volsk.preconditioners import PRECONDITIONERS
from volsk.preconditioners.curvature.optimizer_state import in_model_order


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


# ---------------------------------------------------------------------------- volsk estimate


def volsk_command(*args, timeout=600, **env):
    """Run ``volsk`` in a fresh interpreter, as a user would."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "volsk.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def option_of(parameter):
    return "--model-output" if parameter == "output" else "--" + parameter.replace("_", "-")


@pytest.fixture
def saved(tmp_path):
    """A small net trained with Adam, its inputs and its optimizer state, saved as files."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    X = torch.randn(20, 3)
    y = torch.randint(0, 2, (20,))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(X), y).backward()
        opt.step()
    torch.save(net, tmp_path / "net.pt")
    np.save(tmp_path / "X.npy", X.numpy())
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    return SimpleNamespace(dir=tmp_path, net=net, X=X, y=y, opt=opt,
                           model=str(tmp_path / "net.pt"), inputs=str(tmp_path / "X.npy"))


def estimate_json(capsys, *args):
    main(["estimate", *map(str, args), "--json"])
    return json.loads(capsys.readouterr().out)


def test_help_lists_every_estimator_parameter_with_its_default():
    done = volsk_command("estimate", "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # undo argparse's line wrapping
    params = set(LocalVolumeEstimator().get_params())
    for name in params:
        assert option_of(name) + " " in text, option_of(name)
    for option in ("--optimizer-state", "--output", "--samples", "--y", "--attention-mask"):
        assert option + " " in text
    for name, value in ESTIMATOR_DEFAULTS.items():
        if value is not None:
            assert f"{option_of(name)} " in text and f"(default: {value})" in text, name
    options = [line for line in done.stdout.splitlines() if line.lstrip().startswith("--")]
    assert len(options) > len(params)
    assert "(default: None)" not in text and "(default: False)" not in text


def test_help_imports_neither_torch_nor_pandas():
    code = ("import sys\nfrom volsk.cli import main\ntry:\n    main(['estimate', '--help'])\n"
            "except SystemExit:\n    pass\nprint(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'pandas', 'sklearn', 'scipy', 'skorch', 'numpy'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_cli_names_and_defaults_are_the_estimators():
    defaults = LocalVolumeEstimator().get_params()
    for name, value in ESTIMATOR_DEFAULTS.items():
        assert defaults[name] == value, name
    assert set(defaults) - set(ESTIMATOR_DEFAULTS) == {"random_state", "verbose"}
    assert set(PRECONDITIONER_NAMES) == set(PRECONDITIONERS) | {"naive"}
    assert set(MEASURE_NAMES) == set(MEASURES)
    assert set(COST_NAMES) == set(COSTS)
    assert set(EVALUATION_NAMES) == set(EVALUATIONS)
    assert set(GENERATOR_NAMES) == set(GENERATORS)
    assert set(OUTPUT_NAMES) == {"auto", *OUTPUT_KINDS}


@pytest.mark.parametrize("args, says", [
    (["--cutoff", "0"], "argument --cutoff: must be a number > 0, got '0'"),
    (["--sigma", "-1"], "argument --sigma"),
    (["--n-threads", "0"], "argument --n-threads"),
    (["--preconditioner", "adam"], "--optimizer-state PATH"),
    (["--output", "results.txt"], "must end in .csv, .json, .parquet"),
    (["--optimizer-state", "missing.pt"], "optimizer state file 'missing.pt' does not exist"),
])
def test_usage_errors_are_one_line_with_exit_status_2(saved, args, says):
    done = volsk_command("estimate", saved.model, saved.inputs, *args)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("volsk estimate: error: "), done.stderr
    assert says in lines[0]


def test_missing_model_file_and_bad_inputs_are_usage_errors(saved):
    missing = volsk_command("estimate", saved.dir / "nothing.pt", saved.inputs)
    np.save(saved.dir / "wide.npy", np.ones((4, 7), dtype="f4"))
    wide = volsk_command("estimate", saved.model, saved.dir / "wide.npy", "--n-samples", 2)
    for done, says in [(missing, "does not exist"), (wide, "X does not fit the model")]:
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and says in done.stderr


def test_an_unexpected_error_is_one_line_unless_a_traceback_is_asked_for(saved):
    (saved.dir / "failing_cost.py").write_text(
        "def cost(outputs, anchor):\n    raise RuntimeError('the cost broke')\n")
    args = ("estimate", saved.model, saved.inputs, "--cost", "failing_cost:cost",
            "--n-samples", 2)
    done = volsk_command(*args, PYTHONPATH=str(saved.dir))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "volsk estimate: error: RuntimeError: the cost broke (--traceback shows where)"]
    shown = volsk_command(*args, "--traceback", PYTHONPATH=str(saved.dir))
    assert shown.returncode == 1 and "Traceback" in shown.stderr


def test_output_files_are_written_and_read_back(saved):
    results, samples = saved.dir / "results.csv", saved.dir / "samples.json"
    done = volsk_command("estimate", saved.model, saved.inputs, "--n-samples", 6, "--sigma", 0.5,
                         "--output", results, "--samples", samples, "--json")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    table, per_direction = pd.read_csv(results), pd.read_json(samples, orient="records")
    assert len(table) == 1 and table["log_volume"][0] == printed["log_volume"]
    assert table["n_samples"][0] == 6 and table["preconditioner"][0] == "naive"
    assert len(per_direction) == 6
    assert per_direction["log_volume"].max() == pytest.approx(printed["max_sample"], abs=1e-9)


@pytest.mark.parametrize("results, samples", [("r.json", "s.csv"), ("r.parquet", "s.parquet")])
def test_results_and_samples_in_every_format(saved, capsys, results, samples):
    args = ["estimate", saved.model, saved.inputs, "--n-samples", "4", "--sigma", "0.5",
            "--output", str(saved.dir / results), "--samples", str(saved.dir / samples)]
    if results.endswith(".parquet") and importlib.util.find_spec("pyarrow") is None:
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2 and "pip install pyarrow" in capsys.readouterr().err
        return
    main(args)
    read = {".json": lambda p: pd.read_json(p, orient="records"), ".csv": pd.read_csv,
            ".parquet": pd.read_parquet}
    table = read[Path(results).suffix](saved.dir / results)
    per_direction = read[Path(samples).suffix](saved.dir / samples)
    assert len(table) == 1 and len(per_direction) == 4
    aggregate = logsumexp(per_direction["log_volume"]) - np.log(4)
    assert table["log_volume"][0] == pytest.approx(aggregate, abs=1e-9)


def test_adam_from_a_saved_optimizer_state_matches_the_python_api(saved, capsys):
    row = estimate_json(capsys, saved.model, saved.inputs, "--preconditioner", "adam",
                        "--optimizer-state", saved.dir / "optimizer.pt", "--n-samples", 8,
                        "--sigma", 0.5, "--preconditioner-eps", 1e-2)
    est = LocalVolumeEstimator(sigma=0.5, preconditioner="adam", preconditioner_eps=1e-2,
                               n_samples=8, random_state=0)
    est.fit(saved.net, saved.X, optimizer=saved.opt)
    assert row["log_volume"] == est.log_volume_
    assert row["preconditioner"] == "adam" and row["preconditioner_eps"] == 1e-2


def test_adam_from_a_two_group_state_like_a_hugging_face_trainers(saved, capsys):
    """Trainer puts weights (weight decay) and biases (none) in two param groups."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.LayerNorm(5), torch.nn.Tanh(),
                              torch.nn.Linear(5, 2))
    named = list(net.named_parameters())
    decay = [p for n, p in named if n.endswith("weight") and p.ndim > 1]
    rest = [p for n, p in named if not (n.endswith("weight") and p.ndim > 1)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": rest, "weight_decay": 0.0}], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        net(saved.X).logsumexp(-1).mean().backward()
        opt.step()
    torch.save(net, saved.dir / "two.pt")
    torch.save(opt.state_dict(), saved.dir / "optimizer_two_groups.pt")
    row = estimate_json(capsys, saved.dir / "two.pt", saved.inputs, "--preconditioner", "adam",
                        "--optimizer-state", saved.dir / "optimizer_two_groups.pt",
                        "--n-samples", 6, "--sigma", 0.5)
    est = LocalVolumeEstimator(sigma=0.5, preconditioner="adam", n_samples=6, random_state=0)
    assert row["log_volume"] == est.fit(net, saved.X, optimizer=opt).log_volume_


def test_state_groups_that_shapes_cannot_order_uniquely_are_refused():
    net = torch.nn.Sequential(*[torch.nn.Linear(2, 2, bias=False) for _ in range(3)])
    opt = torch.optim.Adam([{"params": [net[0].weight, net[1].weight]},
                            {"params": [net[2].weight]}])
    net(torch.ones(1, 2)).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="more than one way"):
        in_model_order(opt.state_dict(), net)
    other = torch.nn.Sequential(torch.nn.Linear(2, 3, bias=False),
                                torch.nn.Linear(3, 2, bias=False),
                                torch.nn.Linear(2, 2, bias=False))
    with pytest.raises(ValueError, match="in no way"):
        in_model_order(opt.state_dict(), other)


def test_array_files_for_sigma_and_a_diagonal_preconditioner(saved, capsys):
    n = sum(p.numel() for p in saved.net.parameters())
    curvature = np.linspace(0.1, 2.0, n)
    np.save(saved.dir / "sigma.npy", np.full(n, 0.5))
    np.save(saved.dir / "h.npy", curvature)
    from_files = estimate_json(capsys, saved.model, saved.inputs, "--sigma",
                               saved.dir / "sigma.npy", "--preconditioner",
                               saved.dir / "h.npy", "--n-samples", 5)
    est = LocalVolumeEstimator(sigma=0.5, preconditioner=curvature, n_samples=5,
                               random_state=0).fit(saved.net, saved.X)
    assert from_files["log_volume"] == est.log_volume_


def test_every_estimator_option_reaches_the_estimator(saved, capsys, monkeypatch):
    seen = {}
    fit = LocalVolumeEstimator.fit

    def spy(self, *args, **kwargs):
        seen.update(self.get_params())
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(LocalVolumeEstimator, "fit", spy)
    np.save(saved.dir / "y.npy", saved.y.numpy())
    estimate_json(capsys, saved.model, saved.inputs, "--y", saved.dir / "y.npy",
                  "--cost", "cross_entropy", "--cutoff", 0.05, "--measure", "gaussian",
                  "--sigma", "init", "--bounds", 0.3, "--preconditioner", "diag_hessian",
                  "--preconditioner-eps", "auto", "--preconditioner-exponent", 0.25,
                  "--n-samples", 4, "--model-output", "logits", "--rtol", 1e-2,
                  "--batch-size", 2, "--data-batch-size", 10, "--evaluation", "vmap",
                  "--device", "cpu", "--generator", "host",
                  "--random-state", 3, "--n-jobs", 1, "--n-threads", 1, "--verbose", 0)
    assert seen == dict(
        cutoff=0.05, measure="gaussian", preconditioner="diag_hessian", n_samples=4,
        cost="cross_entropy", output="logits", sigma="init", bounds=0.3,
        preconditioner_eps="auto", preconditioner_exponent=0.25, rtol=1e-2, batch_size=2,
        data_batch_size=10, evaluation="vmap", device="cpu", generator="host", random_state=3,
        n_jobs=1, n_threads=1, verbose=0)


def test_the_exponent_can_be_chosen_by_the_pilot(saved, capsys):
    out = estimate_json(capsys, saved.model, saved.inputs, "--sigma", 0.5, "--preconditioner",
                        "diag_hessian", "--preconditioner-exponent", "auto", "--n-samples", 4)
    est = LocalVolumeEstimator(sigma=0.5, preconditioner="diag_hessian", n_samples=4,
                               preconditioner_exponent="auto", random_state=0)
    est.fit(saved.net, saved.X)
    assert out["log_volume"] == est.log_volume_


def test_hugging_face_model_folder(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTNeoXConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=16,
                                        max_position_embeddings=16)
    torch.manual_seed(0)
    transformers.GPTNeoXForCausalLM(config).save_pretrained(tmp_path / "checkpoint")
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 16, (3, 6)))
    row = estimate_json(capsys, tmp_path / "checkpoint", tmp_path / "tokens.npy",
                        "--n-samples", 3, "--sigma", 0.1)
    assert np.isfinite(row["log_volume"]) and row["n_parameters"] > 0
