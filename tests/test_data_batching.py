"""X in batches (data_batch_size, DataLoader) gives the full-batch answer."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from volsk import LocalVolumeEstimator


def mlp_and_data():
    gen = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 4))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.6)
    X = torch.randn(50, 6, generator=gen)
    y = torch.randint(0, 4, (50,), generator=gen)
    return net.double(), X.double(), y


class TinyLM(torch.nn.Module):
    """Token embedding, a causal running mean, a vocabulary head: outputs (N, T, V)."""

    def __init__(self, vocab=7, width=5):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None]
        return self.head(torch.tanh(h.cumsum(1) / steps))


def fit(model, X, y=None, **kw):
    params = {"sigma": 0.5, "n_samples": 12, "random_state": 0, "rtol": 1e-6} | kw
    return LocalVolumeEstimator(**params).fit(model, X, y)


@pytest.mark.parametrize("cost", ["kl", "mse", "cross_entropy"])
def test_data_batch_size_gives_the_full_batch_samples(cost):
    net, X, y = mlp_and_data()
    full = fit(net, X, y, cost=cost)
    batched = fit(net, X, y, cost=cost, data_batch_size=16)  # 16+16+16+2: unequal batches
    np.testing.assert_allclose(batched.sample_log_volumes_, full.sample_log_volumes_,
                               rtol=0, atol=1e-6)


def test_dataloader_gives_the_full_batch_samples():
    net, X, y = mlp_and_data()
    full = fit(net, X, y, cost="cross_entropy")
    loader = DataLoader(TensorDataset(X, y), batch_size=20, shuffle=False)
    batched = fit(net, loader, cost="cross_entropy")
    np.testing.assert_allclose(batched.sample_log_volumes_, full.sample_log_volumes_,
                               rtol=0, atol=1e-6)
    loader_x = DataLoader(X, batch_size=7)
    np.testing.assert_allclose(fit(net, loader_x).sample_log_volumes_,
                               fit(net, X).sample_log_volumes_, rtol=0, atol=1e-6)


def test_masked_sequence_cost_over_batches_is_the_token_weighted_mean():
    torch.manual_seed(0)
    lm = TinyLM().double()
    ids = torch.randint(0, 7, (9, 6))
    mask = torch.ones(9, 6, dtype=torch.long)
    mask[:4, 3:] = 0  # unequal numbers of real tokens per batch
    full = LocalVolumeEstimator(sigma=0.5, n_samples=8, random_state=0, rtol=1e-6).fit(
        lm, ids, attention_mask=mask)
    batched = LocalVolumeEstimator(sigma=0.5, n_samples=8, random_state=0, rtol=1e-6,
                                   data_batch_size=4).fit(lm, ids, attention_mask=mask)
    np.testing.assert_allclose(batched.sample_log_volumes_, full.sample_log_volumes_,
                               rtol=0, atol=1e-6)
    # a dict DataLoader in Hugging Face style carries the mask itself
    rows = [{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(9)]
    loader = DataLoader(rows, batch_size=4)
    from_loader = LocalVolumeEstimator(sigma=0.5, n_samples=8, random_state=0,
                                       rtol=1e-6).fit(lm, loader)
    np.testing.assert_allclose(from_loader.sample_log_volumes_, full.sample_log_volumes_,
                               rtol=0, atol=1e-6)


def test_dataloader_with_labels_and_explicit_y_raises():
    net, X, y = mlp_and_data()
    loader = DataLoader(TensorDataset(X, y), batch_size=20)
    with pytest.raises(ValueError, match="DataLoader"):
        fit(net, loader, y)


def test_flat_parameters_are_found_across_batches():
    net, X, _ = mlp_and_data()
    X = X.clone()
    X[:, 3] = 0.0
    full = fit(net, X)
    batched = fit(net, X, data_batch_size=8)
    assert len(full.flat_parameters_) == 12
    assert batched.flat_parameters_ == full.flat_parameters_
