"""Attacks on split inference: model inversion (white-box, black-box, query-free) and model completion.

Each attack receives only what its threat model allows: see :class:`Victim`.
"""

from .base import (
    THREATS,
    Attack,
    BlackBoxView,
    CompletionAttack,
    InversionAttack,
    QueryFreeView,
    Victim,
    VictimView,
    WhiteBoxView,
)
from .decoders import build_decoder, he2019_decoder
from .inverse_network import InverseNetwork
from .model_completion import ModelCompletion
from .query_free import QueryFreeInversion, different_head
from .whitebox import HE2019_SETTINGS, WhiteBoxInversion

ATTACKS = {
    "white_box": WhiteBoxInversion,
    "black_box": InverseNetwork,
    "query_free": QueryFreeInversion,
    "model_completion": ModelCompletion,
}

__all__ = [
    "ATTACKS",
    "HE2019_SETTINGS",
    "THREATS",
    "Attack",
    "BlackBoxView",
    "CompletionAttack",
    "InverseNetwork",
    "InversionAttack",
    "ModelCompletion",
    "QueryFreeInversion",
    "QueryFreeView",
    "Victim",
    "VictimView",
    "WhiteBoxInversion",
    "WhiteBoxView",
    "build_decoder",
    "different_head",
    "he2019_decoder",
]
