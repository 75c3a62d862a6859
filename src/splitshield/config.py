"""Experiment specs: a validated description of a sweep, loaded from YAML or TOML (or built in Python).

A spec is dataset(s) × model(s) × split points × defense settings × attacks × seeds. A defense or an
attack entry whose parameter is a **list** is a grid: ``{name: gaussian_noise, sigma: [0.1, 0.5]}``
stands for two settings. ``compose`` takes ``parts`` (each part may hold grids; the settings are the
product of the parts'). Every mistake becomes one :class:`~splitshield.errors.ConfigError` line that
names the field, the value and what is allowed.

>>> spec = ExperimentSpec.model_validate({"dataset": "mnist-5k", "splits": ["ReLU2"],
...     "defenses": [{"name": "none"}], "attacks": [{"name": "inverse_network", "steps": 50}]})
>>> spec.attacks[0].threat
'black_box'

Attacks are named by what they are (``rmle``, ``inverse_network``, ``shadow_head``, ``model_completion``,
``unsplit``); the names of earlier specs, which were threat names (``white_box``, ``black_box``,
``query_free``), are still accepted and read as the attack they meant.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import itertools
import re
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from .errors import ConfigError, DataError, SplitShieldError

AUX_KINDS = ("same_set", "same_distribution", "noise", "random_fields", "other_distribution")
#: The metrics a cell can record: the target's (accuracy with the defense, the conditional-entropy MSE floor (an
#: estimate), the Gaussian-channel bound on I(x; z) in nats per image (certified), the clean feature's and the
#: additive noise's standard deviation per element, training wall and CPU seconds) and the attack's
#: (reconstruction MSE, PSNR, SSIM; a completion attack's label accuracy; re-identification: how often an
#: evaluator classifier names the true class, the person on faces, in a reconstruction, with its accuracy on the
#: true images as ``reid_ceiling`` beside it, :mod:`splitshield.reidentify`).
Metric = Literal["accuracy", "mse", "psnr", "ssim", "completion_accuracy", "ce_floor", "mi_bound", "feature_std",
                 "noise_std", "train_seconds", "train_cpu_seconds", "reid_accuracy"]
METRICS: tuple[str, ...] = get_args(Metric)
#: What a spec records when it does not say: all but re-identification, which trains an evaluator per dataset
#: (ask for it with ``evaluation: {metrics: [..., reid_accuracy]}``).
DEFAULT_METRICS: tuple[str, ...] = tuple(m for m in METRICS if m != "reid_accuracy")
#: The threat model an attack runs under when the spec does not say.
DEFAULT_THREAT = {"rmle": "white_box", "inverse_network": "black_box", "shadow_head": "query_free",
                  "model_completion": "black_box", "strongest": "white_box", "unsplit": "architecture_only",
                  "prior_inversion": "white_box", "model_reconstruction": "black_box"}
# Per-attack settings the experiment owns: the executor sets them, so a spec may not.
RESERVED_ATTACK_PARAMS = ("progress", "seed", "decoder")


def _attack_registry() -> dict[str, type]:
    from .attacks import ATTACKS

    return ATTACKS


def _defense_registry() -> dict[str, type]:
    from .defenses import DEFENSES

    return DEFENSES


def expand_grid(params: dict[str, Any]) -> list[dict[str, Any]]:
    """All settings of a parameter dict whose list values are grids, in a stable order.

    ``{"a": [1, 2], "b": 3}`` -> ``[{"a": 1, "b": 3}, {"a": 2, "b": 3}]``; no list -> ``[params]``.
    """
    keys = list(params)
    axes = [params[k] if isinstance(params[k], list) else [params[k]] for k in keys]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*axes)]


def _images(value: str | int | None) -> str | int | None:
    """Check the ``images`` field of an attack or of the evaluation: "first_per_class" or a positive count."""
    if isinstance(value, int) and value < 1:
        raise ValueError("images must be 'first_per_class' or a positive number of test images")
    return value


class DefenseSpec(BaseModel):
    """One defense entry: ``name`` from ``splitshield.defenses.DEFENSES`` (or ``compose``) + parameters."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    parts: list[DefenseSpec] | None = None

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        known = _defense_registry()
        if name != "compose" and name not in known:
            raise ValueError(f"unknown defense {name!r}; known: {', '.join(sorted([*known, 'compose']))}")
        return name

    @model_validator(mode="after")
    def _compose_has_parts(self) -> DefenseSpec:
        if self.name == "compose" and not self.parts:
            raise ValueError("compose needs parts: a list of defenses, e.g. [{name: gaussian_noise, sigma: 0.5}]")
        if self.name != "compose" and self.parts is not None:
            raise ValueError(f"parts is only allowed with name: compose, not {self.name!r}")
        return self

    def settings(self) -> list[dict[str, Any]]:
        """The concrete defense configs (``build_defense`` inputs) this entry stands for."""
        if self.name == "compose":
            per_part = [part.settings() for part in self.parts or []]
            return [{"name": "compose", "parts": list(combo)} for combo in itertools.product(*per_part)]
        return [{"name": self.name, **params} for params in expand_grid(dict(self.model_extra or {}))]


class AttackSpec(BaseModel):
    """One attack entry: ``name`` from ``splitshield.attacks.ATTACKS``, its threat model, aux data, kwargs.

    Extra keys are the attack's constructor arguments (lists are grids).
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    threat: Literal["white_box", "black_box", "query_free", "architecture_only"] | None = None
    aux: Literal["same_set", "same_distribution", "noise", "random_fields", "other_distribution"] = "same_distribution"
    aux_data: str | None = Field(default=None, description="with aux other_distribution: the dataset whose training "
                                 "images the attacker holds, converted to the target's image shape")
    aux_n: int | None = Field(default=None, gt=0)
    adaptive: bool = True
    images: Literal["first_per_class"] | int | None = Field(
        default=None, description="the test images this attack reconstructs, if not evaluation.images")

    @field_validator("images")
    @classmethod
    def _positive(cls, value: str | int | None) -> str | int | None:
        return _images(value)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from .attacks import attack_name

        name = attack_name(name)
        known = _attack_registry()
        if name not in known:
            raise ValueError(f"unknown attack {name!r}; known: {', '.join(sorted(known))}")
        return name

    @model_validator(mode="after")
    def _fill_threat(self) -> AttackSpec:
        if self.threat is None:
            object.__setattr__(self, "threat", DEFAULT_THREAT.get(self.name, "black_box"))
        allowed = _attack_registry()[self.name].threats
        if self.threat not in allowed:
            raise ValueError(f"attack {self.name!r} runs under threat {' or '.join(allowed)}, not {self.threat!r}")
        for key in RESERVED_ATTACK_PARAMS:
            if key in (self.model_extra or {}):
                raise ValueError(f"attack parameter {key!r} is set by the experiment; remove it")
        if (self.aux == "other_distribution") != (self.aux_data is not None):
            raise ValueError("aux other_distribution needs aux_data: <dataset name>, and aux_data needs aux "
                             "other_distribution" if self.aux_data is None else
                             f"aux_data {self.aux_data!r} is read only with aux: other_distribution; set it or "
                             "remove aux_data")
        if self.aux_data is not None:
            from .data import get_dataset_info

            try:
                get_dataset_info(self.aux_data)
            except DataError as exc:
                raise ValueError(f"aux_data: {exc}") from None
        return self

    def settings(self) -> list[dict[str, Any]]:
        """Concrete attack settings: ``{"name", "threat", "aux", "aux_n", "adaptive", ["images",] ["aux_data",]
        "params": {...}}``."""
        # Optional keys only when set: an entry without them keeps the cell hashes and seeds it had before.
        head = {"name": self.name, "threat": self.threat, "aux": self.aux, "aux_n": self.aux_n,
                "adaptive": self.adaptive, **({"images": self.images} if self.images is not None else {}),
                **({"aux_data": self.aux_data} if self.aux_data is not None else {})}
        return [{**head, "params": params} for params in expand_grid(dict(self.model_extra or {}))]


class TrainSpec(BaseModel):
    """How each target (model + defense) is trained (:class:`~splitshield.train.Trainer`).

    ``protocol: cem_official`` is CEM's official protocol compressed to ``epochs`` (SGD with momentum 0.9 and
    weight decay 5e-4, warm-up, learning rate × 0.2 after 1/4, 1/2, 3/4 and 7/8 of the steps, the model of the
    best epoch within the last sixth on images held out of the training set); ``lr`` is then its peak learning
    rate, 0.05 unless set. A spec of the default protocol keeps the cell hashes it had before protocols existed.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(default=2, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=1e-3, gt=0, description="the (peak) learning rate; 0.05 with cem_official unless set")
    lr_halve_every: int | None = Field(default=None, ge=1)
    protocol: Literal["default", "cem_official"] = Field(
        default="default", description="default: Adam, the last epoch's model; cem_official: CEM's official SGD "
        "schedule compressed to epochs, the best late epoch on held-out training images")
    augment: Literal["none", "he2019"] = Field(
        default="none", description="training-time augmentation: he2019 is He et al.'s CIFAR-10 one (flip, rotation, "
        "shift, zoom)")
    tail_epochs: int = Field(default=0, ge=0, description="then train the cloud tail alone for this many epochs, "
                             "the edge head and the defense frozen")
    train_n: int | None = Field(default=None, gt=0, description="use only the first n training images")

    @model_validator(mode="after")
    def _protocol(self) -> TrainSpec:
        if self.protocol == "cem_official":
            if self.lr_halve_every is not None:
                raise ValueError("lr_halve_every is the default protocol's schedule; remove it with protocol "
                                 "cem_official")
            if "lr" not in self.model_fields_set:
                from .train import CEM_LR

                object.__setattr__(self, "lr", CEM_LR)
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        # Without the default protocol's name, a spec dumps (and so hashes its cells) as it did before protocols.
        data = handler(self)
        if self.protocol == "default":
            data.pop("protocol", None)
        if self.augment == "none":  # likewise: specs without augmentation keep their hashes
            data.pop("augment", None)
        return data


class EvaluationSpec(BaseModel):
    """Which private test images the attacks reconstruct, and which metrics are recorded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    images: Literal["first_per_class"] | int = Field(
        default="first_per_class",
        description="He et al.'s protocol (the first test image of each class; with fewer than 10 classes the first "
                    "k of each, k = ceil(10 / classes), so at least 10 images) or n")
    metrics: list[Metric] = list(DEFAULT_METRICS)
    test_n: int | None = Field(default=None, gt=0, description="accuracy on the first n test images only")

    @field_validator("images")
    @classmethod
    def _positive(cls, value: str | int | None) -> str | int | None:
        return _images(value)


class WireSpec(BaseModel):
    """How the features cross the network (``splitshield.runtime.codec``): accuracy and every attack are then
    measured on the features the server decodes, as deployed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: str = Field(default="float32", description="float32, float16, uint8 or uint4")
    compress: str | None = Field(default=None, description="none (null) or zstd; lossless")
    batch_size: int = Field(default=1, ge=1, description="images per frame: uint8/uint4 take their range per "
                            "frame, so an image's decoded feature depends on the others sent with it")

    @model_validator(mode="after")
    def _known(self) -> WireSpec:
        from .runtime.codec import WireFormat

        try:
            WireFormat(self.dtype, self.compress)
        except SplitShieldError as exc:
            raise ValueError(str(exc)) from None
        if self.compress == "zstd" and importlib.util.find_spec("zstandard") is None:
            raise ValueError("compress zstd needs the zstandard package: pip install 'splitshield[serve]'")
        return self


class ExperimentSpec(BaseModel):
    """A whole sweep. See the module docstring and ``examples/*.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "experiment"
    dataset: list[str]
    data_dir: str | None = Field(default=None, description="where mnist/fashion-mnist/cifar10 files live; "
                                 "relative to the spec file; default $SPLITSHIELD_DATA")
    download: bool = False
    value_range: tuple[float, float] | None = Field(
        default=None, description="the scale the stored pixels are on, e.g. [0, 16]; mapped to 0..255 on loading")
    image_shape: tuple[int, int, int] | None = Field(
        default=None, description="C, H, W every image is converted to on loading (grey <-> RGB, resizing)")
    model: list[str] = ["lenet"]
    splits: list[str] = Field(min_length=1)
    defenses: list[DefenseSpec] = [DefenseSpec(name="none")]
    attacks: list[AttackSpec] = Field(default_factory=lambda: [AttackSpec(name="strongest")], min_length=1,
                                      description="default: the portfolio of every white-box-allowed attack")
    seeds: list[int] = [0]
    train: TrainSpec = TrainSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    wire: WireSpec | None = Field(default=None, description="send the features through the wire codec")
    device: str = "cpu"

    @field_validator("dataset", "model", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("dataset")
    @classmethod
    def _datasets(cls, names: list[str]) -> list[str]:
        from .data import get_dataset_info

        for name in names:
            try:
                get_dataset_info(name)
            except DataError as exc:
                raise ValueError(str(exc)) from None
        return names

    @field_validator("model")
    @classmethod
    def _models(cls, names: list[str]) -> list[str]:
        from .models import get_model_info

        for name in names:
            try:
                get_model_info(name)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return names

    @field_validator("value_range")
    @classmethod
    def _value_range(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not value[0] < value[1]:
            raise ValueError(f"value_range must be [lo, hi] with lo < hi, e.g. [0, 16]; got {list(value)}")
        return value

    @field_validator("image_shape")
    @classmethod
    def _image_shape(cls, value: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if value is not None and min(value) < 1:
            raise ValueError(f"image_shape must be three positive sizes [C, H, W], e.g. [3, 32, 32]; got {list(value)}")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int]) -> list[int]:
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be a non-empty list of distinct integers")
        return seeds

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if not re.match(r"^(cpu|cuda(:\d+)?|mps)$", device):
            raise ValueError(f"device must be cpu, cuda, cuda:N or mps, got {device!r}")
        return device

    def defense_settings(self) -> list[dict[str, Any]]:
        """Every concrete defense config, deduplicated, in spec order."""
        out: list[dict[str, Any]] = []
        for entry in self.defenses:
            out.extend(s for s in entry.settings() if s not in out)
        return out

    def attack_settings(self) -> list[dict[str, Any]]:
        """Every concrete attack setting, deduplicated, in spec order."""
        out: list[dict[str, Any]] = []
        for entry in self.attacks:
            out.extend(s for s in entry.settings() if s not in out)
        return out


def _location(loc: tuple[Any, ...]) -> str:
    """pydantic's error location as a spec path: ``attacks[1].threat``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif str(part).startswith(("function-", "literal[", "int", "str")):
            continue  # union-branch names pydantic inserts, not spec fields
        else:
            text += f".{part}" if text else str(part)
    return text or "spec"


def _one_line(exc: ValidationError) -> str:
    errors = exc.errors()
    first = errors[0]
    msg = first["msg"].removeprefix("Value error, ")
    where = _location(first["loc"])
    if first["type"] == "extra_forbidden":
        return f"spec field {where}: unknown field (value {first['input']!r}); remove it or check its spelling"
    if first["type"] == "missing":
        return f"spec field {where}: required but missing"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" got {value!r};"
    return f"spec field {where}:{shown} {msg}{more}"


def _check_buildable(spec: ExperimentSpec) -> None:
    """Construct every defense and attack setting once, so a bad keyword fails at load, not mid-sweep."""
    from .defenses import build_defense
    from .validate import check, validate

    problems = []
    for i, entry in enumerate(spec.defenses):
        for setting in entry.settings():
            try:
                defense = build_defense(setting, feature_shape=(1, 1, 1))  # the target's shape fills it at run time
            except ConfigError as exc:
                raise ConfigError(f"spec field defenses[{i}]: {exc}") from None
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"spec field defenses[{i}] ({setting}): {exc}") from None
            problems += [dataclasses.replace(p, field=f"spec field defenses[{i}] {p.field}")
                         for p in validate(None, defense)]
    check(problems)
    attacks = _attack_registry()
    for i, entry in enumerate(spec.attacks):
        for setting in entry.settings():
            cls = attacks[setting["name"]]
            allowed = [p for p in inspect.signature(cls).parameters if p not in (*RESERVED_ATTACK_PARAMS, "self")]
            unknown = [p for p in setting["params"] if p not in allowed]
            if unknown:
                raise ConfigError(f"spec field attacks[{i}].{unknown[0]}: not a parameter of {setting['name']}; "
                                  f"allowed: {', '.join(allowed)}, threat, aux, aux_n, adaptive, images")
            try:
                cls(**setting["params"], progress=False)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"spec field attacks[{i}] ({setting['name']}): {exc}") from None


def parse_spec(data: dict[str, Any]) -> ExperimentSpec:
    """Validate a spec given as a dict; raises :class:`ConfigError` with one line on any problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"spec must be a mapping of fields, got {type(data).__name__}")
    try:
        spec = ExperimentSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None
    _check_buildable(spec)
    return spec


#: ``--quick`` (:func:`quick_spec`): training on at most this many images for one epoch, attacks at these budgets
#: and on the auxiliary images, private images and test images below. Enough to run every stage of a spec in
#: minutes as a smoke test; the numbers measured with them say nothing about privacy.
QUICK_TRAIN_N = 500
QUICK_ATTACK_BUDGETS: dict[str, dict[str, Any]] = {
    "rmle": {"iters": 20},
    "inverse_network": {"steps": 20},
    "shadow_head": {"steps": 20, "iters": 20},
    "model_reconstruction": {"steps": 20, "iters": 20},
    "unsplit": {"rounds": 2, "restarts": 1},
    "prior_inversion": {"steps": 20, "latent_iters": 10, "refine_iters": 0, "restarts": 1},
    "model_completion": {"steps": 20},
}
QUICK_AUX_N = 128
QUICK_IMAGES = 10
QUICK_TEST_N = 500


def quick_spec(spec: ExperimentSpec) -> ExperimentSpec:
    """``spec`` at smoke-test budgets (:data:`QUICK_ATTACK_BUDGETS` and the ``QUICK_*`` sizes): the same grid
    of datasets, models, splits, defenses, attacks and seeds, named ``<name>-quick``. A smaller size or budget
    the spec sets stays; a grid of budgets is capped point by point (points at or above the cap merge into
    one). ``strongest`` runs its members (every allowed attack unless it names them) at their quick budgets.
    Model completion keeps twice its labelled images in auxiliary images, so ``mixmatch`` has unlabelled ones."""
    from .attacks.portfolio import allowed_members, member_specs

    def capped(value: int | None, cap: int) -> int:
        return cap if value is None else min(value, cap)

    def budget(value: Any, cap: int) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return min(value, cap)
        if isinstance(value, list) and value and all(isinstance(v, int) for v in value):  # a grid
            return list(dict.fromkeys(min(v, cap) for v in value))
        return cap

    def quick_members(members: Any) -> dict[str, dict[str, Any]]:
        # A mapping, whatever form the spec gave: in a spec, a list is a grid.
        return {m["name"]: quick_params(m["name"], {k: v for k, v in m.items() if k != "name"})
                for m in member_specs(members)}

    def quick_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
        if name == "strongest":
            members = params["members"]
            grid = [quick_members(m) for m in members] if isinstance(members, list) else quick_members(members)
            return {**params, "members": grid}
        return {**params, **{k: budget(params.get(k), cap) for k, cap in QUICK_ATTACK_BUDGETS.get(name, {}).items()}}

    def labels(params: dict[str, Any]) -> int:
        n = params.get("n_labels", 40)
        return max(n) if isinstance(n, list) else n

    data = spec.model_dump()
    data["name"] = f"{spec.name}-quick"
    data["train"] = {**data["train"], "epochs": 1, "train_n": capped(spec.train.train_n, QUICK_TRAIN_N),
                     "tail_epochs": min(spec.train.tail_epochs, 1)}
    images = spec.evaluation.images
    data["evaluation"] = {**data["evaluation"], "test_n": capped(spec.evaluation.test_n, QUICK_TEST_N),
                          "images": images if isinstance(images, str) else min(images, QUICK_IMAGES)}
    attacks = []
    for entry in spec.attacks:
        params = dict(entry.model_extra or {})
        if entry.name == "strongest" and "members" not in params:
            params["members"] = {name: {} for name in allowed_members(entry.threat)}
        fields = entry.model_dump(exclude=set(params))
        aux = max(QUICK_AUX_N, 2 * labels(params)) if entry.name == "model_completion" else QUICK_AUX_N
        fields["aux_n"] = capped(entry.aux_n, aux)
        if isinstance(entry.images, int):
            fields["images"] = min(entry.images, QUICK_IMAGES)
        attacks.append({**fields, **quick_params(entry.name, params)})
    data["attacks"] = attacks
    return parse_spec(data)


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read and validate a spec file (``.yaml``/``.yml`` or ``.toml``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"spec file {path} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    elif path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise ConfigError(f"{path}: TOML specs need Python >= 3.11; use YAML") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    else:
        raise ConfigError(f"spec file {path}: extension must be .yaml, .yml or .toml")
    spec = parse_spec(data)
    if spec.data_dir is not None and not Path(spec.data_dir).is_absolute():
        spec = spec.model_copy(update={"data_dir": str((path.parent / spec.data_dir).resolve())})
    return spec
