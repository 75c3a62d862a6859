"""Attacks on split inference: model inversion (rMLE, inverse network, model reconstruction, shadow head, UnSplit,
learned-prior inversion) and model completion.

Each attack receives only what its threat model allows: see :class:`Victim`. The registry names say what
an attack does; the threat model it runs under is a separate setting (each class's ``threats``).
"""

from .base import (
    THREATS,
    ArchitectureOnlyView,
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
from .model_reconstruction import ModelReconstruction
from .portfolio import StrongestAttack
from .prior_inversion import PriorInversion
from .query_free import QueryFreeInversion
from .stand_in import different_head
from .unsplit import UnSplit
from .whitebox import HE2019_SETTINGS, WhiteBoxInversion

#: Every attack by its name (its class's ``name``).
ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls for cls in (WhiteBoxInversion, InverseNetwork, QueryFreeInversion, ModelCompletion,
                               StrongestAttack, UnSplit, PriorInversion, ModelReconstruction)
}
#: Names of earlier versions, which named the attacks after the threat model each was first written for.
ATTACK_ALIASES = {"white_box": "rmle", "black_box": "inverse_network", "query_free": "shadow_head"}


def attack_name(name: str) -> str:
    """The registry name of ``name``: an alias resolved (``"black_box"`` -> ``"inverse_network"``), else ``name``."""
    return ATTACK_ALIASES.get(name, name)


__all__ = [
    "ATTACKS",
    "ATTACK_ALIASES",
    "HE2019_SETTINGS",
    "THREATS",
    "ArchitectureOnlyView",
    "Attack",
    "BlackBoxView",
    "CompletionAttack",
    "InverseNetwork",
    "InversionAttack",
    "ModelCompletion",
    "ModelReconstruction",
    "PriorInversion",
    "QueryFreeInversion",
    "QueryFreeView",
    "StrongestAttack",
    "UnSplit",
    "Victim",
    "VictimView",
    "WhiteBoxInversion",
    "WhiteBoxView",
    "attack_name",
    "build_decoder",
    "different_head",
    "he2019_decoder",
]
