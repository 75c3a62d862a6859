"""Train a split model (with its defense) on the task, and save/load it as safetensors + JSON.

A checkpoint is two files side by side: ``NAME.safetensors`` (tensors only: ``model.*`` for the split
model, ``defense.*`` for the defense's parameters and buffers and, in a checkpoint to resume training
from, ``optim.*`` for the optimiser's state and ``train_state.*`` for the defense's
:meth:`~splitshield.defenses.Defense.training_state`) and ``NAME.json`` (how to rebuild the model, the
split point, the defense config, metrics). Nothing is ever pickled, so a checkpoint from an untrusted
source cannot run code.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .augment import AUGMENTATIONS, augment
from .data import ImageSet
from .defenses.base import Defense, NoDefense, load_optimizer_tensors, optimizer_tensors, substate
from .errors import CheckpointError, ConfigError
from .models.split import SplitModel, split
from .models.zoo import build_model
from .validate import check, validate

FORMAT = "splitshield-checkpoint/1"

#: The optimisation protocols :class:`Trainer` offers.
PROTOCOLS = ("default", "cem_official")

# CEM's official protocol (xiasong0501/CEM: run_exp.sh and model_training_paral_pruning.py), in the epochs of
# its 240-epoch run; the Trainer compresses it to its own number of epochs.
CEM_EPOCHS = 240
CEM_LR = 0.05
CEM_MOMENTUM = 0.9
CEM_WEIGHT_DECAY = 5e-4
CEM_WARMUP = 1  # epochs
CEM_MILESTONES = (60, 120, 180, 210)  # lr × CEM_GAMMA at each; the code's fifth, 260, lies past the end
CEM_GAMMA = 0.2
CEM_SELECT_AFTER = 200  # the model kept is the best on validation among the epochs after this one


@dataclass
class BestCheckpoint:
    """The best epoch so far of a run that selects its model on validation accuracy.

    ``tensors`` are the split model's (``model.*``) and the defense's (``defense.*``) state after that epoch.
    """

    epoch: int
    val_accuracy: float
    tensors: dict[str, torch.Tensor]


def seed_everything(seed: int) -> None:
    """Seed torch's global RNG (defense noise, dropout, initialisation) for reproducible CPU runs."""
    torch.manual_seed(seed)


class Trainer:
    """Train ``target`` (head + tail) and ``defense`` jointly on a classification task.

    Each step computes ``z = head(defense.perturb(x))``, ``z_sent = defense.obfuscate(z, training=True)``,
    ``logits = tail(z_sent)`` and minimises ``CE(logits, y) + defense.regularizer(...)``, plus, in a U-shaped
    split, ``defense.label_regularizer(y, returned, logits)`` on what the cloud's part returns, ``tail.cloud(z_sent)``.

    **Protocols.** ``protocol="default"`` is He et al.'s: Adam(lr, amsgrad, eps=1e-3), lr 1e-3 unless given,
    halved every ``lr_halve_every`` epochs (constant when ``None``); the model is the last epoch's.

    ``protocol="cem_official"`` is the protocol of CEM's official code (ALGORITHMS §B.3), its 240 epochs
    compressed proportionally to ``epochs``, as the code's own 120-epoch variant compresses its milestones: what
    the official run does after e of its 240 epochs happens here after the fraction e/240 of all training steps
    (``epochs`` × batches per epoch), so the learning rate may change between two batches of an epoch.

    - SGD with momentum 0.9 and weight decay 5e-4 (unless ``weight_decay`` is given), peak ``lr`` 0.05 unless
      given;
    - warm-up: the learning rate rises linearly, batch by batch, to ``lr`` over the first 1/240 of the steps,
      at most one epoch (the official run's first epoch);
    - steps: ``lr`` × 0.2 after 60, 120, 180 and 210 of the 240 epochs, ending at ``lr`` × 0.2⁴ (8e-5 from 0.05);
    - CEM's factor (:meth:`~splitshield.defenses.CEM.schedule_factor`: 0.001/lr, or 1 below lr 4.1e-4) reads this
      learning rate at every step, so with lr 0.05 CEM's pull is 0.02, 0.1, 0.5, then 1 over the last two
      stages. The warm-up ends within the first epoch, before CEM's first clustering, so it never reads a
      warm-up rate;
    - model selection: a share ``val_fraction`` of ``train`` (drawn with ``seed``) is held out and never
      trained on. After each epoch beyond 200/240 of ``epochs`` the model is evaluated on it with the defense
      as deployed, and at the end of :meth:`fit` the split model and the defense (parameters and buffers)
      return to the epoch of highest validation accuracy, the first of equals (:attr:`selected_epoch`). The
      optimiser and the defense's training state (e.g. CEM's clusters) stay the last epoch's; only a later
      :meth:`fit_tail` sees them. Its epochs run at the final rate.

    Where the official code differs: its epochs count from 1, so each of its steps comes one epoch (1/240 of
    the run) earlier; it steps its per-batch warm-up scheduler once per epoch, so its first epoch runs at
    learning rate 0; it selects the checkpoint on the test set, not on images held out of the training set.
    The batch size stays the caller's (the official run's is 128).

    Parameters
    ----------
    target:
        The split model to train, in place.
    defense:
        Applied between head and tail in training and in :meth:`evaluate`; ``None`` for no defense.
    epochs, batch_size:
        Optimisation settings; ``epochs`` is also the length the protocol's schedule spans.
    lr, weight_decay:
        Peak learning rate and L2 weight decay; ``None`` for the protocol's (1e-3 and 0, or 0.05 and 5e-4).
    lr_halve_every:
        The default protocol's schedule, in epochs.
    protocol:
        ``"default"`` or ``"cem_official"`` (above).
    augment:
        ``"none"`` or ``"he2019"``, He et al.'s CIFAR-10 augmentation (:mod:`splitshield.augment`), applied to
        every training batch (the tail's own epochs too).
    val_fraction:
        The share of the training images ``cem_official`` holds out to select the model on.
    seed:
        Fixes the initial shuffles, the held-out images and every random draw; the same seed gives the same
        model on CPU.
    device:
        ``"cpu"`` or e.g. ``"cuda"``.
    checkpoint_dir:
        When given, ``last.safetensors``/``last.json`` are written there after every epoch (with the
        optimiser's and the defense's training state, and the best epoch so far of a run that selects its
        model) and :meth:`fit` with ``resume=True`` continues from them, drawing what an uninterrupted run
        would: the resumed run ends with the same model.
    progress:
        Show a progress bar.
    """

    def __init__(self, target: SplitModel, defense: Defense | None = None, *, epochs: int = 5,
                 batch_size: int = 64, lr: float | None = None, weight_decay: float | None = None,
                 lr_halve_every: int | None = None, protocol: str = "default", val_fraction: float = 0.1,
                 augment: str = "none", seed: int = 0, device: str | torch.device = "cpu",
                 checkpoint_dir: str | Path | None = None, progress: bool = True):
        for field, value in (("epochs", epochs), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{field} must be a positive integer, got {value!r}")
        if protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        if augment not in AUGMENTATIONS:
            raise ConfigError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
        official = protocol == "cem_official"
        lr = (CEM_LR if official else 1e-3) if lr is None else lr
        weight_decay = (CEM_WEIGHT_DECAY if official else 0.0) if weight_decay is None else weight_decay
        if not lr > 0:
            raise ConfigError(f"lr must be > 0, got {lr!r}")
        if official and lr_halve_every is not None:
            raise ConfigError("lr_halve_every is the default protocol's schedule; "
                              "remove it with protocol='cem_official'")
        if official and not 0 < val_fraction < 1:
            raise ConfigError(f"val_fraction must be a share of the training set in (0, 1), e.g. 0.1; "
                              f"got {val_fraction!r}")
        self.device = torch.device(device)
        self.target = target.to(self.device)
        self.defense = (defense or NoDefense()).to(self.device)
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.lr_halve_every = lr_halve_every
        self.protocol, self.val_fraction = protocol, val_fraction
        self.augment = augment
        #: The epochs the learning-rate schedule and the model selection span (:meth:`fit_tail` adds epochs after).
        self.schedule_epochs = epochs
        self.seed = seed
        self.progress = progress
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        seed_everything(seed)
        params = list(self.target.parameters()) + [p for p in self.defense.parameters() if p.requires_grad]
        if official:
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=CEM_MOMENTUM,
                                                                    weight_decay=weight_decay)
        else:
            self.optimizer = torch.optim.Adam(params, lr=lr, eps=1e-3, amsgrad=True, weight_decay=weight_decay)
        self.epoch = 0
        self.train_data: ImageSet | None = None
        self.val_data: ImageSet | None = None
        self.history: list[dict[str, float]] = []
        self.best: BestCheckpoint | None = None
        #: The epoch whose model :meth:`fit` kept, when the protocol selects it; ``None`` before or otherwise.
        self.selected_epoch: int | None = None
        self._edge_frozen = False

    @property
    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def fit(self, train: ImageSet, test: ImageSet | None = None, resume: bool = False) -> list[dict[str, float]]:
        """Train for the configured epochs; returns one dict per epoch (loss, train accuracy, test accuracy with
        ``test``, and validation accuracy in the epochs the protocol selects the model among)."""
        self.train_data, self.val_data = self._hold_out(train)
        train = self.train_data
        resuming = resume and self.checkpoint_dir is not None and (self.checkpoint_dir / "last.json").is_file()
        # Every problem of the model and defense at once, before an epoch is spent finding the first.
        check(validate(self.target, self.defense, for_training=True, resume=resuming))
        if resuming:
            self._resume(self.checkpoint_dir / "last")
        steps = math.ceil(len(train) / self.batch_size)
        while self.epoch < self.epochs:
            # Per-epoch seeds make a resumed run draw exactly what an uninterrupted one draws.
            seed_everything(self.seed * 100_003 + self.epoch)
            self.defense.on_epoch_start(self)
            self.target.train()
            self.defense.train()
            if self._edge_frozen:  # batch norm statistics are state of the head too: keep them as they are
                self.target.head.eval()
                self.defense.eval()
            total, correct, loss_sum = 0, 0, 0.0
            batches = train.batches(self.batch_size, shuffle=True, seed=self.seed * 1000 + self.epoch,
                                    device=self.device)
            bar = tqdm(batches, total=steps, desc=f"train epoch {self.epoch + 1}/{self.epochs}",
                       disable=not self.progress, leave=False)
            for i, (x, y) in enumerate(bar):
                self._set_lr(self.epoch * steps + i, steps)
                loss, logits = self._step(x, y)
                total += len(y)
                correct += int((logits.argmax(1) == y).sum())
                loss_sum += float(loss) * len(y)
                bar.set_postfix(loss=f"{loss_sum / total:.4f}", acc=f"{correct / total:.3f}")
            self.epoch += 1
            self.defense.on_epoch_end(self)
            row = {"epoch": self.epoch, "loss": loss_sum / total, "train_accuracy": correct / total}
            if self._selecting():
                row["val_accuracy"] = self._keep_if_best()
            if test is not None:
                row["test_accuracy"] = self.evaluate(test)
            self.history.append(row)
            if self.checkpoint_dir is not None:
                self.save(self.checkpoint_dir / "last", include_optimizer=True)
        if self.best is not None and self.epoch == self.schedule_epochs:
            _load_states(self.target, self.defense, self.best.tensors)
            self.selected_epoch, self.best = self.best.epoch, None
        return self.history

    def fit_tail(self, train: ImageSet, epochs: int, test: ImageSet | None = None) -> list[dict[str, float]]:
        """Train the cloud tail alone for ``epochs`` more epochs: the edge head and the defense keep their
        parameters and statistics (their modules in eval mode), so the head the attacks see is the one
        :meth:`fit` trained, and only the tail catches up with it. Returns the whole history."""
        if not isinstance(epochs, int) or epochs < 0:
            raise ConfigError(f"epochs must be an integer >= 0, got {epochs!r}")
        tail = {id(p) for p in self.target.tail.parameters()}
        edge = [p for group in self.optimizer.param_groups for p in group["params"]
                if id(p) not in tail and p.requires_grad]
        for p in edge:
            p.requires_grad_(False)
        self.epochs += epochs
        self._edge_frozen = True
        try:
            return self.fit(train, test)
        finally:
            self._edge_frozen = False
            for p in edge:
                p.requires_grad_(True)

    def _hold_out(self, train: ImageSet) -> tuple[ImageSet, ImageSet | None]:
        """(the images to train on, the validation images): all of ``train`` and none, unless the protocol
        selects the model; then a random share ``val_fraction`` (drawn with ``seed``) is held out."""
        if self.protocol != "cem_official":
            return train, None
        n_val = round(self.val_fraction * len(train))
        if not 0 < n_val < len(train):
            raise ConfigError(f"val_fraction={self.val_fraction} of {len(train)} training images holds out "
                              f"{n_val}; train on more images or change val_fraction")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed))
        return train.subset(order[n_val:].sort().values), train.subset(order[:n_val].sort().values)

    def _set_lr(self, step: int, steps: int) -> None:
        """Set the learning rate of the run's ``step``-th batch (from 0; ``steps`` batches per epoch)."""
        if self.protocol == "default":
            lr = self.lr * 0.5 ** (step // steps // self.lr_halve_every) if self.lr_halve_every else self.lr
        else:
            total = self.schedule_epochs * steps
            warmup = min(math.ceil(total * CEM_WARMUP / CEM_EPOCHS), steps)
            if step < warmup:
                lr = self.lr * (step + 1) / warmup
            else:  # a milestone m is passed once step / total >= m / CEM_EPOCHS (in integers, exactly)
                lr = self.lr * CEM_GAMMA ** sum(step * CEM_EPOCHS >= m * total for m in CEM_MILESTONES)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _selecting(self) -> bool:
        """Whether the epoch just finished is one the model is selected among: later than 200/240 of the run."""
        end = self.schedule_epochs
        return self.val_data is not None and CEM_SELECT_AFTER * end < CEM_EPOCHS * self.epoch <= CEM_EPOCHS * end

    def _keep_if_best(self) -> float:
        """The validation accuracy of the epoch just finished; its model is kept if no earlier epoch's beat it.

        Evaluated right after the epoch (before any test set), so the epoch's seed fixes its noise draws too."""
        accuracy = self.evaluate(self.val_data)
        if self.best is None or accuracy > self.best.val_accuracy:
            states = (("model.", self.target.state_dict()), ("defense.", self.defense.state_dict()))
            tensors = {prefix + key: value.detach().cpu().clone()
                       for prefix, state in states for key, value in state.items()}
            self.best = BestCheckpoint(self.epoch, accuracy, tensors)
        return accuracy

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = augment(x, self.augment)
        z = self.target.head(self.defense.perturb(x, training=True))
        z_sent = self.defense.obfuscate(z, training=True)
        if self.target.u_shaped:  # the features the cloud returns are the label term's
            returned = self.target.tail.cloud(z_sent)
            logits = self.target.tail.edge(returned)
        else:
            logits = self.target.tail(z_sent)
        loss = F.cross_entropy(logits, y)
        extras = [self.defense.regularizer(x, y, z, z_sent, logits)]
        if self.target.u_shaped:
            extras.append(self.defense.label_regularizer(y, returned, logits))
        total = sum((e for e in extras if e is not None), loss)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        return loss.detach(), logits.detach()

    @torch.no_grad()
    def evaluate(self, data: ImageSet, batch_size: int = 1000) -> float:
        """Task accuracy with the defense applied as deployed (inference mode)."""
        return evaluate(self.target, self.defense, data, batch_size, self.device)

    # ---- checkpoints ----------------------------------------------------------------------------

    def save(self, path: str | Path, metrics: dict[str, Any] | None = None, include_optimizer: bool = False) -> Path:
        """Write ``path.safetensors`` and ``path.json``; returns the safetensors path.

        ``include_optimizer`` adds what resuming training needs: the optimiser's and the defense's training state,
        and the best epoch so far (``best.*`` tensors) of a run that selects its model.
        """
        meta: dict[str, Any] = {"epoch": self.epoch, "seed": self.seed, "history": self.history,
                                "train": {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                                          "lr_halve_every": self.lr_halve_every, "protocol": self.protocol}}
        if self.selected_epoch is not None:
            meta["selected_epoch"] = self.selected_epoch
        best = self.best if include_optimizer else None
        if best is not None:
            meta["best"] = {"epoch": best.epoch, "val_accuracy": best.val_accuracy}
        return save_checkpoint(path, self.target, self.defense, metrics=metrics, extra=meta,
                               optimizer=self.optimizer if include_optimizer else None,
                               extra_tensors={"best." + k: v for k, v in best.tensors.items()} if best else None)

    def _resume(self, path: Path) -> None:
        # fit's validation has refused a defense that cannot resume (resumable = False) before this point.
        tensors, meta = _read(path)
        protocol = meta.get("train", {}).get("protocol", "default")
        if protocol != self.protocol:
            raise CheckpointError(f"{path}.json was trained with protocol {protocol!r}, not {self.protocol!r}; "
                                  f"resume with protocol={protocol!r} or delete {path.parent} to start afresh")
        _load_states(self.target, self.defense, tensors)
        load_optimizer_tensors(self.optimizer, substate(tensors, "optim."))
        self.defense.load_training_state({k: v.to(self.device) for k, v in substate(tensors, "train_state.").items()})
        self.epoch = int(meta.get("epoch", 0))
        self.history = list(meta.get("history", []))
        self.selected_epoch = meta.get("selected_epoch")
        if "best" in meta:
            self.best = BestCheckpoint(int(meta["best"]["epoch"]), float(meta["best"]["val_accuracy"]),
                                       substate(tensors, "best."))


@torch.no_grad()
def evaluate(target: SplitModel, defense: Defense | None, data: ImageSet, batch_size: int = 1000,
             device: str | torch.device = "cpu") -> float:
    """Accuracy of ``tail(defense(head(x)))`` on ``data``, as deployed (defense in inference mode)."""
    defense = defense or NoDefense()
    modes = target.training, defense.training
    target.eval()
    defense.eval()
    correct = 0
    for x, y in data.batches(batch_size, device=device):
        logits = target.tail(defense.send(target.head, x))
        correct += int((logits.argmax(1) == y).sum())
    target.train(modes[0])
    defense.train(modes[1])
    return correct / max(len(data), 1)


def _json_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _st_path(path: Path) -> Path:
    return path.with_suffix(".safetensors")


def save_checkpoint(path: str | Path, target: SplitModel, defense: Defense | None = None, *,
                    metrics: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                    optimizer: torch.optim.Optimizer | None = None,
                    extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Save a split model and its defense as ``path.safetensors`` + ``path.json``.

    The JSON sidecar records how to rebuild the model (``model_spec``, set for zoo/torchvision
    models built with :func:`~splitshield.models.build_model`), the split point, the input shape,
    the defense config and ``metrics``. With ``optimizer`` the checkpoint can resume training: it also
    holds the optimiser's per-parameter state (``optim.*``) and the defense's training state (``train_state.*``).
    ``extra_tensors`` are stored under their own keys (e.g. ``best.model.*``, a run's best epoch so far).
    """
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    defense = defense or NoDefense()
    parts = [("model.", target.state_dict()), ("defense.", defense.state_dict())]
    if optimizer is not None:
        parts += [("optim.", optimizer_tensors(optimizer)), ("train_state.", defense.training_state())]
    parts.append(("", extra_tensors or {}))
    # Cloning makes every entry own its storage: safetensors refuses tensors that share memory.
    tensors = {prefix + key: value.detach().cpu().clone().contiguous()
               for prefix, state in parts for key, value in state.items()}
    meta = {
        "format": FORMAT,
        "model_spec": getattr(target, "model_spec", None),
        "split": target.point,
        "input_shape": list(target.input_shape) if target.input_shape else None,
        "defense": defense.config(),
        "metrics": metrics or {},
        **(extra or {}),
    }
    st = _st_path(path)
    tmp = st.with_suffix(".safetensors.tmp")
    save_file(tensors, str(tmp))
    tmp.replace(st)  # atomic: a crash mid-write never leaves a half checkpoint
    _json_path(path).write_text(json.dumps(meta, indent=2))
    return st


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    st, js = _st_path(path), _json_path(path)
    for f in (st, js):
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing (a checkpoint is NAME.safetensors + NAME.json)")
    try:
        meta = json.loads(js.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{js} is not valid JSON: {exc}") from None
    _check_meta(meta, js)
    try:
        tensors = load_file(str(st))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types on corrupt files
        raise CheckpointError(f"{st} is not a readable safetensors file: {exc}") from None
    return tensors, meta


def _positive_int(value: Any) -> bool:
    return type(value) is int and value >= 1


def _shape(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_positive_int(v) for v in value)


#: What each key of a checkpoint's ``model_spec`` (:func:`~splitshield.models.build_model`'s arguments) may hold.
_SPEC_FIELDS: dict[str, Any] = {
    "name": lambda v: isinstance(v, str) and bool(v),
    "num_classes": _positive_int,
    "in_channels": lambda v: v is None or _positive_int(v),
    "input_shape": lambda v: v is None or _shape(v),
    "seed": lambda v: v is None or type(v) is int,
}


def _check_meta(meta: Any, js: Path) -> None:
    """The fields of a checkpoint's JSON that loading reads, or a one-line CheckpointError naming the field."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{js}: must hold a JSON object (as save_checkpoint writes), got a {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{js}: format {meta.get('format')!r} is not {FORMAT!r}")
    fix = "; re-save the checkpoint (save_checkpoint or `splitshield train`)"
    if not isinstance(meta.get("split"), str) or not meta["split"]:
        raise CheckpointError(f"{js}: field 'split' must name the split point, got {meta.get('split')!r}{fix}")
    if meta.get("input_shape") is not None and not _shape(meta["input_shape"]):
        raise CheckpointError(f"{js}: field 'input_shape' must be positive integers [C, H, W] or null, "
                              f"got {meta['input_shape']!r}{fix}")
    if meta.get("model_spec") is not None and not isinstance(meta["model_spec"], dict):
        raise CheckpointError(f"{js}: field 'model_spec' must be an object (build_model's arguments) or null, "
                              f"got {meta['model_spec']!r}{fix}")
    if meta.get("defense") is not None and not isinstance(meta["defense"], dict):
        raise CheckpointError(f"{js}: field 'defense' must be a defense config object or null, "
                              f"got {meta['defense']!r}{fix}")


def _model_from_spec(spec: dict[str, Any], input_shape: tuple[int, ...] | None, js: Path) -> torch.nn.Module:
    """Build the uncut model a checkpoint's ``model_spec`` describes, or a one-line CheckpointError."""
    fix = "; re-save the checkpoint, or pass model=<the uncut nn.Module>"
    if "name" not in spec:
        raise CheckpointError(f"{js}: field 'model_spec' lacks the model's 'name'{fix}")
    for key, value in spec.items():
        if key not in _SPEC_FIELDS:
            raise CheckpointError(f"{js}: field 'model_spec' has an unknown key {key!r} (it takes "
                                  f"{', '.join(_SPEC_FIELDS)}){fix}")
        if not _SPEC_FIELDS[key](value):
            raise CheckpointError(f"{js}: field 'model_spec' has a bad {key!r}: {value!r}{fix}")
    try:
        return build_model(**{"input_shape": input_shape, **spec})  # older specs lack the input shape
    except ConfigError as exc:  # an unknown model name, a shape the model does not take
        raise CheckpointError(f"{js}: field 'model_spec' does not build a model: {str(exc).splitlines()[0]}{fix}"
                              ) from None


def _load_states(target: SplitModel, defense: Defense, tensors: dict[str, torch.Tensor]) -> None:
    for prefix, module in (("model.", target), ("defense.", defense)):
        try:
            module.load_state_dict(substate(tensors, prefix))
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise CheckpointError(f"checkpoint does not fit the {prefix[:-1]}: {first}") from None


def load_checkpoint(path: str | Path, model: torch.nn.Module | None = None,
                    device: str | torch.device = "cpu") -> tuple[SplitModel, Defense, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint` or :meth:`Trainer.save`.

    Parameters
    ----------
    path:
        ``NAME``, ``NAME.safetensors`` or ``NAME.json``.
    model:
        The uncut model architecture, needed when the checkpoint was not made from a zoo or
        torchvision model (its ``model_spec`` is ``null``).

    Returns
    -------
    (split model, defense, metadata)
    """
    from .defenses import build_defense

    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    tensors, meta = _read(path)
    input_shape = tuple(meta["input_shape"]) if meta.get("input_shape") else None
    if model is None:
        spec = meta.get("model_spec")
        if not spec:
            raise CheckpointError(f"{path}.json has no model_spec: pass model=<the uncut nn.Module>")
        model = _model_from_spec(spec, input_shape, _json_path(path))
    target = split(model, meta["split"], input_shape=input_shape)
    defense = build_defense(meta.get("defense") or {"name": "none"})
    _load_states(target, defense, tensors)
    target.to(device).eval()
    defense.to(device).eval()
    return target, defense, meta
