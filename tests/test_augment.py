"""He et al.'s training augmentation: the affine map equals torchvision's; draws are per image and seeded."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

import splitshield as ss
from splitshield.augment import affine, augment
from splitshield.config import parse_spec
from splitshield.errors import ConfigError


@pytest.mark.parametrize(("angle", "zoom", "shift"), [(10.0, 1.0, (0.0, 0.0)), (-7.0, 1.05, (2.0, -3.0)),
                                                      (3.5, 0.9, (-3.0, 1.0)), (0.0, 1.1, (1.0, 2.0))])
def test_affine_is_torchvisions_affine(angle, zoom, shift):
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 24), indexing="ij")
    image = torch.stack([xx, yy, xx * yy])  # [3, 32, 24]: not square, so the axes' scales matter
    ours = affine(image[None], torch.tensor([angle]), torch.tensor([zoom]), torch.tensor([shift]))[0]
    reference = TF.affine(image, angle=angle, translate=list(shift), scale=zoom, shear=[0.0, 0.0],
                          interpolation=InterpolationMode.NEAREST)
    assert torch.equal(ours, reference)


def test_he2019_draws_per_image_from_the_seeded_global_rng():
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    first = augment(x, "he2019")
    torch.manual_seed(0)
    assert torch.equal(first, augment(x, "he2019"))
    changed = (first != x).flatten(1).any(1)
    assert changed.all()  # a rotation or shift of a noise image changes it
    # Each image gets its own draw: identical inputs come out differently.
    same = augment(x[:1].expand(8, -1, -1, -1).contiguous(), "he2019")
    assert len({tuple(im.flatten()[:64].tolist()) for im in same}) == 8
    assert augment(x, "none") is x
    with pytest.raises(ValueError, match="augment must be one of none, he2019"):
        augment(x, "mixup")


def test_trainer_and_spec_take_augment_and_old_specs_keep_their_hashes():
    target = ss.split(ss.build_model("lenet"), "ReLU2", input_shape=(1, 28, 28))
    with pytest.raises(ConfigError, match="augment must be one of none, he2019, got 'flip'"):
        ss.Trainer(target, augment="flip")
    base = {"name": "a", "dataset": "mnist-5k", "model": "lenet", "splits": ["ReLU2"], "defenses": [{"name": "none"}],
            "attacks": [{"name": "rmle"}]}
    plain = parse_spec(base).train.model_dump()
    assert "augment" not in plain  # a spec without augmentation dumps, and so hashes, as before the field
    assert parse_spec({**base, "train": {"augment": "he2019"}}).train.model_dump()["augment"] == "he2019"
    with pytest.raises(ConfigError, match="train.augment"):
        parse_spec({**base, "train": {"augment": "flip"}})


def test_training_with_augmentation_runs_and_differs(mnist5k):
    data = mnist5k.train.take(256)
    weights = []
    for kind in ("none", "he2019"):
        target = ss.split(ss.build_model("lenet"), "ReLU2", input_shape=(1, 28, 28))
        trainer = ss.Trainer(target, epochs=1, batch_size=64, augment=kind, seed=0, progress=False)
        trainer.fit(data)
        weights.append(torch.cat([p.detach().flatten() for p in target.parameters()]))
    assert not torch.equal(*weights)
