"""splitshield: how much of a user's input leaks through split-inference features, and how to stop it.

>>> import splitshield as ss
>>> data = ss.load_dataset("mnist-5k")
>>> target = ss.split(ss.models.build_model("lenet"), at="ReLU2", input_shape=data.image_shape)
"""

from . import attacks, defenses, metrics, models
from .attacks import (
    InverseNetwork,
    ModelCompletion,
    QueryFreeInversion,
    Victim,
    WhiteBoxInversion,
)
from .data import Dataset, ImageSet, load_dataset
from .defenses import Compose, Defense, NoDefense
from .errors import (
    CheckpointError,
    CodecError,
    ConfigError,
    DataError,
    SplitError,
    SplitShieldError,
    ThreatModelError,
)
from .models import SplitModel, SplitPoint, build_model, split, split_points
from .train import Trainer, evaluate, load_checkpoint, save_checkpoint

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CodecError",
    "Compose",
    "ConfigError",
    "DataError",
    "Dataset",
    "Defense",
    "ImageSet",
    "InverseNetwork",
    "ModelCompletion",
    "NoDefense",
    "QueryFreeInversion",
    "SplitError",
    "SplitModel",
    "SplitPoint",
    "SplitShieldError",
    "ThreatModelError",
    "Trainer",
    "Victim",
    "WhiteBoxInversion",
    "attacks",
    "build_model",
    "defenses",
    "evaluate",
    "load_checkpoint",
    "load_dataset",
    "metrics",
    "models",
    "save_checkpoint",
    "split",
    "split_points",
]
