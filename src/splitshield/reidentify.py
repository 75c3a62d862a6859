"""Re-identification: does a reconstruction still show *who* (which class) is in the private image?

PSNR and SSIM do not say whether a person can be recognised in a reconstruction (ALGORITHMS §G.7). The
auditor trains its own classifier, the *evaluator*, on every true training image of the dataset (the target's
training images and the ones held out for the attacker; never a test image), with a model of its own (neither
the target nor an attacker's), and counts
how often it names the right class (the person, on a faces dataset) in each reconstruction. Its accuracy on the
true evaluated images beside that is the ceiling: a perfect reconstruction reaches it, and chance is
1 / classes.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from ._random import seeded
from .data import Dataset, ImageSet

#: The evaluator: a LeNet-style CNN sized for the dataset's images, trained for about this many steps of
#: ``EVALUATOR_BATCH`` images (whole epochs, at least one) with Adam at its default learning rate.
EVALUATOR_MODEL = "lenet"
EVALUATOR_STEPS = 600
EVALUATOR_BATCH = 16
#: The evaluator's seed: one evaluator per dataset, whatever the cell, so that cells are compared on one yardstick.
EVALUATOR_SEED = 0

_EVALUATORS: dict[tuple, nn.Module] = {}


def identity_evaluator(data: Dataset, seed: int, device: str | torch.device = "cpu") -> nn.Module:
    """The evaluator classifier of ``data`` (logits [B, classes] from images [B, C, H, W] in [0, 1]), in eval mode.

    Trained once per process for each (dataset images, seed, device) from ``seed`` alone, on the images in one
    order whatever seed split them into train and holdout; the caller's RNG is left as it was. The first cell of a
    process that needs it pays for the training in its attack time.
    """
    from .models import build_model, split, split_points
    from .train import Trainer

    true = _canonical(data)
    key = (data.name, hashlib.sha256(true.images.numpy().tobytes()).hexdigest(), seed, str(device))
    if key not in _EVALUATORS:
        epochs = max(1, round(EVALUATOR_STEPS * EVALUATOR_BATCH / len(true)))
        with seeded(seed):
            model = build_model(EVALUATOR_MODEL, num_classes=data.num_classes, input_shape=data.image_shape)
            # A cut only because the trainer trains split models; the evaluator is used whole.
            target = split(model, split_points(model)[0].name, input_shape=data.image_shape)
            Trainer(target, epochs=epochs, batch_size=EVALUATOR_BATCH, seed=seed, device=device,
                    progress=False).fit(true)
        _EVALUATORS[key] = model.eval()
    return _EVALUATORS[key]


def _canonical(data: Dataset) -> ImageSet:
    """Every training image (target's and holdout), ordered by label and bytes: the same images in the same order
    whichever seed split them, so that every cell of a dataset gets one evaluator."""
    images = torch.cat([data.train.images, data.holdout.images])
    labels = torch.cat([data.train.labels, data.holdout.labels])
    flat = images.reshape(len(images), -1).numpy()
    order = sorted(range(len(images)), key=lambda i: (int(labels[i]), flat[i].tobytes()))
    return ImageSet(images[order], labels[order], data.train.classes)


@torch.no_grad()
def reidentified(evaluator: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 batch_size: int = 256) -> torch.Tensor:
    """Per image [B] 1.0 where ``evaluator`` names ``labels`` (the true class) in ``images`` [B, C, H, W], else 0.0."""
    device = next(evaluator.parameters()).device
    hits = [evaluator(chunk.to(device)).argmax(1).cpu() == y.cpu()
            for chunk, y in zip(images.split(batch_size), labels.split(batch_size), strict=True)]
    return torch.cat(hits).double() if hits else torch.zeros(0, dtype=torch.float64)


def chance(num_classes: int) -> float:
    """The re-identification accuracy of a guess: 1 / classes."""
    return 1.0 / num_classes if num_classes > 0 else math.nan
