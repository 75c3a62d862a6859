"""U-shaped splits (InfoScissors' setting): the edge keeps the head and the classifier, the cloud runs the middle.

The cut must compute the model exactly, give the cloud the middle and nothing else, refuse what the cloud cannot
do without the classifier, and let a model completion attacker fine-tune its own copy of the middle."""

from __future__ import annotations

import pytest
import torch

import splitshield as ss
from splitshield.config import parse_spec
from splitshield.errors import CheckpointError, ConfigError, SplitError, ThreatModelError
from splitshield.experiment import plan, run_experiment
from splitshield.runtime.artifacts import export, load_cloud, load_edge
from splitshield.store import ResultStore
from splitshield.validate import validate


def _pointers(module: torch.nn.Module) -> set[int]:
    return {p.data_ptr() for p in module.parameters()}


@pytest.mark.parametrize(("name", "at", "shape", "cloud_layers", "edge_layers"), [
    ("lenet", "ReLU2..fc1act", (1, 28, 28), ["fc1"], ["fc2", "fc3"]),
    ("resnet20", "relu..layer3.1", (3, 32, 32), ["layer1", "layer2", "layer3.0", "layer3.1"], ["layer3.2", "fc"]),
])
def test_a_u_shaped_split_computes_the_model_and_gives_the_cloud_the_middle_only(name, at, shape, cloud_layers,
                                                                                 edge_layers):
    model = ss.build_model(name, input_shape=shape)
    target = ss.split(model, at, input_shape=shape)
    assert target.u_shaped and target.point == at
    assert ss.check_split(model, target, torch.rand(4, *shape)) == {"eval": True, "train": True}
    cloud = _pointers(target.cloud)
    for layer in cloud_layers:
        assert _pointers(model.get_submodule(layer)) <= cloud, layer
    for layer in edge_layers:  # the device's classifier: not one of its tensors in the cloud's part
        assert not _pointers(model.get_submodule(layer)) & cloud, layer
    assert not _pointers(target.head) & cloud
    assert ss.split(model, at.split("..")[0], input_shape=shape).u_shaped is False


def test_the_points_of_a_u_shaped_split_must_be_in_the_models_order():
    model = ss.build_model("lenet")
    with pytest.raises(SplitError, match="'ReLU2' must come after 'fc1'"):
        ss.split(model, "fc1..ReLU2", input_shape=(1, 28, 28))
    with pytest.raises(SplitError, match="no split point 'fc9'"):
        ss.split(model, "ReLU2..fc9", input_shape=(1, 28, 28))


def test_resnet20_has_the_shape_he_et_al_give_it():
    # He et al. (2016), CIFAR-10 ResNet with n = 3: 6n + 2 = 20 weighted layers (19 convolutions and fc), 16 / 32 / 64
    # filters on maps of 32, 16, 8, parameter-free shortcuts (option A). Counted by hand: conv1 432 + BN 32; stage 1
    # 3 x (2 x 2,304 + 2 x 32); stage 2 4,608 + 9,216 + 128 and 2 x (2 x 9,216 + 128); stage 3 18,432 + 36,864 + 256
    # and 2 x (2 x 36,864 + 256); fc 650: 269,722 (their "0.27 M").
    model = ss.build_model("resnet20")
    assert sum(p.numel() for p in model.parameters()) == 269_722
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == 20 and all(m.kernel_size == (3, 3) for m in layers[:-1])
    shapes = {p.name: p.feature_shape for p in ss.split_points(model, (3, 32, 32))}
    assert shapes["relu"] == (16, 32, 32) and shapes["layer2.2"] == (32, 16, 16) and shapes["layer3.2"] == (64, 8, 8)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_the_cloud_holds_a_frozen_copy_of_its_part_and_cannot_run_query_free(trained_lenet, mnist5k):
    target = ss.split(trained_lenet, "ReLU2..fc1act", input_shape=(1, 28, 28))
    view = ss.Victim(target, threat="black_box", aux=mnist5k.holdout.take(100)).view()
    assert view.cloud is not target.cloud and not _pointers(view.cloud) & _pointers(target.cloud)
    assert not any(p.requires_grad for p in view.cloud.parameters())
    z = torch.rand(3, *target.feature_shape())
    assert torch.equal(view.cloud(z), target.cloud(z))
    two_part = ss.split(trained_lenet, "ReLU2", input_shape=(1, 28, 28))
    assert ss.Victim(two_part, threat="black_box").view().cloud is None
    with pytest.raises(ThreatModelError, match="classifier stays on the device"):
        ss.Victim(target, threat="query_free", aux=mnist5k.holdout.take(100)).view()


def test_completion_fine_tunes_its_own_copy_of_the_cloud_and_leaves_the_target_as_it_was(trained_lenet, mnist5k,
                                                                                       one_thread):
    target = ss.split(trained_lenet, "ReLU2..fc1act", input_shape=(1, 28, 28))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    victim = ss.Victim(target, threat="black_box", aux=mnist5k.holdout.take(300))
    mixmatch = ss.ModelCompletion(method="mixmatch", steps=200, progress=False).fit(victim)
    probe = ss.ModelCompletion(steps=20, progress=False).fit(victim)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    fc1 = target.cloud.fc1.weight
    # Fine-tuned, as Fu et al. do the bottom model. The EMA step's shrink of the live weights, 1 - 0.02 lr per step,
    # moves a frozen copy by under 200 x 0.02 x 2e-3 = 0.8 % in 200 steps (its average by less): the change is more.
    change = (mixmatch.classifier_[0].fc1.weight - fc1).norm() / fc1.norm()
    assert change > 0.02, change
    assert torch.equal(probe.classifier_[0].fc1.weight, fc1)  # the probe fits on the middle's output as it is
    x, _ = mnist5k.test.take(8).tensors()
    z = victim.observe(x)
    assert torch.equal(probe.predict(z), probe.classifier_[2](target.cloud(z)))


def test_mixmatch_without_fine_tuning_keeps_the_cloud_part_as_the_cloud_holds_it(trained_lenet, mnist5k, one_thread):
    target = ss.split(trained_lenet, "ReLU2..fc1act", input_shape=(1, 28, 28))
    victim = ss.Victim(target, threat="black_box", aux=mnist5k.holdout.take(300))
    frozen = ss.ModelCompletion(method="mixmatch", steps=100, fine_tune=False, progress=False).fit(victim)
    cloud, copy = target.cloud.state_dict(), frozen.classifier_[0].state_dict()
    assert cloud.keys() == copy.keys() and all(torch.equal(cloud[k], copy[k]) for k in cloud)  # weights and BN
    x, y = mnist5k.test.take(300).tensors()
    accuracy = (frozen.predict(victim.observe(x)).argmax(1) == y).float().mean().item()
    assert accuracy > 0.5  # 40 labels on a trained middle's output: far above chance (10 %)
    assert frozen.config()["fine_tune"] is False and "fine_tune" not in ss.ModelCompletion(method="mixmatch").config()
    with pytest.raises(ss.ConfigError, match="fine_tune is a parameter of method 'mixmatch'"):
        ss.ModelCompletion(fine_tune=False)


TINY_U = {"name": "tiny-u", "dataset": "mnist-5k", "model": "lenet", "splits": ["ReLU2..fc1act"],
          "attacks": [{"name": "model_completion", "steps": 20}, {"name": "rmle", "iters": 10}],
          "train": {"epochs": 1, "train_n": 300}, "evaluation": {"test_n": 100}}


def test_a_spec_runs_u_shaped_cells_and_stores_a_u_shaped_target(tmp_path, mnist5k):
    summary = run_experiment(parse_spec(TINY_U), tmp_path / "u.db", progress=False)
    assert (summary.cells_done, summary.failures) == (2, {})
    with ResultStore(tmp_path / "u.db") as store:
        cells = {c["attack_label"]: c for c in store.cells()}
    assert {c["split"] for c in cells.values()} == {"ReLU2..fc1act"}
    assert {"completion_accuracy", "scratch_accuracy"} <= set(cells["model_completion"]["metrics"])
    # The stored target is the U-shaped model whose accuracy the cells report.
    target, defense, _ = ss.load_checkpoint(cells["rmle"]["artifacts"]["checkpoint"])
    assert target.u_shaped and target.point == "ReLU2..fc1act"
    accuracy = ss.evaluate(target, defense, mnist5k.test.take(100))
    assert cells["rmle"]["metrics"]["accuracy"] == pytest.approx(accuracy)


@pytest.mark.parametrize(("change", "message"), [
    ({"splits": ["fc1..ReLU2"]}, "spec field splits: U-shaped split 'fc1..ReLU2'"),
    ({"splits": ["ReLU2..fc9"]}, "spec field splits: 'fc9' is not a split point of lenet"),
    ({"attacks": [{"name": "shadow_head"}]}, "spec field attacks: shadow_head runs query_free"),
])
def test_bad_u_shaped_specs_are_one_line(change, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        plan(parse_spec({**TINY_U, **change}))


def test_a_u_shaped_checkpoint_loads_as_it_was_saved_and_the_runtime_refuses_it(tmp_path):
    model = ss.build_model("resnet20")
    target = ss.split(model, "relu..layer3.1", input_shape=(3, 32, 32)).eval()
    with torch.no_grad():  # running statistics the checkpoint must keep
        target.train()(torch.rand(8, 3, 32, 32))
    target.eval()
    ss.save_checkpoint(tmp_path / "u", target)
    loaded, _, _ = ss.load_checkpoint(tmp_path / "u")
    x = torch.rand(2, 3, 32, 32)
    assert loaded.u_shaped and torch.equal(loaded.eval()(x), target(x))
    with pytest.raises(CheckpointError, match="U-shaped"):
        export(tmp_path / "u.safetensors", tmp_path / "edge.safetensors", tmp_path / "cloud.safetensors")
    assert not (tmp_path / "cloud.safetensors").exists()
    # Served whole, the cloud would hold the device's classifier and return predictions.
    with pytest.raises(CheckpointError, match="U-shaped"):
        load_cloud(tmp_path / "u.safetensors", allow_head_weights=True)
    with pytest.raises(CheckpointError, match="U-shaped"):
        load_edge(tmp_path / "u.safetensors")


def test_the_label_term_is_club_on_what_the_cloud_returns(mnist5k):
    # InfoScissors' label term: label_lam * [CE(phi(r), y shuffled) - CE(phi(r), y)], phi updated first, then frozen.
    target = ss.split(ss.build_model("lenet"), "ReLU2..fc1act", input_shape=(1, 28, 28))
    defense = ss.defenses.InfoScissors(lam=0.0, label_lam=0.7)
    x, y = mnist5k.train.take(32).tensors()
    returned = target.tail.cloud(target.head(x))
    logits = target.tail.edge(returned)
    defense.label_regularizer(y, returned, logits)
    torch.manual_seed(3)
    loss = defense.label_regularizer(y, returned, logits)
    torch.manual_seed(3)
    shuffled = y[torch.randperm(len(y))]
    guess = defense.labels.module(returned)
    expected = 0.7 * (torch.nn.functional.cross_entropy(guess, shuffled) - torch.nn.functional.cross_entropy(guess, y))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6) and loss.item() != 0
    loss.backward()
    assert target.cloud.fc1.weight.grad.abs().sum() > 0 and target.head.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in defense.labels.module.parameters())  # phi is frozen in the penalty


def test_a_u_shaped_target_trains_with_the_label_term_and_resumes_its_classifier(mnist5k, one_thread):
    target = ss.split(ss.build_model("lenet"), "ReLU2..fc1act", input_shape=(1, 28, 28))
    defense = ss.defenses.InfoScissors(lam=0.1, label_lam=0.1)
    ss.Trainer(target, defense, epochs=1, seed=0, progress=False).fit(mnist5k.train.take(256))
    state = defense.training_state()
    assert any(k.startswith("labels.module.") for k in state) and any(k.startswith("module.") for k in state)
    restored = ss.defenses.InfoScissors(lam=0.1, label_lam=0.1)
    restored.load_training_state(state)
    assert all(torch.equal(a, b) for a, b in zip(restored.labels.module.state_dict().values(),
                                                 defense.labels.module.state_dict().values(), strict=True))
    # A setting without the label term keeps the config (and so the cell hashes) it had before the term existed.
    assert "label_lam" not in ss.defenses.InfoScissors(lam=0.1).config() and defense.config()["label_lam"] == 0.1


def test_a_label_term_on_a_two_part_split_is_an_error_before_training():
    target = ss.split(ss.build_model("lenet"), "ReLU2", input_shape=(1, 28, 28))
    problems = validate(target, ss.defenses.InfoScissors(label_lam=1.0))
    assert [(p.severity, p.field) for p in problems] == [("error", "defense (infoscissors)")]
    assert "only a U-shaped split" in problems[0].message
    spec = {**TINY_U, "splits": ["ReLU2"], "attacks": [{"name": "model_completion"}],
            "defenses": [{"name": "infoscissors", "label_lam": 1.0}]}
    with pytest.raises(ConfigError, match="spec field defenses: label_lam"):
        plan(parse_spec(spec))
    plan(parse_spec({**spec, "defenses": [{"name": "infoscissors", "label_lam": 0.0}]}))  # no label term: fine
