"""
A tiny causal language model with padding masks
===============================================

volsk takes Hugging Face models as they are: a model whose output has ``.logits`` of shape
(N, T, V) gets the KL cost averaged over tokens, and ``fit(model, input_ids,
attention_mask=mask)`` passes the mask to the model's forward *and* leaves the padded tokens
out of the cost.

The model is a two-layer GPT-NeoX built from a config (hidden size 32, a 16-token vocabulary:
nothing is downloaded), trained for a few seconds to continue arithmetic sequences
(3, 5, 7, 9, … modulo 16) of different lengths, right-padded. The prior is the model's own
initialisation (``sigma="init"``): what a freshly initialised network would be, drawn at
random.
"""

# %%
# Data and model
# --------------
import warnings

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from volsk import LocalVolumeEstimator
from volsk.priors import InitPriorWarning, init_prior
from volsk.results import LowEffectiveSampleSizeWarning

torch.set_num_threads(1)  # small operations on a shared CPU: one thread is fastest
# ESS ≈ 1 is expected in thousands of dimensions (the quickstart explains why):
# the warning that says so after every fit is switched off here
warnings.filterwarnings("ignore", category=LowEffectiveSampleSizeWarning)

VOCAB, T = 16, 12


def sequences(n, generator):
    """Arithmetic sequences mod VOCAB, 6 to T tokens long, right-padded, with their masks."""
    start = torch.randint(0, VOCAB, (n, 1), generator=generator)
    step = torch.randint(1, 4, (n, 1), generator=generator)
    ids = (start + step * torch.arange(T)) % VOCAB
    lengths = torch.randint(6, T + 1, (n,), generator=generator)
    mask = (torch.arange(T) < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64,
                       max_position_embeddings=T, hidden_dropout=0.0, attention_dropout=0.0)
torch.manual_seed(0)
model = GPTNeoXForCausalLM(config)
print(f"{sum(p.numel() for p in model.parameters()):,} parameters")

gen = torch.Generator().manual_seed(0)
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
model.train()
for _ in range(150):
    ids, mask = sequences(32, gen)
    labels = ids.masked_fill(mask == 0, -100)  # padded positions carry no loss
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
print(f"final training loss {loss.item():.3f} nats per token")

# %%
# Estimate
# --------
# The neighbourhood is defined on 64 held-out sequences. ``sigma="init"`` re-initialises
# copies of the model to read off each tensor's prior: N(0, 0.02²) for Hugging Face's linear
# and embedding weights; LayerNorm weights are initialised to the constant 1, so their prior
# is centred on 1 with the median spread of the random tensors (volsk warns about that; we
# have read the warning).
#
# The estimate is naive (no preconditioner). The probability is tiny mostly because training
# moved the weights far out of the narrow initialisation prior: the radial integral carries a
# factor e^(−c/2), c = Σ (θᵢ − mᵢ)²/σᵢ² (printed below, from the same prior) — the size of
# the neighbourhood accounts for the rest.
X, mask = sequences(64, torch.Generator().manual_seed(1))
est = LocalVolumeEstimator(cutoff=1e-2, sigma="init", n_samples=60, random_state=0)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", InitPriorWarning)
    est.fit(model, X, attention_mask=mask)
print(f"log-volume {est.log_volume_:,.1f} nats = {est.bits_:,.0f} bits "
      f"({est.n_parameters_:,} parameters, {len(est.flat_parameters_)} flat)")
prior = init_prior(model, warn=False)  # what sigma="init" measures with
c = sum((((p.detach().double() - prior.mean[name]) / prior.spread[name]) ** 2).sum().item()
        for name, p in model.named_parameters())
print(f"distance term c/2 = {c / 2:,.0f} nats")
summary = est.samples_.describe().loc[["mean", "min", "max"]]
summary[["log_volume", "radius", "evaluations"]].round(2)

# %%
# The mask matters
# ----------------
# Padded positions are not text: with the mask, what the model predicts after a sequence ends
# is ignored; without it, those positions count in the cost as if they were text. The same
# directions (``random_state=0``), the same model:
unmasked = LocalVolumeEstimator(cutoff=1e-2, sigma="init", n_samples=60, random_state=0)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", InitPriorWarning)
    unmasked.fit(model, X)
print(f"with the mask {est.log_volume_:,.1f} nats; "
      f"without it {unmasked.log_volume_:,.1f} nats")

# %%
# Other ways in: ``X`` may be a dict of tensors, passed to the model as keyword arguments
# (``{"input_ids": X, "attention_mask": mask}``: its ``attention_mask`` also masks the cost),
# or a non-shuffling ``torch.utils.data.DataLoader`` of such dicts. For longer texts,
# ``data_batch_size`` splits X into batches per forward pass without changing the cost.
