"""Faces and re-identification: the AT&T faces loader, the evaluator classifier, and the metric through the engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import splitshield as ss
from splitshield.config import parse_spec
from splitshield.errors import DataError
from splitshield.experiment import run_experiment
from splitshield.reidentify import identity_evaluator, reidentified
from splitshield.report import build_report
from splitshield.store import ResultStore


def _faces_file(path, people: int = 40) -> None:
    """The AT&T layout; the first pixel of person p's image i (1-based) is p, the second i, so a loaded image tells
    which person and which image it was."""
    person = np.repeat(np.arange(people), 10)
    index = np.tile(np.arange(1, 11), people)
    x = np.zeros((10 * people, 112, 92), np.uint8)
    x[:, 0, 0], x[:, 0, 1], x[:, 1, 1] = person, index, 255  # a full-range image, as a real photo is
    np.savez(path, x_all=x, y_all=person, image_index=index, classes=np.array([f"s{p + 1}" for p in range(people)]))


def test_att_faces_split_by_image_index_and_relabel_each_set_of_people(tmp_path):
    _faces_file(tmp_path / "att_faces.npz")
    for name, first in (("att-faces", 0), ("att-faces-first20", 0), ("att-faces-last20", 20)):
        data = ss.load_dataset(name, data_dir=tmp_path, holdout_fraction=0.0)
        assert data.image_shape == (1, 112, 92) and data.num_classes == (40 if name == "att-faces" else 20)
        for part, images in ((data.train, range(1, 8)), (data.test, range(8, 11))):
            person, image = part.images[:, 0, 0, 0].long(), part.images[:, 0, 0, 1].long()
            assert torch.equal(person - first, part.labels), name  # relabelled 0..n-1, in the people's order
            assert set(image.tolist()) == set(images), (name, part)  # images 1-7 train, 8-10 test
            assert len(part) == data.num_classes * len(images)
        assert data.train.classes[0] == f"s{first + 1}"


def test_att_faces_in_the_wrong_layout_is_one_line_naming_the_arrays(tmp_path):
    np.savez(tmp_path / "att_faces.npz", x_train=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(DataError, match=r"lacks arrays \['x_all', 'y_all', 'image_index'\]"):
        ss.load_dataset("att-faces", data_dir=tmp_path)
    _faces_file(tmp_path / "att_faces.npz")
    arrays = dict(np.load(tmp_path / "att_faces.npz"))
    for broken, message in (({"y_all": arrays["y_all"][:-1]}, "N entries in y_all and image_index"),
                            ({"image_index": arrays["image_index"] - 1}, "1..10, got 0..9")):
        np.savez(tmp_path / "att_faces.npz", **{**arrays, **broken})
        with pytest.raises(DataError, match=message):
            ss.load_dataset("att-faces", data_dir=tmp_path)


def test_reidentified_is_whether_the_evaluator_names_the_true_class():
    evaluator = nn.Sequential(nn.Flatten(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        evaluator[1].weight.copy_(torch.eye(2))  # class = the brighter of the two pixels
    images = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]]).view(3, 1, 1, 2)
    assert reidentified(evaluator, images, torch.tensor([0, 1, 1])).tolist() == [1.0, 1.0, 0.0]


def test_the_evaluator_recognises_true_test_images_once_per_dataset_and_leaves_the_rng(mnist5k, one_thread):
    state = torch.get_rng_state()
    evaluator = identity_evaluator(mnist5k, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    x, y = mnist5k.test.tensors()
    assert reidentified(evaluator, x, y).mean() > 0.9  # against the test labels it never saw
    assert reidentified(evaluator, torch.full_like(x, 0.5), y).mean() < 0.2  # a blank image is no one
    assert identity_evaluator(mnist5k, seed=0) is evaluator


@pytest.mark.filterwarnings("ignore:defense .gaussian_noise.:UserWarning")
def test_reid_through_the_engine_and_the_report(tmp_path, one_thread):
    spec = parse_spec({"name": "reid", "dataset": "mnist-5k", "model": "lenet", "splits": ["conv1"],
                       "defenses": [{"name": "none"}, {"name": "gaussian_noise", "sigma": 50.0}],
                       "attacks": [{"name": "inverse_network", "steps": 150, "batch_size": 32}],
                       "train": {"epochs": 1, "train_n": 300},
                       "evaluation": {"images": 100, "metrics": ["accuracy", "psnr", "ssim", "reid_accuracy"]}})
    run_experiment(spec, tmp_path / "r.db", progress=False)
    with ResultStore(tmp_path / "r.db") as store:
        means = {(r[0], r[1]): r[3] for r in store.metric_rows() if r[2] == -1}
        per_image = [r for r in store.metric_rows() if r[1] == "reid_accuracy" and r[2] >= 0]
    cells = sorted({c for c, _ in means})
    clear, noisy = sorted(cells, key=lambda c: means[(c, "ssim")], reverse=True)
    assert means[(clear, "reid_ceiling")] == means[(noisy, "reid_ceiling")] > 0.9  # one evaluator, true images
    # An inverse network on conv1 gives recognisable digits; drowned in noise, about chance (10 %).
    assert means[(clear, "reid_accuracy")] > 0.8 and means[(noisy, "reid_accuracy")] < 0.35
    assert len(per_image) == 2 * 100 and {r[3] for r in per_image} <= {0.0, 1.0}
    report = build_report(tmp_path / "r.db", tmp_path / "out").markdown.read_text()
    assert "re-identified (true images)" in report and "Chance is 1/10 = 10.0 %" in report
