"""Trainer: learns, is deterministic, checkpoints without pickle, resumes exactly."""

from __future__ import annotations

import json
import re

import pytest
import torch

import splitshield as ss
from splitshield.errors import CheckpointError, ConfigError


def _fit(data, seed=0, epochs=2, **kw):
    model = ss.build_model("lenet", seed=seed)
    target = ss.split(model, "ReLU2", input_shape=data.image_shape)
    trainer = ss.Trainer(target, epochs=epochs, batch_size=32, seed=seed, progress=False, **kw)
    trainer.fit(data.train.take(1000))
    return trainer


def test_learns_and_is_deterministic(mnist5k):
    a, b, c = _fit(mnist5k), _fit(mnist5k), _fit(mnist5k, seed=1)
    acc = a.evaluate(mnist5k.test)
    assert acc > 0.5  # 2 epochs on 1000 digits; chance is 0.1
    for (k, va), (_, vb) in zip(a.target.state_dict().items(), b.target.state_dict().items(), strict=True):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.target.head.conv1.weight, c.target.head.conv1.weight)


def test_checkpoint_roundtrip(mnist5k, tmp_path):
    trainer = _fit(mnist5k)
    path = trainer.save(tmp_path / "ckpt", metrics={"test_accuracy": 0.5})
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["split"] == "ReLU2" and meta["model_spec"]["name"] == "lenet" and meta["input_shape"] == [1, 28, 28]
    target, defense, meta = ss.load_checkpoint(path)
    x, _ = mnist5k.test.take(16).tensors()
    with torch.no_grad():
        assert torch.equal(target(x), trainer.target.eval()(x))
    assert isinstance(defense, ss.NoDefense)


def test_resume_equals_uninterrupted(mnist5k, tmp_path):
    full = _fit(mnist5k, epochs=2)
    first = _fit(mnist5k, epochs=1, checkpoint_dir=tmp_path)
    assert (tmp_path / "last.safetensors").is_file()
    model = ss.build_model("lenet")
    target = ss.split(model, "ReLU2", input_shape=mnist5k.image_shape)
    resumed = ss.Trainer(target, epochs=2, batch_size=32, seed=0, progress=False, checkpoint_dir=tmp_path)
    resumed.fit(mnist5k.train.take(1000), resume=True)
    assert resumed.epoch == 2 and first.epoch == 1
    for (k, va), (_, vb) in zip(full.target.state_dict().items(), resumed.target.state_dict().items(), strict=True):
        assert torch.equal(va, vb), k


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        ss.load_checkpoint(tmp_path / "nothing")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "bad.json").write_text(json.dumps({"format": "splitshield-checkpoint/1", "split": "ReLU2"}))
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        ss.load_checkpoint(tmp_path / "bad")


@pytest.mark.parametrize(("change", "expected"), [
    (lambda meta: [meta], "must hold a JSON object"),
    (lambda meta: {k: v for k, v in meta.items() if k != "split"}, "field 'split' must name the split point"),
    (lambda meta: {**meta, "input_shape": [1, 0, 28]}, "field 'input_shape' must be positive integers"),
    (lambda meta: {**meta, "model_spec": ["lenet"]}, "field 'model_spec' must be an object"),
    (lambda meta: {**meta, "model_spec": {}}, "has no model_spec"),
    (lambda meta: {**meta, "model_spec": {"num_classes": 10}}, "field 'model_spec' lacks the model's 'name'"),
    (lambda meta: {**meta, "model_spec": {"name": "lenet", "depth": 3}}, "unknown key 'depth'"),
    (lambda meta: {**meta, "model_spec": {"name": "lenet", "num_classes": 0}}, "bad 'num_classes': 0"),
    (lambda meta: {**meta, "model_spec": {"name": "nope"}}, "field 'model_spec' does not build a model: "),
    (lambda meta: {**meta, "defense": "none"}, "field 'defense' must be a defense config"),
])
def test_malformed_checkpoint_json_names_the_field(tmp_path, change, expected):
    target = ss.split(ss.build_model("lenet"), "ReLU2", input_shape=(1, 28, 28))
    path = ss.save_checkpoint(tmp_path / "ckpt", target)
    meta = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps(change(meta)))
    with pytest.raises(CheckpointError, match=re.escape(expected)) as info:
        ss.load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_a_custom_model_spec_loads_with_the_model_given(tmp_path):
    """Keys build_model does not take are refused only when the spec is what rebuilds the model."""
    model = ss.build_model("lenet")
    model.model_spec = {"name": "my-lenet", "width": 8}
    path = ss.save_checkpoint(tmp_path / "ckpt", ss.split(model, "ReLU2", input_shape=(1, 28, 28)))
    assert ss.load_checkpoint(path, model=ss.build_model("lenet"))[0].point == "ReLU2"
    with pytest.raises(CheckpointError, match="unknown key 'width'"):
        ss.load_checkpoint(path)


def test_bad_hyperparameters():
    target = ss.split(ss.build_model("lenet"), "ReLU2")
    with pytest.raises(ConfigError, match="epochs must be a positive integer"):
        ss.Trainer(target, epochs=0)
    with pytest.raises(ConfigError, match="lr must be > 0"):
        ss.Trainer(target, lr=-1.0)
