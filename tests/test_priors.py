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
