"""LocalVolumeEstimator follows scikit-learn's conventions (issue #5).

sklearn's ``check_estimator`` cannot drive ``fit(model, X)`` (every data check passes arrays as
the model), so the API checks that apply are run directly, and the data checks are rewritten
here with a small real network: idempotent fit, no state leaking between fits, refit with
other parameters, fit returns self, fit adds only ``_`` attributes and leaves params alone,
pickling keeps results but never the model.
"""

import dataclasses
import pickle
import random

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils import estimator_checks, get_tags

from models import small_mlp
from volsk import LocalVolumeEstimator

N_PARAMS = 5 * 8 + 8 + 8 * 3 + 3  # 75


def make(**params):
    return LocalVolumeEstimator(**({"sigma": 0.5, "n_samples": 8, "random_state": 0} | params))


def results(est):
    """Everything a fit produced, for exact comparisons."""
    return {
        "log_volume": est.log_volume_,
        "samples": est.samples_.copy(),
        "n_parameters": est.n_parameters_,
        "n_evaluations": est.n_evaluations_,
        "flat": list(est.flat_parameters_),
    }


def assert_same_results(a, b):
    assert a["log_volume"] == b["log_volume"]
    pd.testing.assert_frame_equal(a["samples"], b["samples"])
    assert a["n_parameters"] == b["n_parameters"]
    assert a["n_evaluations"] == b["n_evaluations"]
    assert a["flat"] == b["flat"]


# --------------------------------------------------------------------- sklearn's own API checks
API_CHECKS = [
    "check_estimator_cloneable",
    "check_estimator_repr",
    "check_no_attributes_set_in_init",
    "check_parameters_default_constructible",
    "check_get_params_invariance",
    "check_set_params",
    "check_do_not_raise_errors_in_init_or_set_params",
    "check_valid_tag_types",
    "check_estimator_tags_renamed",
    "check_mixin_order",
]


@pytest.mark.parametrize("check", API_CHECKS)
def test_sklearn_api_checks_that_do_not_call_fit_pass(check):
    getattr(estimator_checks, check)("LocalVolumeEstimator", LocalVolumeEstimator())


def test_clone_and_get_set_params_round_trip():
    sigma = np.full(N_PARAMS, 0.3)
    est = LocalVolumeEstimator(cutoff=1e-3, measure="gaussian", n_samples=7, sigma=sigma,
                               rtol=1e-2, random_state=3)
    params = est.get_params()
    assert params["cutoff"] == 1e-3 and params["sigma"] is sigma and params["n_samples"] == 7
    copy = clone(est)
    assert type(copy) is LocalVolumeEstimator and copy is not est
    for key, value in params.items():
        assert np.array_equal(copy.get_params()[key], value) if key == "sigma" else (
            copy.get_params()[key] == value
        ), key
    assert est.set_params(**params) is est
    assert est.get_params() == params
    est.set_params(cutoff=0.5, n_samples=3)
    assert (est.cutoff, est.n_samples) == (0.5, 3)
    with pytest.raises(ValueError, match="cutof"):
        est.set_params(cutof=1.0)


def test_clone_of_a_fitted_estimator_is_unfitted_and_refits_identically():
    net, X = small_mlp()
    est = make().fit(net, X)
    copy = clone(est)
    assert not [a for a in vars(copy) if a.endswith("_")]
    with pytest.raises(NotFittedError):
        copy.score()
    assert_same_results(results(copy.fit(net, X)), results(est))


@pytest.mark.parametrize(
    "call",
    [
        lambda est: est.score(),
        lambda est: est.score(torch.zeros(3, 5)),
        lambda est: est.log_volume_lower_bound(),
        lambda est: est.results_frame(),
    ],
    ids=["score", "score_X", "lower_bound", "results_frame"],
)
def test_results_before_fit_raise_not_fitted_error(call):
    with pytest.raises(NotFittedError):
        call(make())


def test_sklearn_tags_describe_a_model_and_data_estimator():
    tags = get_tags(LocalVolumeEstimator())
    assert tags.requires_fit
    assert tags.non_deterministic  # a Monte Carlo estimate
    assert not tags.input_tags.two_d_array  # fit takes (model, X), not a 2-D array
    assert not tags.target_tags.required


def test_repr_shows_changed_params_and_stays_short_for_long_arrays():
    assert repr(LocalVolumeEstimator()) == "LocalVolumeEstimator()"
    assert repr(LocalVolumeEstimator(cutoff=1e-3, n_samples=50, preconditioner="naive")) == (
        "LocalVolumeEstimator(cutoff=0.001, n_samples=50, preconditioner='naive')"
    )
    long = LocalVolumeEstimator(preconditioner=np.ones(100_000), sigma=np.ones(100_000))
    text = repr(long)
    assert text.startswith("LocalVolumeEstimator(") and len(text) < 400
    html = long._repr_html_()
    assert "LocalVolumeEstimator" in html and len(html) < 100_000
    assert "cutoff" in LocalVolumeEstimator(cutoff=0.5)._repr_html_()


# ------------------------------------------------------------------------------------ pickling
def _reachable(obj):
    """Every object reachable through instance dicts, dataclass fields and containers."""
    seen, stack, found = set(), [obj], []
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        found.append(item)
        if isinstance(item, (torch.Tensor, np.ndarray, pd.DataFrame, str, bytes)):
            continue
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif isinstance(item, torch.nn.Module):
            continue  # found; its insides are the module's business
        else:
            if dataclasses.is_dataclass(item) and not isinstance(item, type):
                stack.extend(getattr(item, f.name) for f in dataclasses.fields(item))
            if hasattr(item, "__dict__") and not isinstance(item, type):
                stack.extend(vars(item).values())
            for cell in getattr(item, "__closure__", None) or ():
                stack.append(cell.cell_contents)
    return found


def test_fitted_estimator_holds_no_reference_to_the_users_model():
    net, X = small_mlp()
    est = make().fit(net, X)
    reachable = _reachable(est)
    assert not any(obj is net for obj in reachable)
    user_tensors = {id(p) for p in net.parameters()} | {id(b) for b in net.buffers()}
    assert not any(id(obj) in user_tensors for obj in reachable)  # a private copy, if any


@pytest.mark.parametrize("dump", ["pickle", "joblib"])
def test_pickle_round_trip_keeps_results_and_drops_the_model(dump, tmp_path):
    net, X = small_mlp()
    est = make(n_samples=12).fit(net, X)
    if dump == "pickle":
        blob = pickle.dumps(est)
        # no parameter of the model travels with the results
        assert net[0].weight.detach().numpy().tobytes() not in blob
        back = pickle.loads(blob)
    else:
        joblib.dump(est, tmp_path / "est.joblib")
        back = joblib.load(tmp_path / "est.joblib")
    assert not any(isinstance(obj, torch.nn.Module) for obj in _reachable(back))
    assert_same_results(results(back), results(est))
    np.testing.assert_array_equal(back.sample_log_volumes_, est.sample_log_volumes_)
    np.testing.assert_array_equal(back.radii_, est.radii_)
    assert back.log10_volume_ == est.log10_volume_ and back.bits_ == est.bits_
    assert back.effective_sample_size_ == est.effective_sample_size_
    assert back.score() == est.score()
    assert back.log_volume_lower_bound(0.9) == est.log_volume_lower_bound(0.9)
    pd.testing.assert_frame_equal(back.results_frame(), est.results_frame())
    assert back.get_params() == est.get_params()
    with pytest.raises(ValueError, match="fit"):  # score on new X needs the model
        back.score(X)
    # the unpickled estimator refits like a fresh one
    assert_same_results(results(back.fit(net, X)), results(est))


# ---------------------------------------------- fit behaviour (sklearn data checks, by hand)
def test_fit_returns_self():
    net, X = small_mlp()
    est = make()
    assert est.fit(net, X) is est
    assert est.partial_fit(net, X, n_samples=2) is est


def test_fit_is_idempotent():
    net, X = small_mlp()
    est = make()
    first = results(est.fit(net, X))
    assert_same_results(results(est.fit(net, X)), first)


def test_no_state_leaks_between_fits_on_different_models_and_data():
    net_a, X_a = small_mlp(seed=0)
    wide = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    X_b = torch.randn(25, 5, generator=torch.Generator().manual_seed(9))
    est = make()
    est.fit(net_a, X_a)
    est.partial_fit(net_a, X_a, n_samples=5)  # extra directions must not survive a refit
    est.fit(wide, X_b)
    assert_same_results(results(est), results(make().fit(wide, X_b)))
    assert est.n_parameters_ == 5 * 16 + 16 + 16 * 2 + 2
    assert est.sample_log_volumes_.shape == (8,)
    # score(X) after the refit is about the new anchor
    assert est.score(X_b) == pytest.approx(est.log_volume_, abs=1e-9)


def test_failed_refit_keeps_the_previous_fit():
    # a fit that raises leaves the estimator as it was: the previous fit, whole
    net, X = small_mlp()
    est = make().fit(net, X)
    before = results(est)
    with pytest.raises(ValueError, match="X"):
        est.fit(net, torch.full((4, 5), float("nan")))
    assert_same_results(results(est), before)
    assert est.score() == est.log_volume_
    unfitted = make()
    with pytest.raises(ValueError, match="X"):
        unfitted.fit(net, torch.full((4, 5), float("nan")))
    with pytest.raises(NotFittedError):
        unfitted.score()


def test_refit_with_other_params_equals_a_fresh_fit():
    net, X = small_mlp()
    est = make().fit(net, X)
    est.set_params(cutoff=3e-2, n_samples=5, measure="lebesgue", random_state=7)
    assert_same_results(results(est.fit(net, X)),
                        results(make(cutoff=3e-2, n_samples=5, measure="lebesgue",
                                     random_state=7).fit(net, X)))
    assert est.bits_ is None  # a stale value from the gaussian fit would be a float


def test_fit_adds_only_underscore_attributes():
    net, X = small_mlp()
    est = make()
    before = set(vars(est))
    assert before == set(est.get_params())
    est.fit(net, X)
    est.partial_fit(net, X, n_samples=2)
    added = set(vars(est)) - before
    public = [a for a in added if not a.startswith("_") and not a.endswith("_")]
    assert not public, f"fit added public non-underscore attributes {public}"
    assert {"log_volume_", "samples_", "sample_log_volumes_", "radii_", "n_parameters_",
            "n_evaluations_", "effective_sample_size_", "log10_volume_", "bits_"} <= added


def test_fit_does_not_change_params_not_even_arrays_in_place():
    net, X = small_mlp()
    sigma = np.full(N_PARAMS, 0.5)
    curvature = np.linspace(0.1, 2.0, N_PARAMS)
    est = make(sigma=sigma, preconditioner=curvature)
    before = joblib.hash(est.get_params())
    sigma_copy, curvature_copy = sigma.copy(), curvature.copy()
    est.fit(net, X)
    est.partial_fit(net, X, n_samples=2)
    assert joblib.hash(est.get_params()) == before
    assert est.sigma is sigma and est.preconditioner is curvature
    np.testing.assert_array_equal(sigma, sigma_copy)
    np.testing.assert_array_equal(curvature, curvature_copy)
    rs = np.random.RandomState(0)  # used (its state advances, as in sklearn), never replaced
    assert make(random_state=rs).fit(net, X).random_state is rs


def test_fit_with_an_int_seed_leaves_global_random_states_untouched():
    net, X = small_mlp()
    torch_state = torch.get_rng_state().clone()
    np_state = np.random.get_state()  # noqa: NPY002 - the global state is what is checked
    py_state = random.getstate()
    make(n_samples=6).fit(net, X).score(X[:10])
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()  # noqa: NPY002
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1])
    assert after[2:] == np_state[2:]
    assert random.getstate() == py_state


# ---------------------------------------------------------------------------------- partial_fit
def test_partial_fit_extends_fit_sample_for_sample():
    net, X = small_mlp()
    long = make(n_samples=200).fit(net, X)
    est = make(n_samples=100).fit(net, X)
    est.partial_fit(net, X, n_samples=100)
    pd.testing.assert_frame_equal(est.samples_, long.samples_)
    assert est.samples_["direction"].tolist() == list(range(200))
    assert est.log_volume_ == long.log_volume_
    assert est.n_evaluations_ == long.n_evaluations_
    assert est.effective_sample_size_ == long.effective_sample_size_
    # in uneven steps, with another batch size, from an unfitted estimator
    steps = make(n_samples=30, batch_size=7)
    for k in (30, 1, 69, 100):
        steps.partial_fit(net, X, n_samples=k)
    np.testing.assert_array_equal(steps.sample_log_volumes_, long.sample_log_volumes_)


def test_partial_fit_with_another_model_or_other_data_raises():
    net, X = small_mlp()
    est = make().fit(net, X)
    other, _ = small_mlp(seed=1)
    with pytest.raises(ValueError, match="different model, X or y"):
        est.partial_fit(other, X, n_samples=2)
    with pytest.raises(ValueError, match="different model, X or y"):
        est.partial_fit(net, X[:-1], n_samples=2)
    X_moved = X.clone()
    X_moved[0, 0] += 1.0
    with pytest.raises(ValueError, match="different model, X or y"):
        est.partial_fit(net, X_moved, n_samples=2)
    assert est.sample_log_volumes_.shape == (8,)  # refused extensions leave the estimate alone
    with pytest.raises(ValueError, match="n_samples"):
        est.partial_fit(net, X, n_samples=0)


def test_first_partial_fit_does_not_change_n_samples_param():
    net, X = small_mlp()
    est = make(n_samples=8).partial_fit(net, X, n_samples=3)
    assert est.sample_log_volumes_.shape == (3,)
    assert est.n_samples == 8  # a parameter, not a record of what partial_fit was asked for
