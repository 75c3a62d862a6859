"""Models: the papers' target networks, torchvision by name, and cutting any model in two."""

from .split import SplitModel, SplitPoint, check_split, split, split_points
from .zoo import MODELS, Normalize, build_model, cifar_cnn, lenet, torchvision_model, vgg11_bottleneck

__all__ = [
    "MODELS",
    "Normalize",
    "SplitModel",
    "SplitPoint",
    "build_model",
    "check_split",
    "cifar_cnn",
    "lenet",
    "split",
    "split_points",
    "torchvision_model",
    "vgg11_bottleneck",
]
