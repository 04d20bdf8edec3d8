"""make_volume_scorer: a scikit-learn scorer (estimator, X, y) -> log-volume, greater is better."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.datasets import make_classification
from sklearn.model_selection import GridSearchCV, cross_validate, permutation_test_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from skorch import NeuralNetClassifier

import volsk
from volsk import LocalVolumeEstimator
from volsk.integrations import VolumeScorer, make_volume_scorer


class SeededMLP(torch.nn.Module):
    """Initialised from its own generator, so clones train identically in any process."""

    def __init__(self, n_features=6, hidden=8, n_classes=3, seed=0):
        super().__init__()
        self.hidden = torch.nn.Linear(n_features, hidden)
        self.out = torch.nn.Linear(hidden, n_classes)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p.shape[-1]))

    def forward(self, X):
        return self.out(torch.tanh(self.hidden(X)))


def data(n=90):
    X, y = make_classification(n_samples=n, n_features=6, n_informative=4, n_classes=3,
                               random_state=0)
    return (X * 3 + 5).astype(np.float32), y.astype(np.int64)  # unscaled on purpose


def make_net(**kw):
    params = dict(module=SeededMLP, criterion=torch.nn.CrossEntropyLoss, max_epochs=5, lr=0.1,
                  train_split=None, verbose=0)
    return NeuralNetClassifier(**(params | kw))


def make_pipe(**kw):
    return Pipeline([("scale", StandardScaler()), ("net", make_net(**kw))])


SCORER_PARAMS = {"cutoff": 1e-2, "sigma": 1.0, "n_samples": 6}


def test_scorer_repr_is_the_call_that_made_it():
    assert repr(make_volume_scorer(cutoff=1e-3, n_samples=50)) == (
        "make_volume_scorer(cutoff=0.001, n_samples=50, random_state=0)"
    )
    assert repr(make_volume_scorer(random_state=3, confidence=0.9)) == (
        "make_volume_scorer(random_state=3, confidence=0.9)"
    )


def test_scorer_is_exported_from_volsk():
    assert volsk.make_volume_scorer is make_volume_scorer


def test_bad_scorer_arguments_fail_at_creation():
    with pytest.raises(TypeError, match="cutof.*valid names"):
        make_volume_scorer(cutof=1e-2)
    with pytest.raises(ValueError, match="cutoff"):
        make_volume_scorer(cutoff=-1.0)
    with pytest.raises(ValueError, match="measure"):
        make_volume_scorer(measure="cauchy")
    with pytest.raises(ValueError, match="confidence"):
        make_volume_scorer(confidence=1.5)


def test_scorer_returns_the_estimators_log_volume_for_net_pipeline_and_module():
    X, y = data()
    scorer = make_volume_scorer(**SCORER_PARAMS)
    net = make_net().fit(X, y)
    expected = LocalVolumeEstimator(**SCORER_PARAMS, random_state=0).fit(net.module_, X)
    assert scorer(net, X, y) == expected.log_volume_
    assert scorer(net.module_, X) == expected.log_volume_
    # a Pipeline: the net's neighbourhood is defined on the scaled X it actually sees
    pipe = make_pipe().fit(X, y)
    scaled = pipe[:-1].transform(X)
    on_scaled = LocalVolumeEstimator(**SCORER_PARAMS, random_state=0).fit(pipe[-1], scaled)
    assert scorer(pipe, X, y) == on_scaled.log_volume_
    assert scorer(pipe, X, y) != scorer(pipe[-1], X, y)  # raw X would be another neighbourhood
    bound = make_volume_scorer(**SCORER_PARAMS, confidence=0.95)
    assert bound(net, X, y) == pytest.approx(expected.log_volume_lower_bound(0.95))
    assert bound(net, X, y) < scorer(net, X, y)


def test_scorer_passes_labels_only_to_the_cross_entropy_cost():
    X, y = data()
    net = make_net().fit(X, y)
    params = SCORER_PARAMS | {"cutoff": 0.05, "cost": "cross_entropy"}
    ce = make_volume_scorer(**params)
    expected = LocalVolumeEstimator(**params, random_state=0).fit(net, X, y)
    assert ce(net, X, y) == expected.log_volume_
    with pytest.raises(ValueError, match="y"):
        ce(net, X, None)
    # a two-argument callable cost never receives y
    mse = make_volume_scorer(**SCORER_PARAMS, cost=torch.nn.functional.mse_loss)
    assert np.isfinite(mse(net, X, y))


def test_scorer_survives_pickling():
    X, y = data()
    net = make_net().fit(X, y)
    scorer = make_volume_scorer(**SCORER_PARAMS)
    back = pickle.loads(pickle.dumps(scorer))
    assert isinstance(back, VolumeScorer) and repr(back) == repr(scorer)
    assert back(net, X, y) == scorer(net, X, y)


def test_scorer_rejects_what_is_not_a_network():
    X, y = data()
    scaler = StandardScaler().fit(X)
    with pytest.raises(TypeError, match="model"):
        make_volume_scorer(**SCORER_PARAMS)(scaler, X, y)


def test_grid_search_over_a_skorch_hyperparameter_with_accuracy_and_volume():
    X, y = data()
    scorer = make_volume_scorer(**SCORER_PARAMS)
    search = GridSearchCV(
        make_pipe(),
        {"net__module__hidden": [4, 12]},
        scoring={"accuracy": "accuracy", "log_volume": scorer},
        refit="accuracy",
        cv=2,
        error_score="raise",
    )
    search.fit(X, y)
    res = search.cv_results_
    volumes = res["mean_test_log_volume"]
    assert np.all(np.isfinite(volumes)) and np.all(volumes < 0)
    assert np.all((0 <= res["mean_test_accuracy"]) & (res["mean_test_accuracy"] <= 1))
    # more hidden units = more parameters = a smaller (more negative) prior probability
    assert volumes[1] < volumes[0]
    assert search.best_index_ == int(np.argmax(res["mean_test_accuracy"]))
    assert search.best_estimator_[-1].module_.hidden.out_features in (4, 12)
    assert np.isfinite(scorer(search.best_estimator_, X, y))


def test_grid_search_with_a_bare_skorch_net_and_the_volume_as_the_only_score():
    X, y = data()
    Xs = StandardScaler().fit_transform(X).astype(np.float32)
    search = GridSearchCV(make_net(), {"lr": [0.05, 0.2]},
                          scoring=make_volume_scorer(**SCORER_PARAMS), cv=2,
                          error_score="raise").fit(Xs, y)
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))
    assert search.best_score_ == np.max(search.cv_results_["mean_test_score"])


def test_cross_validate_in_two_processes_matches_one_process():
    X, y = data()
    scoring = {"accuracy": "accuracy", "log_volume": make_volume_scorer(**SCORER_PARAMS)}
    serial = cross_validate(make_pipe(), X, y, cv=2, scoring=scoring, error_score="raise")
    parallel = cross_validate(make_pipe(), X, y, cv=2, scoring=scoring, n_jobs=2,
                              error_score="raise")
    assert np.all(np.isfinite(parallel["test_log_volume"]))
    np.testing.assert_allclose(parallel["test_log_volume"], serial["test_log_volume"],
                               rtol=1e-6)
    np.testing.assert_array_equal(parallel["test_accuracy"], serial["test_accuracy"])


def test_permutation_test_score_with_the_volume_scorer():
    X, y = data(60)
    Xs = StandardScaler().fit_transform(X).astype(np.float32)
    score, perm_scores, pvalue = permutation_test_score(
        make_net(max_epochs=3), Xs, y, scoring=make_volume_scorer(**SCORER_PARAMS),
        n_permutations=2, cv=2, random_state=0,
    )
    assert np.isfinite(score) and np.all(np.isfinite(perm_scores)) and 0 < pvalue <= 1
