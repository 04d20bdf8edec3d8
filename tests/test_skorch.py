"""skorch bridge: fitted nets and Pipelines as models, and the LocalVolume history callback."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import make_classification
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from skorch import NeuralNetClassifier
from skorch.callbacks import Callback
from skorch.dataset import Dataset, ValidSplit
from skorch.helper import predefined_split

from volsk import LocalVolumeEstimator
from volsk._inputs import resolve_model
from volsk.skorch import LocalVolume, dataset_inputs

EST = {"sigma": 1.0, "n_samples": 10, "random_state": 0}


class Logits(torch.nn.Module):
    def __init__(self, hidden=8, dropout=0.0):
        super().__init__()
        self.a = torch.nn.Linear(6, hidden)
        self.drop = torch.nn.Dropout(dropout)
        self.b = torch.nn.Linear(hidden, 3)

    def forward(self, X):
        return self.b(self.drop(torch.tanh(self.a(X))))


class Probabilities(torch.nn.Module):
    """The same function as Logits, ending in softmax (what skorch's default NLLLoss expects)."""

    def __init__(self, hidden=8):
        super().__init__()
        self.body = Logits(hidden)

    def forward(self, X):
        return torch.softmax(self.body(X), dim=-1)


def data(n=80):
    X, y = make_classification(n_samples=n, n_features=6, n_informative=4, n_classes=3,
                               random_state=0)
    return X.astype(np.float32), y.astype(np.int64)


def make_net(**kw):
    params = dict(module=Logits, criterion=torch.nn.CrossEntropyLoss, max_epochs=4, lr=0.1,
                  train_split=None, verbose=0)
    return NeuralNetClassifier(**(params | kw))


# ------------------------------------------------------------------------- nets as models
def test_fitted_net_is_estimated_through_its_module():
    X, y = data()
    net = make_net().fit(X, y)
    a = LocalVolumeEstimator(**EST).fit(net, X)
    b = LocalVolumeEstimator(**EST).fit(net.module_, X)
    np.testing.assert_array_equal(a.sample_log_volumes_, b.sample_log_volumes_)
    assert resolve_model(net, X).optimizer is net.optimizer_


def test_pipeline_transforms_X_before_the_net():
    X, y = data()
    pipe = Pipeline([("scale", StandardScaler()), ("net", make_net())]).fit(X * 4 + 3, y)
    raw = X * 4 + 3
    a = LocalVolumeEstimator(**EST).fit(pipe, raw)
    b = LocalVolumeEstimator(**EST).fit(pipe[-1], pipe[:-1].transform(raw))
    np.testing.assert_array_equal(a.sample_log_volumes_, b.sample_log_volumes_)
    c = LocalVolumeEstimator(**EST).fit(pipe[-1], raw)
    assert c.log_volume_ != a.log_volume_


def test_unfitted_net_and_pipeline_without_a_net_raise():
    X, y = data()
    with pytest.raises(ValueError, match="not fitted"):
        LocalVolumeEstimator(**EST).fit(make_net(), X)
    scaler_only = Pipeline([("scale", StandardScaler())]).fit(X)
    with pytest.raises(TypeError, match="last step"):
        LocalVolumeEstimator(**EST).fit(scaler_only, X)


def test_nll_net_ending_in_softmax_equals_cross_entropy_net_on_logits():
    X, y = data()
    ce = make_net().fit(X, y)
    nll = NeuralNetClassifier(Probabilities, max_epochs=1, train_split=None, verbose=0)
    nll.initialize()  # criterion: skorch's default NLLLoss
    assert isinstance(nll.criterion_, torch.nn.NLLLoss)
    nll.module_.body.load_state_dict(ce.module_.state_dict())
    np.testing.assert_allclose(nll.predict_proba(X), ce.predict_proba(X), atol=1e-6)
    assert resolve_model(nll, X).output == "probabilities"
    assert resolve_model(ce, X).output == "logits"
    on_logits = LocalVolumeEstimator(**EST).fit(ce, X).log_volume_
    on_probabilities = LocalVolumeEstimator(**EST).fit(nll, X).log_volume_
    assert on_probabilities == pytest.approx(on_logits, abs=1e-3)
    # reading softmax outputs as logits would be a different (wrong) neighbourhood
    misread = LocalVolumeEstimator(**EST, output="logits").fit(nll, X).log_volume_
    assert abs(misread - on_logits) > 1.0


def test_adam_preconditioner_reads_the_nets_optimizer():
    X, y = data()
    net = make_net(optimizer=torch.optim.Adam, lr=0.01).fit(X, y)
    a = LocalVolumeEstimator(**EST, preconditioner="adam").fit(net, X)
    b = LocalVolumeEstimator(**EST, preconditioner="adam").fit(net.module_, X,
                                                               optimizer=net.optimizer_)
    np.testing.assert_array_equal(a.sample_log_volumes_, b.sample_log_volumes_)
    naive = LocalVolumeEstimator(**EST).fit(net, X)
    assert not np.array_equal(a.sample_log_volumes_, naive.sample_log_volumes_)


# ------------------------------------------------------------------------------- the callback
def test_callback_records_every_n_epochs_what_the_estimator_gives():
    X, y = data()
    torch.manual_seed(0)
    vol = LocalVolume(every=2, sigma=1.0, n_samples=10, confidence=0.95)
    net = make_net(max_epochs=4, callbacks=[("vol", vol)]).fit(X, y)
    rows = net.history
    assert ["log_volume" in row for row in rows] == [False, True, False, True]
    for row in rows[1::2]:
        assert np.isfinite(row["log_volume"])
        assert row["log_volume_lower_bound"] == pytest.approx(row["log_volume"] + np.log(0.05))
    # the last record is the estimate of the final net on the training data, same seed
    final = LocalVolumeEstimator(**EST).fit(net, X)
    assert rows[-1]["log_volume"] == final.log_volume_
    assert vol.seed_ == 0


def _train(callbacks, random_state=0, **kw):
    """Train with dropout, shuffling and a validation split: every source of training RNG."""
    X, y = data(100)
    torch.manual_seed(123)
    np.random.seed(123)  # noqa: NPY002 - the global state is what the callback must not touch
    net = make_net(module__dropout=0.3, iterator_train__shuffle=True, max_epochs=3,
                   optimizer=torch.optim.Adam, lr=0.01, train_split=ValidSplit(5),
                   callbacks=callbacks, **kw)
    return net.fit(X, y), np.random.random()  # noqa: NPY002


def _assert_same_training(a, b, ignore=()):
    sa, sb = a.module_.state_dict(), b.module_.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    oa, ob = a.optimizer_.state_dict(), b.optimizer_.state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    for k in oa["state"]:
        for name, value in oa["state"][k].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(ob["state"][k][name]))
    skip = {"dur", *ignore}
    for ra, rb in zip(a.history, b.history, strict=True):
        keep = lambda row: {k: v for k, v in row.items() if k not in skip}  # noqa: E731
        assert keep(ra) == keep(rb)


@pytest.mark.parametrize("random_state", [0, None])
def test_callback_does_not_change_training(random_state):
    plain, after_plain = _train([])
    cb = LocalVolume(sigma=1.0, n_samples=8, random_state=random_state, confidence=0.9)
    watched, after_watched = _train([("vol", cb)])
    assert all(np.isfinite(row["log_volume"]) for row in watched.history)
    _assert_same_training(plain, watched, ignore=("log_volume", "log_volume_lower_bound"))
    assert after_plain == after_watched  # numpy's global stream continues where it would


def test_callback_seed_for_random_state_none_comes_from_numpys_global_state_untouched():
    np.random.seed(7)  # noqa: NPY002 - the global state is what None means, as in scikit-learn
    before = np.random.get_state()  # noqa: NPY002
    cb = LocalVolume(random_state=None).initialize()
    assert cb.seed_ == np.random.RandomState(7).randint(np.iinfo(np.int32).max)
    after = np.random.get_state()  # noqa: NPY002
    assert after[1].tolist() == before[1].tolist() and after[2:] == before[2:]
    assert LocalVolume(random_state=np.random.RandomState(7)).initialize().seed_ == cb.seed_
    assert LocalVolume(random_state=3).initialize().seed_ == 3


def test_training_comparison_detects_a_callback_that_draws_global_random_numbers():
    class Noisy(Callback):
        def on_epoch_end(self, net, **kwargs):
            torch.rand(1)

    plain, _ = _train([])
    noisy, _ = _train([("noisy", Noisy())])
    with pytest.raises(AssertionError):
        _assert_same_training(plain, noisy)


def test_callback_on_given_X_and_on_validation_data():
    X, y = data()
    Xv, yv = data(30)
    Xv = Xv[::-1].copy()
    net = make_net(
        max_epochs=1,
        train_split=predefined_split(Dataset(Xv, yv)),
        callbacks=[("on_valid", LocalVolume("valid", sigma=1.0, n_samples=10, name="vol_valid")),
                   ("on_X", LocalVolume(X[:20], sigma=1.0, n_samples=10, name="vol_X"))],
    ).fit(X, y)
    assert net.history[-1, "vol_valid"] == LocalVolumeEstimator(**EST).fit(net, Xv).log_volume_
    assert net.history[-1, "vol_X"] == LocalVolumeEstimator(**EST).fit(net, X[:20]).log_volume_
    with pytest.raises(ValueError, match="validation data"):
        make_net(max_epochs=1, callbacks=[LocalVolume("valid", n_samples=2)]).fit(X, y)


def test_dataset_inputs_of_subsets_and_plain_datasets():
    X, y = data(10)
    ds = Dataset(X, y)
    sub = torch.utils.data.Subset(ds, [3, 1, 7])
    np.testing.assert_array_equal(dataset_inputs(sub), X[[3, 1, 7]])
    tensors = torch.utils.data.TensorDataset(torch.as_tensor(X), torch.as_tensor(y))
    np.testing.assert_array_equal(dataset_inputs(tensors).numpy(), X)


def test_callback_params_are_grid_searchable_and_run_time_state_ends_in_underscore():
    X, y = data(60)
    cb = LocalVolume(sigma=1.0, n_samples=4, estimator_params={"rtol": 1e-2})
    net = make_net(max_epochs=2, callbacks=[("vol", cb)])
    net.set_params(callbacks__vol__every=2)  # before initialize: set on the callback itself
    assert cb.every == 2
    params = net.initialize().get_params()  # skorch lists callback params once initialized
    assert params["callbacks__vol__n_samples"] == 4 and params["callbacks__vol__every"] == 2
    net.set_params(callbacks__vol__cutoff=0.05)
    assert cb.cutoff == 0.05
    copy = clone(net)
    assert copy.get_params()["callbacks__vol__cutoff"] == 0.05
    assert copy.callbacks[0][1] is not cb
    net.fit(X, y)
    public = {k for k in vars(cb) if not k.endswith("_")}
    assert public == set(LocalVolume().get_params())
    assert set(vars(cb)) - public == {"seed_"}
    search = GridSearchCV(net, {"callbacks__vol__cutoff": [1e-2, 1e-1]}, cv=2,
                          error_score="raise").fit(X, y)
    best = search.best_estimator_
    assert np.isfinite(best.history[-1, "log_volume"])
    assert best.callbacks[0][1].cutoff == search.best_params_["callbacks__vol__cutoff"]
    back = pickle.loads(pickle.dumps(best))
    assert back.history[-1, "log_volume"] == best.history[-1, "log_volume"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"every": 0}, "every"),
        ({"X": "test"}, "X"),
        ({"confidence": 1.0}, "confidence"),
        ({"random_state": "seed"}, "random_state"),
        ({"estimator_params": {"cutoff": 1.0}}, "repeats"),
        ({"estimator_params": {"rtoll": 1.0}}, "rtoll"),
        ({"cutoff": -1.0}, "cutoff"),
    ],
)
def test_callback_rejects_bad_parameters_before_training(kwargs, match):
    X, y = data(20)
    net = make_net(max_epochs=1, callbacks=[LocalVolume(**({"n_samples": 2} | kwargs))])
    with pytest.raises((ValueError, TypeError), match=match):
        net.fit(X, y)
    assert not net.history or "log_volume" not in net.history[-1]
