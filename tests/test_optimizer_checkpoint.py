"""The "adam" preconditioners from an optimizer state on disk (a Trainer checkpoint's file)."""

import copy
import importlib.util
import json

import numpy as np
import pytest
import torch
from torch import nn

from models import trained
from volsk import LocalVolumeEstimator
from volsk._evaluate import FunctionalModel
from volsk.cli import main
from volsk.costs import make_cost
from volsk.preconditioners import Adam, PreconditionerContext
from volsk.preconditioners.curvature.optimizer_state import (
    in_model_order,
    load_optimizer_state,
)

transformers = pytest.importorskip("transformers")

VOCAB = 97
TOKENS = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))


def tiny_gpt_neox():
    config = transformers.GPTNeoXConfig(hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=64,
                                        vocab_size=VOCAB)
    torch.manual_seed(0)
    return transformers.GPTNeoXForCausalLM(config)


def trainer_param_groups(model, weight_decay=0.1):
    """The two param groups Trainer.create_optimizer builds, from Trainer's own decay rule."""
    decay = transformers.Trainer.get_decay_parameter_names(None, model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]


def train_language_model(model, optimizer, steps=2):
    model.train()
    for step in range(steps):
        batch = TOKENS[2 * (step % 2): 2 * (step % 2) + 2]
        optimizer.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
    model.eval()


def snapshot(model):
    return copy.deepcopy(model.state_dict()), model.training


def assert_untouched(model, before):
    state, training = before
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state) and model.training == training


def curvature(model, X, optimizer, moment=2):
    ev = FunctionalModel(model, X, "cpu")
    ctx = PreconditionerContext(ev, make_cost("kl", ev.anchor_outputs()),
                                torch.ones(ev.space.n, dtype=torch.bool), user_module=model,
                                optimizer=optimizer)
    return Adam(moment=moment).curvature(ctx)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny GPT-NeoX trained 2 steps by AdamW on Trainer's two param groups, its
    optimizer.pt saved in a checkpoint folder as Trainer saves it."""
    model = tiny_gpt_neox()
    optimizer = torch.optim.AdamW(trainer_param_groups(model), lr=1e-3)
    train_language_model(model, optimizer)
    folder = tmp_path_factory.mktemp("run") / "checkpoint-2"
    folder.mkdir()
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    return model, optimizer, folder


def test_trainer_groups_are_not_in_model_order(checkpoint):
    model, optimizer, _ = checkpoint
    first_bias = next(i for i, (n, _) in enumerate(model.named_parameters()) if "bias" in n)
    in_groups = [p for g in optimizer.param_groups for p in g["params"]]
    assert in_groups[first_bias] is not list(model.parameters())[first_bias]


@pytest.mark.parametrize("moment", [2, 1])
def test_trainer_checkpoint_gives_the_live_optimizers_curvature_exactly(checkpoint, moment):
    model, optimizer, folder = checkpoint
    live = curvature(model, TOKENS, optimizer, moment)
    for saved in (str(folder / "optimizer.pt"), folder / "optimizer.pt", folder,
                  load_optimizer_state(folder / "optimizer.pt")):
        assert torch.equal(curvature(model, TOKENS, saved, moment), live)


def test_fit_with_an_optimizer_path_equals_the_fit_with_the_live_optimizer(checkpoint):
    model, optimizer, folder = checkpoint
    before = snapshot(model)
    settings = dict(sigma=0.5, n_samples=3, preconditioner_eps=1e-3, random_state=0)
    live = LocalVolumeEstimator(preconditioner="adam", **settings).fit(model, TOKENS,
                                                                      optimizer=optimizer)
    path = str(folder / "optimizer.pt")
    by_fit = LocalVolumeEstimator(preconditioner="adam", **settings).fit(model, TOKENS,
                                                                        optimizer=path)
    by_object = LocalVolumeEstimator(preconditioner=Adam(optimizer=path), **settings).fit(
        model, TOKENS)
    assert by_fit.log_volume_ == live.log_volume_ == by_object.log_volume_
    np.testing.assert_array_equal(by_fit.sample_log_volumes_, live.sample_log_volumes_)
    assert_untouched(model, before)


def test_cli_reads_a_trainer_checkpoint_folder_and_its_optimizer(checkpoint, tmp_path, capsys):
    model, optimizer, folder = checkpoint
    model.save_pretrained(tmp_path / "checkpoint")
    torch.save(TOKENS, tmp_path / "tokens.pt")
    main(["estimate", str(tmp_path / "checkpoint"), str(tmp_path / "tokens.pt"),
          "--preconditioner", "adam", "--optimizer-state", str(folder / "optimizer.pt"),
          "--sigma", "0.5", "--n-samples", "3", "--preconditioner-eps", "1e-3", "--json"])
    row = json.loads(capsys.readouterr().out)
    est = LocalVolumeEstimator(sigma=0.5, n_samples=3, preconditioner="adam",
                               preconditioner_eps=1e-3, random_state=0)
    assert row["log_volume"] == est.fit(model, TOKENS, optimizer=optimizer).log_volume_


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                    reason="transformers.Trainer needs accelerate")
def test_a_real_trainer_checkpoint(tmp_path):
    model = tiny_gpt_neox()
    data = [{"input_ids": t, "labels": t} for t in TOKENS]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
        save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, learning_rate=1e-3,
        weight_decay=0.1, logging_strategy="no", disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    model.eval()
    live = curvature(model, TOKENS, trainer.optimizer)
    assert torch.equal(curvature(model, TOKENS, str(tmp_path / "checkpoint-2")), live)


# ------------------------------------------------------------------ plain torch optimizers


class Gated(nn.Module):
    """A 1-d decayed gain beside same-shaped biases and norm weights: Trainer's groups can be
    interleaved back in four ways by shape."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 4)
        self.gain = nn.Parameter(torch.ones(4))
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(self.fc(x) * self.gain)


def test_plain_adam_state_dict_on_disk_equals_the_live_optimizer(tmp_path):
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.99))
    X = trained(model, optimizer)
    torch.save(optimizer.state_dict(), tmp_path / "adam.pt")
    for moment in (2, 1):
        assert torch.equal(curvature(model, X, tmp_path / "adam.pt", moment),
                           curvature(model, X, optimizer, moment))


def test_a_state_file_is_memory_mapped_and_the_legacy_format_still_read(tmp_path, monkeypatch):
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    X = trained(model, optimizer)
    torch.save(optimizer.state_dict(), tmp_path / "zip.pt")
    torch.save(optimizer.state_dict(), tmp_path / "legacy.pt",
               _use_new_zipfile_serialization=False)
    calls = []
    load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("mmap", False))
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    live = curvature(model, X, optimizer, 2)
    assert torch.equal(curvature(model, X, tmp_path / "zip.pt", 2), live)
    assert calls == [True]  # mapped: only exp_avg_sq is paged in
    assert torch.equal(curvature(model, X, tmp_path / "legacy.pt", 2), live)
    assert calls == [True, True, False]  # the legacy format cannot be mapped: read whole


def test_ambiguous_shapes_are_decided_by_trainers_grouping(tmp_path):
    model = Gated()
    decay = transformers.Trainer.get_decay_parameter_names(None, model)
    assert sorted(decay) == ["fc.weight", "gain"]
    optimizer = torch.optim.AdamW(trainer_param_groups(model), lr=1e-2)
    X = trained(model, optimizer)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    assert torch.equal(curvature(model, X, tmp_path / "optimizer.pt"),
                       curvature(model, X, optimizer))
    # the same shapes in groups Trainer would not make: refused, never guessed
    other = torch.optim.AdamW([{"params": [model.fc.weight, model.fc.bias]},
                               {"params": [model.gain, *model.norm.parameters()],
                                "weight_decay": 0.0}], lr=1e-2)
    trained(model, other, steps=1)
    with pytest.raises(ValueError, match="more than one way.*named_parameters"):
        in_model_order(other.state_dict(), model)


def test_named_parameter_state_is_mapped_by_name_in_any_order(tmp_path):
    model = Gated()
    optimizer = torch.optim.Adam(list(model.named_parameters())[::-1], lr=1e-2)
    X = trained(model, optimizer)
    assert optimizer.state_dict()["param_groups"][0]["param_names"][0] == "norm.bias"
    torch.save(optimizer.state_dict(), tmp_path / "named.pt")
    assert torch.equal(curvature(model, X, tmp_path / "named.pt"),
                       curvature(model, X, optimizer))
    other = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="names parameters the model does not have"):
        curvature(other, X, tmp_path / "named.pt")


def test_bad_files_are_refused_with_their_path(tmp_path):
    model = nn.Linear(3, 2)
    X = torch.randn(4, 3)
    with pytest.raises(ValueError, match="'.*missing.pt' does not exist"):
        curvature(model, X, str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="has no optimizer.pt"):
        curvature(model, X, tmp_path)
    torch.save({"weights": torch.ones(2)}, tmp_path / "not_optimizer.pt")
    with pytest.raises(ValueError, match="must be an optimizer state_dict"):
        curvature(model, X, tmp_path / "not_optimizer.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read optimizer state"):
        curvature(model, X, tmp_path / "garbage.pt")
    other = nn.Linear(5, 2)
    optimizer = torch.optim.Adam([{"params": [other.weight]}, {"params": [other.bias]}])
    trained_other = torch.randn(4, 5)
    optimizer.zero_grad()
    other(trained_other).sum().backward()
    optimizer.step()
    torch.save(optimizer.state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="in no way by shape"):
        curvature(model, X, tmp_path / "other.pt")
    with pytest.raises(TypeError, match="path of a file"):
        curvature(model, X, 3)
