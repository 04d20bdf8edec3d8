"""Priors read off the model's own initialisation: sigma="init" and bounds="init"."""

import math
import warnings

import numpy as np
import pytest
import torch

from volsk import LocalVolumeEstimator
from volsk._evaluate import ParameterSpace
from volsk.measures import Gaussian, MeasureContext, Uniform
from volsk.priors import InitPriorWarning, init_prior, init_spread


def context(model):
    space = ParameterSpace.of(model)
    params = dict(model.named_parameters())
    theta = torch.cat([params[k].detach().reshape(-1).double() for k in space.names])
    return MeasureContext(theta, torch.ones(theta.numel(), dtype=torch.bool), space, model)


@pytest.mark.parametrize("fan_in", [3, 64, 300])
def test_sigma_init_for_linear_matches_its_uniform_init(fan_in):
    # nn.Linear(fan_in, ·) draws weight and bias from U(−1/√fan_in, 1/√fan_in): std 1/√(3·fan_in)
    layer = torch.nn.Linear(fan_in, 8)
    gaussian = init_prior(layer, "gaussian")
    uniform = init_prior(layer, "uniform")
    for name in ("weight", "bias"):
        assert gaussian.spread[name] == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.02)
        assert uniform.spread[name] == pytest.approx(1 / math.sqrt(fan_in), rel=0.02)
        assert torch.equal(gaussian.mean[name], torch.zeros(layer.get_parameter(name).shape,
                                                             dtype=torch.float64))
    assert gaussian.constant == []
    spread = init_spread(context(layer), "gaussian")  # one entry per coordinate
    assert spread.shape == (8 * fan_in + 8,)
    assert float(spread[0]) == gaussian.spread["weight"]
    assert float(spread[-1]) == gaussian.spread["bias"]


def test_sigma_init_in_the_estimator_equals_the_per_tensor_dict():
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    X = torch.randn(30, 4)
    prior = init_prior(net, "gaussian")
    by_init = LocalVolumeEstimator(sigma="init", n_samples=5, random_state=0).fit(net, X)
    by_dict = LocalVolumeEstimator(sigma=prior.spread, n_samples=5, random_state=0).fit(net, X)
    np.testing.assert_array_equal(by_init.sample_log_volumes_, by_dict.sample_log_volumes_)
    # different tensors get different spreads: fan_in 4 and fan_in 16
    assert prior.spread["0.weight"] == pytest.approx(2 * prior.spread["2.weight"], rel=0.03)


class LinearNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)
        self.norm = torch.nn.LayerNorm(6)

    def forward(self, x):
        return self.norm(self.lin(x))


def test_constant_initialised_tensors_warn_and_are_centred_on_their_init_value():
    model = LinearNorm()
    with pytest.warns(InitPriorWarning, match=r"2 parameter tensor.*norm\.weight, norm\.bias"):
        prior = init_prior(model, "gaussian")
    assert prior.constant == ["norm.weight", "norm.bias"]
    typical = float(np.median([prior.spread["lin.weight"], prior.spread["lin.bias"]]))
    assert prior.floor == pytest.approx(typical)
    assert prior.spread["norm.weight"] == prior.spread["norm.bias"] == prior.floor
    assert torch.equal(prior.mean["norm.weight"], torch.ones(6, dtype=torch.float64))
    assert torch.equal(prior.mean["norm.bias"], torch.zeros(6, dtype=torch.float64))

    # the measures use that mean by default ("auto"), and 0 when asked
    ctx = context(model)
    with pytest.warns(InitPriorWarning):
        mean = Gaussian(sigma="init").resolve_mean(ctx)
    torch.testing.assert_close(mean[42:48], torch.ones(6, dtype=torch.float64))
    assert float(Gaussian(sigma="init", mean=0.0).resolve_mean(ctx).abs().max()) == 0.0
    with pytest.warns(InitPriorWarning):
        half = Uniform(bounds="init").resolve_bounds(ctx)
    assert float(half[42]) == pytest.approx(math.sqrt(3) * prior.floor)
    assert float(Uniform(bounds=0.1).resolve_mean(ctx).abs().max()) == 0.0


def test_uniform_init_prior_runs_end_to_end_with_layernorm_centred_on_one():
    torch.manual_seed(1)
    model = torch.nn.Sequential(LinearNorm(), torch.nn.Linear(6, 3))
    X = torch.randn(20, 6)
    with pytest.warns(InitPriorWarning):
        est = LocalVolumeEstimator(measure="uniform", n_samples=10, random_state=0).fit(model, X)
    assert np.isfinite(est.log_volume_) and est.log_volume_ < 0


def test_random_init_with_nonzero_mean_keeps_it_and_zero_mean_snaps_to_zero():
    class Shifted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.empty(50))
            self.offset = torch.nn.Parameter(torch.empty(50))
            self.reset_parameters()

        def reset_parameters(self):
            torch.nn.init.normal_(self.scale, 1.0, 0.02)  # the DCGAN BatchNorm init
            torch.nn.init.normal_(self.offset, 0.0, 0.02)

    prior = init_prior(Shifted(), "gaussian")
    assert float(prior.mean["scale"][0]) == pytest.approx(1.0, abs=1e-3)
    assert prior.spread["scale"] == pytest.approx(0.02, rel=0.02)
    assert float(prior.mean["offset"].abs().max()) == 0.0
    assert prior.spread["offset"] == pytest.approx(0.02, rel=0.02)


def test_parent_reset_has_the_last_word_as_in_construction():
    # MultiheadAttention re-initialises in_proj (xavier) and zeroes out_proj.bias after its
    # out_proj Linear was built with PyTorch's default init
    mha = torch.nn.MultiheadAttention(16, 2)
    with pytest.warns(InitPriorWarning, match="in_proj_bias, out_proj.bias"):
        prior = init_prior(mha, "gaussian")
    assert prior.constant == ["in_proj_bias", "out_proj.bias"]
    # xavier_uniform on (3E, E): bound √(6/(4E)), std √(1/(2E))
    assert prior.spread["in_proj_weight"] == pytest.approx(math.sqrt(1 / 32), rel=0.02)
    assert prior.spread["out_proj.weight"] == pytest.approx(1 / math.sqrt(3 * 16), rel=0.02)


def test_parameter_that_no_initialiser_writes_raises_naming_it():
    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)
            self.temperature = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            return self.lin(x) / self.temperature

    with pytest.raises(ValueError, match=r"\['temperature'\].*reset_parameters"):
        init_prior(Custom(), "gaussian")
    with pytest.raises(ValueError, match="temperature"):
        LocalVolumeEstimator(sigma="init", n_samples=2).fit(Custom(), torch.randn(5, 3))


def test_model_and_global_rng_are_untouched_and_frozen_parameters_skipped():
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5),
                                torch.nn.Linear(5, 2)).train()
    model[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InitPriorWarning)
        prior = init_prior(model, "uniform")
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training and not model[0].weight.requires_grad
    assert "0.weight" not in prior.spread
    assert list(prior.spread) == ["0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]
    assert init_prior(model, "uniform", warn=False).spread == prior.spread  # deterministic


def test_hugging_face_model_uses_its_own_init_even_when_marked_loaded():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTNeoXConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=8, initializer_range=0.05,
    )
    model = transformers.GPTNeoXForCausalLM(config)
    for p in model.parameters():  # what from_pretrained leaves behind: "do not re-initialise"
        p._is_hf_initialized = True
    with pytest.warns(InitPriorWarning, match="layernorm"):
        prior = init_prior(model, "gaussian")
    # nn.Linear inside a PreTrainedModel is N(0, initializer_range²), not PyTorch's default
    matrices = [k for k, p in model.named_parameters() if p.ndim == 2]
    assert len(matrices) == 6  # embeddings, attention, MLP and the output layer
    for name in matrices:
        assert prior.spread[name] == pytest.approx(0.05, rel=0.02), name
    assert torch.equal(prior.mean["gpt_neox.final_layer_norm.weight"],
                       torch.ones(16, dtype=torch.float64))
    assert prior.floor == pytest.approx(0.05, rel=0.02)


# ------------------------------------------------------------------ thread safety, RNG state


def _thread_models():
    torch.manual_seed(5)
    return [
        torch.nn.Linear(3, 2),
        torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)),
        LinearNorm(),
        torch.nn.Sequential(torch.nn.Conv1d(2, 3, 3), torch.nn.Flatten(), torch.nn.Linear(6, 2)),
    ]


def _in_threads(fn, items):
    """fn(item) for every item, each in its own thread, all started together."""
    import threading

    results = [None] * len(items)
    errors = []
    barrier = threading.Barrier(len(items))

    def run(i):
        try:
            barrier.wait()
            results[i] = fn(items[i])
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _prior_values(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InitPriorWarning)
        prior = init_prior(model, "gaussian", min_values=5000)
    return prior.spread, {k: v.clone() for k, v in prior.mean.items()}


def test_init_priors_computed_in_threads_equal_sequential_ones():
    # the re-initialisations draw from torch's random functions: in threads sharing one global
    # generator they would interleave their draws and every prior would come out wrong
    models = _thread_models()
    sequential = [_prior_values(m) for m in models]
    for _ in range(2):
        concurrent = _in_threads(_prior_values, models)
        for (spread, mean), (ref_spread, ref_mean) in zip(concurrent, sequential):
            assert spread == ref_spread
            assert mean.keys() == ref_mean.keys()
            for k in mean:
                assert torch.equal(mean[k], ref_mean[k]), k
    assert _prior_values(models[1])[0] == sequential[1][0]  # and again, after the threads


def test_fits_with_init_priors_in_threads_equal_sequential_fits():
    torch.manual_seed(0)
    X = torch.randn(24, 4)
    models = [torch.nn.Sequential(torch.nn.Linear(4, h), torch.nn.Tanh(), torch.nn.Linear(h, 3))
              for h in (5, 7, 9)]

    def fit(args):
        model, measure = args
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InitPriorWarning)
            est = LocalVolumeEstimator(measure=measure, sigma="init", n_samples=6,
                                       random_state=0)
            return est.fit(model, X).sample_log_volumes_

    jobs = [(m, measure) for m in models for measure in ("gaussian", "uniform")]
    sequential = [fit(job) for job in jobs]
    concurrent = _in_threads(fit, jobs)
    for got, ref in zip(concurrent, sequential):
        np.testing.assert_array_equal(got, ref)


def test_sweep_with_init_priors_under_the_threading_backend_equals_a_sequential_sweep():
    import joblib

    import volsk

    torch.manual_seed(0)
    X = torch.randn(24, 4)
    models = {h: torch.nn.Sequential(torch.nn.Linear(4, h), torch.nn.Tanh(),
                                     torch.nn.Linear(h, 3)) for h in (5, 7, 9)}
    grid = {"measure": ["gaussian", "uniform"], "sigma": ["init"], "n_samples": [6]}
    sequential = volsk.sweep(models, X, grid, n_jobs=1)
    with joblib.parallel_config(backend="threading"):
        threaded = volsk.sweep(models, X, grid, n_jobs=6)
    assert len(threaded) == 6
    np.testing.assert_array_equal(threaded["log_volume"], sequential["log_volume"])


def test_init_priors_neither_read_nor_write_the_global_generators():
    # a thread drawing from torch's global generator while priors are computed elsewhere gets
    # the numbers it would get alone, and the caller's generator states are as they were
    torch.manual_seed(123)
    expected = torch.rand(3000)
    models = _thread_models()
    np.random.seed(7)  # noqa: NPY002 - the global state is what is checked
    np_state = np.random.get_state()  # noqa: NPY002

    def work(i):
        if i == 0:
            torch.manual_seed(123)
            return torch.cat([torch.rand(1) for _ in range(3000)])
        return _prior_values(models[i - 1])

    results = _in_threads(work, list(range(len(models) + 1)))
    assert torch.equal(results[0], expected)
    rng = torch.get_rng_state()
    _prior_values(models[0])
    assert torch.equal(torch.get_rng_state(), rng)
    after = np.random.get_state()  # noqa: NPY002
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1])
    assert after[2:] == np_state[2:]


def test_fit_with_sigma_init_leaves_global_rng_states_as_they_were():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    X = torch.randn(10, 3)
    torch.manual_seed(11)
    np.random.seed(11)  # noqa: NPY002 - the global state is what is checked
    rng, np_state = torch.get_rng_state(), np.random.get_state()  # noqa: NPY002
    first = LocalVolumeEstimator(sigma="init", n_samples=4, random_state=0).fit(net, X)
    assert torch.equal(torch.get_rng_state(), rng)
    after = np.random.get_state()  # noqa: NPY002
    assert np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    second = LocalVolumeEstimator(sigma="init", n_samples=4, random_state=0).fit(net, X)
    np.testing.assert_array_equal(first.sample_log_volumes_, second.sample_log_volumes_)


def test_init_prior_draws_through_random_functions_without_a_generator_argument():
    # torch.randn/randperm without generator= resolve to kernels that take none: their draws
    # are routed through the prior's own stream as well
    class Permuted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.empty(40))
            self.reset_parameters()

        def reset_parameters(self):
            with torch.no_grad():
                self.weight.copy_(torch.randn(40)[torch.randperm(40)] * 0.3)

    models = [Permuted() for _ in range(4)]  # constructing draws from the global generator
    rng = torch.get_rng_state()
    first = init_prior(models[0], "gaussian")
    assert torch.equal(torch.get_rng_state(), rng)
    assert first.spread["weight"] == pytest.approx(0.3, rel=0.02)
    results = _in_threads(lambda m: init_prior(m, "gaussian").spread, models[1:])
    assert all(r == first.spread for r in results)
