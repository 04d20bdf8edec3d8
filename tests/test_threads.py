"""torch's intra-op threads inside fit: the n_threads parameter and the caller's setting."""

import threading

import numpy as np
import pytest
import torch

from volsk import LocalVolumeEstimator
from volsk._threads import AUTO_MAX_PARAMETERS, fit_threads, resolve_n_threads

CALLERS = 3  # a thread count no test would pick by accident


@pytest.fixture
def callers_threads():
    """The caller runs torch with CALLERS threads; the suite's setting is put back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(CALLERS)
    yield CALLERS
    torch.set_num_threads(before)


def small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


X = torch.linspace(-1, 1, 64).reshape(16, 4)


def recording_kl(seen):
    """A KL cost that records the thread count it runs under."""

    def cost(outputs, anchor):
        seen.add(torch.get_num_threads())
        log_p = torch.log_softmax(anchor, -1)
        return (log_p.exp() * (log_p - torch.log_softmax(outputs, -1))).sum(-1).mean()

    return cost


def test_fit_runs_small_models_on_one_thread_and_restores_the_callers(callers_threads):
    seen = set()
    est = LocalVolumeEstimator(sigma=1.0, n_samples=4, random_state=0, cost=recording_kl(seen))
    est.fit(small_net(), X)
    assert seen == {1}
    assert torch.get_num_threads() == callers_threads


@pytest.mark.parametrize("n_threads, inside", [(2, 2), (None, CALLERS)])
def test_fit_uses_the_threads_asked_for(callers_threads, n_threads, inside):
    seen = set()
    LocalVolumeEstimator(sigma=1.0, n_samples=4, random_state=0, cost=recording_kl(seen),
                         n_threads=n_threads).fit(small_net(), X)
    assert seen == {inside}
    assert torch.get_num_threads() == callers_threads


def test_partial_fit_restores_the_callers_setting(callers_threads):
    seen = set()
    est = LocalVolumeEstimator(sigma=1.0, n_samples=4, random_state=0, cost=recording_kl(seen))
    net = small_net()
    est.fit(net, X)
    est.set_params(n_threads=2)  # the thread count does not change the question
    est.partial_fit(net, X, n_samples=4)
    assert seen == {1, 2}
    assert torch.get_num_threads() == callers_threads


def test_callers_setting_is_restored_when_fit_raises(callers_threads):
    def failing(outputs, anchor):
        assert torch.get_num_threads() == 1
        raise ValueError("cost failed")

    est = LocalVolumeEstimator(sigma=1.0, n_samples=4, random_state=0, cost=failing)
    with pytest.raises(ValueError, match="cost failed"):
        est.fit(small_net(), X)
    assert torch.get_num_threads() == callers_threads


def test_callers_setting_is_restored_after_a_keyboard_interrupt(callers_threads):
    def interrupted(outputs, anchor):
        raise KeyboardInterrupt

    est = LocalVolumeEstimator(sigma=1.0, n_samples=4, random_state=0, cost=interrupted,
                               n_threads=1)
    with pytest.raises(KeyboardInterrupt):
        est.fit(small_net(), X)
    assert torch.get_num_threads() == callers_threads


def test_one_thread_gives_bit_identical_estimates(callers_threads):
    net = small_net()
    fits = [LocalVolumeEstimator(sigma=1.0, n_samples=12, random_state=0, n_threads=n)
            .fit(net, X) for n in ("auto", 1, 2, None)]
    for est in fits[1:]:
        np.testing.assert_array_equal(est.sample_log_volumes_, fits[0].sample_log_volumes_)
        assert est.log_volume_ == fits[0].log_volume_


@pytest.mark.parametrize("bad", [0, -1, 1.5, "many", "1"])
def test_bad_n_threads_raises_naming_it(bad):
    with pytest.raises(ValueError, match="n_threads"):
        LocalVolumeEstimator(sigma=1.0, n_samples=2, n_threads=bad).fit(small_net(), X)


@pytest.mark.parametrize("bad", [0, -2, True, 2.0, "all"])
def test_resolve_n_threads_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="n_threads"):
        resolve_n_threads(bad, 10)


def test_auto_is_one_thread_below_the_threshold_and_torchs_above():
    assert resolve_n_threads("auto", 0) == 1
    assert resolve_n_threads("auto", AUTO_MAX_PARAMETERS - 1) == 1
    assert resolve_n_threads("auto", AUTO_MAX_PARAMETERS) is None
    assert resolve_n_threads("auto", None) is None
    assert resolve_n_threads(None, 10) is None


def test_concurrent_fits_give_each_calling_thread_its_setting_back(callers_threads):
    """Fits in two threads of one process (joblib's threading backend), overlapping in time."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        torch.set_num_threads(2)  # this caller's own setting
        with fit_threads(1):
            a_in.set()
            b_in.wait(10)
        seen["first after"] = torch.get_num_threads()
        a_out.set()

    def second():
        torch.set_num_threads(4)
        a_in.wait(10)
        with fit_threads(1):
            b_in.set()
            a_out.wait(10)
            seen["second inside, first ended"] = torch.get_num_threads()
        seen["second after"] = torch.get_num_threads()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == {"first after": 2, "second inside, first ended": 1, "second after": 4}
    assert torch.get_num_threads() == callers_threads
