"""Models: the papers' target networks, torchvision by name, their registry, and cutting any model in two."""

from .registry import (
    MODELS,
    ModelInfo,
    get_model_info,
    list_models,
    register_model,
    unregister_model,
)
from .split import SplitModel, SplitPoint, UShapedTail, check_split, split, split_points
from .zoo import Normalize, build_model, cifar_cnn, lenet, resnet20, torchvision_model, vgg11_bottleneck

__all__ = [
    "MODELS",
    "ModelInfo",
    "Normalize",
    "SplitModel",
    "SplitPoint",
    "UShapedTail",
    "build_model",
    "check_split",
    "cifar_cnn",
    "get_model_info",
    "lenet",
    "list_models",
    "register_model",
    "resnet20",
    "split",
    "split_points",
    "torchvision_model",
    "unregister_model",
    "vgg11_bottleneck",
]
