"""Split artifacts: one checkpoint exported as an edge file (head + defense) and a cloud file (tail only).

>>> exported = export("runs/lenet.safetensors", "edge.safetensors", "cloud.safetensors")  # doctest: +SKIP
>>> exported.fingerprint                                                                    # doctest: +SKIP
'3f1c...'

Each artifact is a single safetensors file (tensors only, nothing is ever unpickled) whose JSON description
is stored in the file's own safetensors metadata under the key ``"splitshield"``, so one file travels alone:

============  ===============================  ===========================================================
artifact      tensors                          JSON
============  ===============================  ===========================================================
cloud         ``tail.*`` only                  format, kind, model_spec, split, input_shape, feature_shape,
                                               dtype, num_classes, digests, fingerprint
edge          ``head.*`` and ``defense.*``     the same (no num_classes) plus the defense config
============  ===============================  ===========================================================

The cloud file holds no head weight and no defense parameter or config: the server rebuilds the tail
from ``model_spec`` (a fresh, randomly initialised model, cut at ``split``), loads the ``tail.*`` tensors
and drops the fresh head, so the cloud process never holds the edge's weights. Tensors the tail itself
uses are in the cloud file even when the head uses them too (tied weights; :func:`export` warns).

Fingerprint
-----------
Both files carry one fingerprint of the split model, a SHA-256 (64 hex digits) over the canonical JSON
(sorted keys, no spaces) of::

    {"format": "splitshield-fingerprint/1", "model_spec": ..., "split": ..., "input_shape": [C, H, W],
     "edge": EDGE_DIGEST, "cloud": CLOUD_DIGEST}

where ``CLOUD_DIGEST`` is :func:`tensor_digest` of the ``tail.*`` tensors and ``EDGE_DIGEST`` the SHA-256 of
``{"defense": <defense config>, "tensors": tensor_digest(head.* and defense.*)}``. Both digests are stored
in both files, so each side recomputes its own digest from its own tensors (a modified or mixed-up file
is refused on load) and the fingerprint from its JSON, without ever holding the other half. Any change
of the architecture, split point, input shape, head, defense (config or parameters) or tail changes the
fingerprint: an edge and a cloud exported from different checkpoints disagree, and
:class:`~splitshield.runtime.client.EdgeClient` refuses the server. A full checkpoint has the same
fingerprint as the artifacts exported from it. A digest does not let the cloud find the head's weights
(SHA-256 has no known preimage attack); it does let it confirm an exact guess, e.g. that the head is an
unmodified public pretrained network.
"""

from __future__ import annotations

import gc
import hashlib
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .._random import seeded
from ..defenses import build_defense
from ..defenses.base import Defense, substate
from ..errors import CheckpointError, ConfigError
from ..models.split import SplitModel, fresh_copy, split
from ..models.zoo import build_model
from ..train import _read, load_checkpoint

__all__ = [
    "ARTIFACT_FORMAT",
    "CloudTail",
    "EdgeHead",
    "Exported",
    "artifact_kind",
    "check_servable",
    "checkpoint_fingerprint",
    "export",
    "load_cloud",
    "load_edge",
    "tensor_digest",
]

ARTIFACT_FORMAT = "splitshield-artifact/1"
FINGERPRINT_FORMAT = "splitshield-fingerprint/1"
META_KEY = "splitshield"  # the safetensors metadata entry holding an artifact's JSON

Kind = Literal["edge", "cloud", "checkpoint"]

#: Seeds the re-initialisation of the head :func:`load_cloud` keeps with ``architecture=True``.
_ARCHITECTURE_SEED = 0x5EC0DE

_EXPORT_HINT = "splitshield export CKPT --edge edge.safetensors --cloud cloud.safetensors"


# ---- digests and the fingerprint ------------------------------------------------------------------------


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of named tensors: for each name in sorted order, its name, dtype, shape and raw bytes.

    Every field is length-prefixed, so no two different sets of tensors hash alike by concatenation.
    The bytes are those of the CPU tensor in memory (little-endian on every platform torch ships for).
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        header = _canonical([name, str(t.dtype).removeprefix("torch."), list(t.shape)])
        data = t.reshape(-1).view(torch.uint8).numpy()
        h.update(len(header).to_bytes(8, "little") + header)
        h.update(data.nbytes.to_bytes(8, "little"))
        h.update(data.data)
    return h.hexdigest()


def _edge_digest(head_and_defense: Mapping[str, torch.Tensor], defense_config: dict[str, Any]) -> str:
    described = {"defense": defense_config, "tensors": tensor_digest(head_and_defense)}
    return hashlib.sha256(_canonical(described)).hexdigest()


def _fingerprint(model_spec: dict[str, Any] | None, point: str, input_shape: list[int], edge: str, cloud: str) -> str:
    return hashlib.sha256(_canonical({"format": FINGERPRINT_FORMAT, "model_spec": model_spec, "split": point,
                                      "input_shape": list(input_shape), "edge": edge, "cloud": cloud})).hexdigest()


def _parts(tensors: Mapping[str, torch.Tensor], source: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                                        dict[str, torch.Tensor]]:
    """A checkpoint's tensors as the artifacts name them: (``head.*``, ``defense.*``, ``tail.*``)."""
    head = {"head." + k: v for k, v in substate(dict(tensors), "model.head.").items()}
    tail = {"tail." + k: v for k, v in substate(dict(tensors), "model.tail.").items()}
    defense = {"defense." + k: v for k, v in substate(dict(tensors), "defense.").items()}
    stray = [k for k in tensors if k.startswith("model.") and not k.startswith(("model.head.", "model.tail."))]
    if stray:
        raise CheckpointError(f"{source}: tensor {stray[0]!r} is neither the head's nor the tail's (model.head.* / "
                              "model.tail.*): re-save the checkpoint with save_checkpoint")
    return head, defense, tail


def _base(path: str | Path) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".safetensors", ".json") else path


def checkpoint_fingerprint(checkpoint: str | Path) -> str:
    """The fingerprint of a full checkpoint (``NAME.safetensors`` + ``NAME.json``): the same as that of the
    edge and cloud artifacts :func:`export` writes from it."""
    base = _base(checkpoint)
    tensors, meta = _read(base)
    for field, ok in (("split", isinstance(meta.get("split"), str)), ("input_shape", bool(meta.get("input_shape")))):
        if not ok:
            raise CheckpointError(f"{base}.json: field {field!r} is missing or invalid; re-save the checkpoint with "
                                  "save_checkpoint(path, split(model, at, input_shape=...))")
    head, defense, tail = _parts(tensors, base.with_suffix(".safetensors"))
    edge = _edge_digest({**head, **defense}, meta.get("defense") or {"name": "none"})
    return _fingerprint(meta.get("model_spec"), meta["split"], meta["input_shape"], edge, tensor_digest(tail))


# ---- reading an artifact's description ------------------------------------------------------------------


def _st_file(path: str | Path) -> Path:
    path = Path(path)
    return path.with_suffix(".safetensors") if path.suffix in ("", ".json") else path


def _describe(path: str | Path) -> tuple[Kind, dict[str, Any] | None, Path]:
    """``(kind, artifact JSON or None for a checkpoint, safetensors file)``; one-line errors otherwise."""
    st = _st_file(path)
    if not st.is_file():
        raise CheckpointError(f"{path}: no such file; give a .safetensors file written by `splitshield export` "
                              "(edge or cloud artifact) or `splitshield train` (checkpoint)")
    try:
        with safe_open(str(st), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types on a file that is not its own
        raise CheckpointError(f"{st} is not a readable safetensors file: {str(exc).splitlines()[0]}") from None
    if META_KEY not in metadata:
        if not st.with_suffix(".json").is_file():
            raise CheckpointError(f"{st} is neither a split artifact (no {META_KEY!r} metadata) nor a checkpoint "
                                  f"({st.with_suffix('.json')} is missing)")
        return "checkpoint", None, st
    try:
        meta = json.loads(metadata[META_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{st}: its {META_KEY!r} metadata is not valid JSON ({exc.msg}): "
                              "export it again") from None
    return _checked_meta(meta, st), meta, st


def _checked_meta(meta: Any, st: Path) -> Literal["edge", "cloud"]:
    def bad(field: str, want: str) -> CheckpointError:
        got = meta.get(field) if isinstance(meta, dict) else meta
        return CheckpointError(f"{st}: artifact field {field!r} must be {want}, got {got!r}: export it again "
                               f"with `{_EXPORT_HINT}`")

    if not isinstance(meta, dict):
        raise CheckpointError(f"{st}: its {META_KEY!r} metadata must be a JSON object: export it again")
    if meta.get("format") != ARTIFACT_FORMAT:
        raise bad("format", repr(ARTIFACT_FORMAT))
    if meta.get("kind") not in ("edge", "cloud"):
        raise bad("kind", "'edge' or 'cloud'")
    if not isinstance(meta.get("split"), str) or not meta["split"]:
        raise bad("split", "a split point name")
    for field in ("input_shape", "feature_shape"):
        shape = meta.get(field)
        if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d >= 1 for d in shape)):
            raise bad(field, "a list of positive integers")
    if meta.get("model_spec") is not None and not isinstance(meta["model_spec"], dict):
        raise bad("model_spec", "a JSON object or null")
    digests = meta.get("digests")
    if not (isinstance(digests, dict) and all(isinstance(digests.get(k), str) for k in ("edge", "cloud"))):
        raise bad("digests", 'an object {"edge": hex, "cloud": hex}')
    if not isinstance(meta.get("fingerprint"), str):
        raise bad("fingerprint", "a hex string")
    if meta["kind"] == "edge" and not isinstance(meta.get("defense"), dict):
        raise bad("defense", "the defense config (an object)")
    if meta["fingerprint"] != _fingerprint(meta.get("model_spec"), meta["split"], meta["input_shape"],
                                           digests["edge"], digests["cloud"]):
        raise CheckpointError(f"{st}: its fingerprint does not match its own description (the file was edited): "
                              f"export it again with `{_EXPORT_HINT}`")
    return meta["kind"]


def artifact_kind(path: str | Path) -> Kind:
    """``"edge"``, ``"cloud"`` (split artifacts) or ``"checkpoint"`` (a full checkpoint, head and tail)."""
    return _describe(path)[0]


def _refuse_u_shaped(target: SplitModel, source: Path | str) -> None:
    """The runtime serves two-part splits only: from a U-shaped checkpoint the cloud would get the device's
    classifier with the tail and return predictions, the model silently run as a two-part one."""
    if target.u_shaped:
        raise CheckpointError(f"{source} is split U-shaped ({target.point}): the runtime serves two-part splits only; "
                              "use a checkpoint cut at one point")


def check_servable(path: str | Path, allow_head_weights: bool = False) -> Kind:
    """Refuse what a cloud should not be given, before anything is loaded; returns the kind of ``path``.

    Raises
    ------
    CheckpointError
        For an edge artifact, and for a full checkpoint (it holds the head's weights) unless
        ``allow_head_weights``.
    """
    kind, _, st = _describe(path)
    if kind == "edge":
        raise CheckpointError(f"{st} is an edge artifact (head + defense): serve the cloud artifact of the same export")
    if kind == "checkpoint" and not allow_head_weights:
        raise CheckpointError(f"{st} is a full checkpoint holding the head's weights (white-box access for the "
                              f"cloud): serve the tail only (`{_EXPORT_HINT}`, then serve cloud.safetensors), or "
                              "pass --allow-head-weights")
    return kind


# ---- export -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exported:
    """What :func:`export` wrote: the two files, their shared fingerprint and their JSON descriptions."""

    fingerprint: str
    edge: Path
    cloud: Path
    edge_meta: dict[str, Any]
    cloud_meta: dict[str, Any]


def _out_path(path: str | Path, field: str, checkpoint: Path) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"{field}: give a path ending in .safetensors, got {str(path)!r}")
    if path.resolve() == checkpoint.resolve():
        raise ConfigError(f"{field}: {path} is the checkpoint itself; write the artifact to another file")
    return path


def _tied(target: SplitModel) -> list[str]:
    """Names of the tail's tensors that share memory with a tensor of the head (tied weights)."""
    head = {t.data_ptr() for t in target.head.state_dict().values() if t.numel()}
    return [k for k, t in target.tail.state_dict().items() if t.numel() and t.data_ptr() in head]


def export(checkpoint: str | Path, edge_path: str | Path, cloud_path: str | Path, *,
           model: nn.Module | None = None) -> Exported:
    """Write the edge artifact (head + defense) and the cloud artifact (tail only) of a checkpoint.

    Parameters
    ----------
    checkpoint : str or Path
        ``NAME.safetensors`` (+ ``NAME.json``) from :func:`~splitshield.train.save_checkpoint`. Optimiser
        and training state in it are not exported.
    edge_path, cloud_path : str or Path
        The two ``.safetensors`` files to write (parent folders are created). Each is written to a
        temporary file first and renamed into place, so a failed export leaves no half file.
    model : nn.Module, optional
        The uncut architecture, for a checkpoint without ``model_spec`` (then the artifacts have none
        either, and :func:`load_cloud` / :func:`load_edge` need it too).

    Returns
    -------
    Exported
        The fingerprint both files carry (see the module docstring for what it covers).
    """
    source = _st_file(checkpoint)
    edge_path, cloud_path = _out_path(edge_path, "--edge", source), _out_path(cloud_path, "--cloud", source)
    if edge_path.resolve() == cloud_path.resolve():
        raise ConfigError(f"--edge and --cloud are the same file {edge_path}: give two paths")
    kind = artifact_kind(checkpoint)
    if kind != "checkpoint":
        raise CheckpointError(f"{source} is already a {kind} artifact: export from the checkpoint written by "
                              "`splitshield train`")
    target, _, meta = load_checkpoint(checkpoint, model=model)  # also checks that the tensors fit the model
    if target.input_shape is None:
        raise CheckpointError(f"{source}: its JSON has no input_shape; re-save it with split(..., input_shape=)")
    _refuse_u_shaped(target, source)
    tied = _tied(target)
    if tied:
        warnings.warn(f"the tail uses tensors of the head too (tied weights: {', '.join(tied)}): the cloud "
                      "artifact holds them", UserWarning, stacklevel=2)
    tensors, _ = _read(_base(checkpoint))
    head, defense, tail = _parts(tensors, source)
    defense_config = meta.get("defense") or {"name": "none"}
    with torch.no_grad():
        feature_shape = list(target.feature_shape())
        num_classes = int(target.tail(torch.zeros(1, *feature_shape)).shape[1])
    floats = [t.dtype for t in tail.values() if t.is_floating_point()] or [torch.float32]
    digests = {"edge": _edge_digest({**head, **defense}, defense_config), "cloud": tensor_digest(tail)}
    common = {
        "format": ARTIFACT_FORMAT,
        "model_spec": meta.get("model_spec"),
        "split": target.point,
        "input_shape": list(target.input_shape),
        "feature_shape": feature_shape,
        "dtype": str(floats[0]).removeprefix("torch."),
        "digests": digests,
        "fingerprint": _fingerprint(meta.get("model_spec"), target.point, list(target.input_shape), **digests),
    }
    cloud_meta = {**common, "kind": "cloud", "num_classes": num_classes}
    edge_meta = {**common, "kind": "edge", "defense": defense_config}
    written = [(cloud_path, tail, cloud_meta, "--cloud"), (edge_path, {**head, **defense}, edge_meta, "--edge")]
    temporary = []
    try:
        for path, part, description, field in written:
            tmp = path.with_name(path.name + ".tmp")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                # Cloning gives every tensor its own storage: safetensors refuses shared memory.
                save_file({k: v.clone().contiguous() for k, v in part.items()}, str(tmp),
                          metadata={META_KEY: json.dumps(description)})
            except OSError as exc:
                raise ConfigError(f"{field}: cannot write {path} ({exc.strerror or exc}): choose a writable "
                                  "folder") from None
            temporary.append((tmp, path))
        for tmp, path in temporary:
            tmp.replace(path)
    finally:
        for tmp, _ in temporary:
            tmp.unlink(missing_ok=True)
    return Exported(common["fingerprint"], edge_path, cloud_path, edge_meta, cloud_meta)


# ---- loading ----------------------------------------------------------------------------------------------


class _Absent(nn.Module):
    """Stands in for the half of a split model this process must not hold: calling it is a one-line error."""

    def __init__(self, half: str, where: str):
        super().__init__()
        self.half, self.where = half, where

    def forward(self, *_: Any) -> torch.Tensor:
        raise CheckpointError(f"the {self.half} is not in this process: {self.where}")

    def extra_repr(self) -> str:
        return f"{self.half} not loaded"


def _artifact_tensors(st: Path, meta: dict[str, Any], allowed: tuple[str, ...]) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(str(st))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types on corrupt files
        raise CheckpointError(f"{st} is not a readable safetensors file: {str(exc).splitlines()[0]}") from None
    stray = next((k for k in tensors if not k.startswith(allowed)), None)
    if stray is not None:
        raise CheckpointError(f"{st}: tensor {stray!r} does not belong in a {meta['kind']} artifact (only "
                              f"{', '.join(p + '*' for p in allowed)}): export it again with `{_EXPORT_HINT}`")
    return tensors


def _rebuild(meta: dict[str, Any], model: nn.Module | None, st: Path) -> SplitModel:
    """A freshly initialised model of the artifact's spec, cut at its split point."""
    input_shape = tuple(meta["input_shape"])
    if model is None:
        spec = meta.get("model_spec")
        if not spec:
            raise CheckpointError(f"{st} has no model_spec: pass model=<the uncut nn.Module>")
        model = build_model(**{"input_shape": input_shape, **spec})
    target = split(model, meta["split"], input_shape=input_shape)
    if list(target.feature_shape()) != meta["feature_shape"]:
        raise CheckpointError(f"{st}: feature_shape {meta['feature_shape']} is not what the model gives at "
                              f"{meta['split']!r} ({list(target.feature_shape())}): export it again")
    return target


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], what: str, st: Path) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{st} does not fit the {what}: {str(exc).splitlines()[0]}") from None


@dataclass
class CloudTail:
    """The tail of a split model as the cloud holds it.

    ``tail`` maps features ``[B, *feature_shape]`` to logits ``[B, num_classes]``; it is in eval mode and
    its parameters do not require gradients. ``head_weights`` is true when it was loaded from a full
    checkpoint (whose head the process read, then dropped). ``head_architecture`` (only with
    ``load_cloud(..., architecture=True)``) is an untrained head of the spec's architecture, every parameter
    re-initialised: what an attacker holding the cloud artifact knows of the head, none of its weights.
    """

    tail: nn.Module
    point: str
    input_shape: tuple[int, ...]
    feature_shape: tuple[int, ...]
    num_classes: int
    model_spec: dict[str, Any] | None
    fingerprint: str
    head_weights: bool
    head_architecture: nn.Module | None = None


def load_cloud(path: str | Path, *, model: nn.Module | None = None, device: str = "cpu",
               allow_head_weights: bool = False, architecture: bool = False) -> CloudTail:
    """Load the tail from a cloud artifact (or, with ``allow_head_weights``, from a full checkpoint).

    The tail is rebuilt from the artifact's ``model_spec`` with random initialisation, cut at its split
    point, and given the ``tail.*`` tensors; the freshly initialised head is dropped before this returns,
    unless ``architecture`` (a cloud artifact only: what a curious cloud attacks with) keeps it, every
    parameter re-initialised, as ``head_architecture``. The artifact's own digest and fingerprint are checked
    first.

    Raises
    ------
    CheckpointError
        For an edge artifact, a full checkpoint without ``allow_head_weights`` (or with ``architecture``), a
        file whose tensors do not match its recorded digest, or tensors that do not fit the tail.
    """
    kind = check_servable(path, allow_head_weights)
    if architecture and kind != "cloud":
        raise CheckpointError(f"{path} is a full checkpoint: its head holds the edge's weights; give the cloud "
                              "artifact for the head's architecture alone")
    if kind == "checkpoint":
        target, _, _ = load_checkpoint(path, model=model, device=device)
        _refuse_u_shaped(target, path)
        if target.input_shape is None:
            raise CheckpointError(f"checkpoint {path} has no input_shape; re-save it with split(..., input_shape=)")
        fingerprint = checkpoint_fingerprint(path)
        point, input_shape, spec = target.point, tuple(target.input_shape), target.model_spec
        feature_shape = target.feature_shape()
        head_weights = True
    else:
        _, meta, st = _describe(path)
        assert meta is not None
        tensors = _artifact_tensors(st, meta, ("tail.",))
        if tensor_digest(tensors) != meta["digests"]["cloud"]:
            raise CheckpointError(f"{st}: its tensors do not match the digest it records (modified or mixed up with "
                                  f"another file): export it again with `{_EXPORT_HINT}`")
        target = _rebuild(meta, model, st)
        _load_into(target.tail, substate(tensors, "tail."), "tail", st)
        del tensors
        target.to(device)
        fingerprint, point, input_shape = meta["fingerprint"], meta["split"], tuple(meta["input_shape"])
        spec, feature_shape, head_weights = meta.get("model_spec"), tuple(meta["feature_shape"]), False
    head = None
    if architecture:  # built from the spec, never given a weight of the edge; re-initialised away from the
        # spec's own initialisation, which is where the edge's head started training (its weights, untrained)
        with seeded(_ARCHITECTURE_SEED):
            head = fresh_copy(target.head).eval()
    tail = target.tail.eval()
    del target  # the head (fresh, or read from the checkpoint) goes with it
    gc.collect()
    for p in tail.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        num_classes = int(tail(torch.zeros(1, *feature_shape, device=device)).shape[1])
    return CloudTail(tail, point, input_shape, tuple(feature_shape), num_classes, spec, fingerprint, head_weights,
                     head)


@dataclass
class EdgeHead:
    """The head and defense of a split model as the device holds them.

    ``target`` is a :class:`~splitshield.models.SplitModel` whose ``tail`` is a stand-in that raises when
    called (the tail runs on the server); ``target.head`` maps images ``[B, *input_shape]`` to features
    ``[B, *feature_shape]``. Both modules are in eval mode.
    """

    target: SplitModel
    defense: Defense
    point: str
    input_shape: tuple[int, ...]
    feature_shape: tuple[int, ...]
    fingerprint: str


def load_edge(path: str | Path, *, model: nn.Module | None = None, device: str = "cpu") -> EdgeHead:
    """Load the head and defense from an edge artifact or a full checkpoint (whose tail is then dropped).

    Raises
    ------
    CheckpointError
        For a cloud artifact, a file whose tensors do not match its recorded digest, or tensors that do
        not fit the head or the defense.
    """
    kind, meta, st = _describe(path)
    absent = _Absent("tail", "it runs on the server")
    if kind == "cloud":
        raise CheckpointError(f"{st} is a cloud artifact (tail only): the device needs the edge artifact of the "
                              "same export")
    if kind == "checkpoint":
        target, defense, _ = load_checkpoint(path, model=model, device=device)
        _refuse_u_shaped(target, path)
        if target.input_shape is None:
            raise CheckpointError(f"checkpoint {path} has no input_shape; re-save it with split(..., input_shape=)")
        fingerprint = checkpoint_fingerprint(path)
        target.tail = absent
    else:
        assert meta is not None
        tensors = _artifact_tensors(st, meta, ("head.", "defense."))
        if _edge_digest(tensors, meta["defense"]) != meta["digests"]["edge"]:
            raise CheckpointError(f"{st}: its tensors do not match the digest it records (modified or mixed up with "
                                  f"another file): export it again with `{_EXPORT_HINT}`")
        target = _rebuild(meta, model, st)
        target.tail = absent
        _load_into(target.head, substate(tensors, "head."), "head", st)
        defense = build_defense(meta["defense"])
        _load_into(defense, substate(tensors, "defense."), "defense", st)
        target.to(device).eval()
        defense.to(device).eval()
        fingerprint = meta["fingerprint"]
    gc.collect()  # the tail of the model just built (fresh) or read (checkpoint)
    return EdgeHead(target, defense, target.point, tuple(target.input_shape), target.feature_shape(), fingerprint)
