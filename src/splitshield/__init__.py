"""splitshield: how much of a user's input leaks through split-inference features, and how to stop it.

>>> import splitshield as ss
>>> data = ss.load_dataset("mnist-5k")
>>> target = ss.split(ss.models.build_model("lenet"), at="ReLU2", input_shape=data.image_shape)
"""

from . import attacks, defenses, metrics, models
from .advisor import Advice, advise
from .attacks import (
    InverseNetwork,
    ModelCompletion,
    ModelReconstruction,
    PriorInversion,
    QueryFreeInversion,
    StrongestAttack,
    UnSplit,
    Victim,
    WhiteBoxInversion,
)
from .data import Dataset, ImageSet, conform, list_datasets, load_dataset
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
from .models import SplitModel, SplitPoint, build_model, check_split, list_models, split, split_points
from .train import Trainer, evaluate, load_checkpoint, save_checkpoint


def __getattr__(name: str):
    # The experiment layer pulls in pydantic, SQLite and matplotlib: load it on first use only.
    lazy = {"load_spec": "config", "quick_spec": "config", "ExperimentSpec": "config", "run_experiment": "experiment",
            "build_report": "report", "ResultStore": "store"}
    if name in lazy:
        import importlib

        return getattr(importlib.import_module(f".{lazy[name]}", __name__), name)
    raise AttributeError(f"module 'splitshield' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "Advice",
    "CheckpointError",
    "CodecError",
    "Compose",
    "ConfigError",
    "DataError",
    "Dataset",
    "ExperimentSpec",
    "Defense",
    "ImageSet",
    "InverseNetwork",
    "ModelCompletion",
    "ModelReconstruction",
    "NoDefense",
    "PriorInversion",
    "QueryFreeInversion",
    "ResultStore",
    "SplitError",
    "SplitModel",
    "SplitPoint",
    "SplitShieldError",
    "ThreatModelError",
    "Trainer",
    "Victim",
    "StrongestAttack",
    "UnSplit",
    "WhiteBoxInversion",
    "advise",
    "attacks",
    "build_model",
    "build_report",
    "check_split",
    "conform",
    "defenses",
    "evaluate",
    "list_datasets",
    "list_models",
    "load_checkpoint",
    "load_dataset",
    "load_spec",
    "metrics",
    "models",
    "quick_spec",
    "run_experiment",
    "save_checkpoint",
    "split",
    "split_points",
]
