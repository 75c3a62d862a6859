"""Run an experiment spec: expand it into cells, run each once, store every result row.

A **cell** is dataset × model × split × defense setting × attack setting × seed, identified by the hash
of its full configuration. Cells that attack the same trained model share a **target** (dataset, model,
split, defense, seed, training settings), trained once and cached as a safetensors checkpoint under
``artifacts/targets/`` beside the database. A cell runs:

    load data -> build model -> split -> train with the defense (or load the cached target)
    -> Victim(threat, aux) -> attack.fit -> invert the evaluation images -> metrics

Work is shipped to executors per target (a *unit*: one target and the cells attacking it), so a
target is never trained twice at once. Workers return rows; only the driver writes the store, one
transaction per cell. Local workers hand over each cell as it finishes, so a killed run loses at most the
cells in flight; a Ray task returns its unit's cells together when the unit is done.

A cell is measured by :mod:`splitshield.measure`, the pipeline ``splitshield attack`` also runs.

Determinism: training uses the cell's spec seed (so the defenses of one seed share an initialisation:
a paired comparison), the attacker a seed derived from (spec seed, attack setting)
(:func:`~splitshield.measure.attack_seed`), and every cell runs with ``threads`` torch threads (1 by
default), so the local and Ray executors give the same numbers bit for bit.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._threads import torch_threads
from .config import DEFAULT_THREAT, ExperimentSpec
from .errors import CheckpointError, ConfigError, SplitError, SplitShieldError
from .measure import attack_seed, config_hash, measure_attack, measure_target, through_wire
from .store import CellRecord, ResultStore

if TYPE_CHECKING:
    from .models.split import ModelCuts

#: Bumped whenever a change to splitshield changes the numbers an existing cell would give (training, an
#: attack's or a defense's default behaviour, a metric). It is part of every target and cell hash, so a store
#: written by an older splitshield is measured again rather than resumed, and reports leave its cells out.
#: 1: cells written before the revision was recorded. 2: the inverse network and the online decoders of
#: adversarial training and InfoScissors standardise their input. 3: cuts keep mode-dependent modules whole,
#: the evaluation protocol takes at least 10 images on datasets with fewer classes, and the inverse network's
#: default decoder is sized to the auxiliary set, and the query-free shadow matches the moments of the traffic.
#: 4: one cell pipeline (``measure``): the attacker's seed depends on the attack setting only (common random
#: numbers across defenses), the CE floor counts every Gaussian part, attacks are validated and renamed.
#: 5: white-box rMLE tunes (λ_TV, λ_l2, lr) on the attacker's auxiliary images by default (``search="auto"``).
RESULTS_REVISION = 5


def current_cells(store: ResultStore) -> tuple[list[dict[str, Any]], int]:
    """The store's finished cells measured by this splitshield's :data:`RESULTS_REVISION`, and the number of
    finished cells from other revisions (older ones, or a newer splitshield's), whose numbers may differ and
    which are left out."""
    done = [c for c in store.cells(status="done") if c["config"].get("revision") != "imported"]
    current = [c for c in done if c["config"].get("revision", 1) == RESULTS_REVISION]
    return current, len(done) - len(current)


def imported_cells(store: ResultStore) -> list[dict[str, Any]]:
    """The store's cells imported from another tool's results (config ``"revision": "imported"``, with
    ``"imported": {"file", "by"}``): reported apart from the cells splitshield measured, never audited."""
    return [c for c in store.cells(status="done") if c["config"].get("revision") == "imported"]


# --------------------------------------------------------------------------------------------------
# spec -> cells


def _param_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def defense_label(config: dict[str, Any]) -> str:
    """``gaussian_noise(sigma=0.5)``, ``none``, ``gaussian_noise(sigma=0.5)+cem(lam=16)``."""
    if config["name"] == "compose":
        return "+".join(defense_label(part) for part in config["parts"])
    params = {k: v for k, v in config.items() if k != "name"}
    return f"{config['name']}({_param_text(params)})" if params else config["name"]


def defense_family(config: dict[str, Any]) -> str:
    """The defense without its strengths: what one privacy–utility curve is drawn for. Numeric parameters are
    strengths (``gaussian_noise``); a switch or a choice makes a family of its own
    (``adversarial(standardize=False)``, ``bound(kind=sigmoid)``)."""
    if config["name"] == "compose":
        return "+".join(defense_family(part) for part in config["parts"])
    kinds = {k: v for k, v in config.items() if k != "name" and isinstance(v, (bool, str))}
    return f"{config['name']}({_param_text(kinds)})" if kinds else config["name"]


_UNSET = object()


def attack_labels(settings: list[dict[str, Any]]) -> list[str]:
    """Name each attack setting by what distinguishes it from the others of the same attack: its threat, aux
    data and evaluated images where they are not the defaults or differ, and the parameters that differ."""
    labels = []
    for s in settings:
        same = [o for o in settings if o["name"] == s["name"]]
        # A parameter given as None (``search: null``) differs from one left out (the attack's default).
        varying = {k for o in same for k in {**o["params"], **s["params"]}
                   if o["params"].get(k, _UNSET) != s["params"].get(k, _UNSET)}
        extras = []
        if s["threat"] != DEFAULT_THREAT.get(s["name"]):
            extras.append(f"threat={s['threat']}")
        if any(o["aux"] != s["aux"] or o.get("aux_data") != s.get("aux_data") for o in same) or (
                s["aux"] != "same_distribution"):
            extras.append(f"aux={s['aux']}" + (f":{s['aux_data']}" if s.get("aux_data") else ""))
        for key in ("aux_n", "images"):
            if any(o.get(key) != s.get(key) for o in same):
                extras.append(f"{key}={s.get(key) or 'default'}")
        if any(o["adaptive"] != s["adaptive"] for o in same):
            extras.append("adaptive" if s["adaptive"] else "non-adaptive")
        extras += [f"{k}={s['params'][k]}" for k in sorted(varying) if k in s["params"]]
        labels.append(f"{s['name']}({', '.join(extras)})" if extras else s["name"])
    return labels


@dataclass(frozen=True)
class Cell:
    """One unit of measurement; ``config`` is everything that determines its numbers."""

    hash: str
    target_hash: str
    config: dict[str, Any]
    defense_label: str
    attack_label: str

    @property
    def dataset(self) -> str:
        return self.config["dataset"]

    @property
    def path(self) -> str:
        """``dataset/model/split/defense label/attack label/seed=N``: what ``--only`` patterns match."""
        c = self.config
        return f"{c['dataset']}/{c['model']}/{c['split']}/{self.defense_label}/{self.attack_label}/seed={c['seed']}"

    def row(self) -> dict[str, Any]:
        """The ``cells`` table columns."""
        c = self.config
        return {"hash": self.hash, "target_hash": self.target_hash, "dataset": c["dataset"], "model": c["model"],
                "split": c["split"], "defense": c["defense"], "defense_label": self.defense_label,
                "attack": c["attack"], "attack_label": self.attack_label, "seed": c["seed"], "config": c}


def plan(spec: ExperimentSpec) -> list[Cell]:
    """Expand a spec into its cells, in a stable order; checks every split point exists."""
    from .data import get_dataset_info

    _check_splits(spec)
    defenses = spec.defense_settings()
    attacks = spec.attack_settings()
    labels = attack_labels(attacks)
    train = spec.train.model_dump()
    evaluation = spec.evaluation.model_dump()
    loading = _loading(spec)
    # The test split's order decides the traffic a query-free attacker sees and the first n test images;
    # only set for the datasets whose order load_dataset may change, so the others keep their hashes.
    order = {d: {"test_order": "classes_in_turn"} if get_dataset_info(d).sorted_files else {} for d in spec.dataset}
    cells = []
    for dataset in spec.dataset:
        for model in spec.model:
            for split in spec.splits:
                for defense in defenses:
                    for seed in spec.seeds:
                        target = {"dataset": dataset, "model": model, "split": split, "defense": defense,
                                  "seed": seed, "train": train, "revision": RESULTS_REVISION}
                        if loading:  # only when set: a spec without them keeps its cells' hashes
                            target["loading"] = loading
                        target_hash = config_hash(target)
                        # The wire changes what is measured, not what is trained: a cell's, not a target's.
                        wire = {"wire": spec.wire.model_dump()} if spec.wire is not None else {}
                        for attack, label in zip(attacks, labels, strict=True):
                            config = {**target, **wire, "attack": attack, "evaluation": evaluation,
                                      **order[dataset]}
                            cells.append(Cell(config_hash(config), target_hash, config, defense_label(defense), label))
    return cells


def _sets_label_lam(setting: Any) -> bool:
    """Whether a defense setting (a part of a composition included) gives a label term a nonzero weight."""
    if isinstance(setting, dict):
        return bool(setting.get("label_lam")) or any(_sets_label_lam(v) for v in setting.values())
    return isinstance(setting, list) and any(_sets_label_lam(v) for v in setting)


def _check_splits(spec: ExperimentSpec) -> None:
    from .data import get_dataset_info
    from .models import build_model
    from .models.split import U_SEPARATOR, ModelCuts

    loading = _loading(spec)
    u_shaped = next((s for s in spec.splits if U_SEPARATOR in s), None)
    query_free = next((a["name"] for a in spec.attack_settings() if a["threat"] == "query_free"), None)
    if u_shaped and query_free:
        raise ConfigError(f"spec field attacks: {query_free} runs query_free, which needs the classifier in the "
                          f"cloud; the U-shaped split {u_shaped!r} keeps it on the device: remove the attack, or "
                          "split these cells into a spec of their own")
    two_part = next((s for s in spec.splits if U_SEPARATOR not in s), None)
    if two_part and any(_sets_label_lam(d) for d in spec.defense_settings()):
        raise ConfigError(f"spec field defenses: label_lam regularises the features the cloud returns to the "
                          f"device, which only a U-shaped split has, not {two_part!r}: cut it first..second or remove "
                          "label_lam")
    for dataset in spec.dataset:
        # The registered image shape unless loading options change it; a pattern's (npz:PATH) needs loading.
        shape = spec.image_shape or (None if loading else get_dataset_info(dataset).image_shape) or _load_data(
            dataset, spec.data_dir, 0, spec.download, loading).image_shape
        for model_name in spec.model:
            cuts = ModelCuts(build_model(model_name, num_classes=10, input_shape=shape), shape)
            names = {p.name for p in cuts.points} | {a for p in cuts.points for a in p.aliases}
            for s in spec.splits:
                for point in s.split(U_SEPARATOR):
                    if point not in names:
                        raise ConfigError(f"spec field splits: {point!r} is not a split point of {model_name} on "
                                          f"{dataset}; allowed: {', '.join(p.name for p in cuts.points)}"
                                          + (" (a U-shaped split joins two of them in order: first..second)"
                                             if U_SEPARATOR in s else ""))
                if U_SEPARATOR in s:
                    try:
                        cuts.split(s)
                    except SplitError as exc:
                        raise ConfigError(f"spec field splits: {exc}") from None
                _check_he2019_settings(spec, cuts, s, shape)


def _check_he2019_settings(spec: ExperimentSpec, cuts: ModelCuts, point: str, shape: tuple[int, ...]) -> None:
    """Before any training: a ``shadow_head`` or ``model_reconstruction`` with ``shadow: he2019`` needs He et al.'s
    net for ``point`` of the model that ``cuts`` splits (input ``shape``); an ``rmle`` with ``search: he2019``
    their network cut there; alone or as a portfolio's member."""
    from .attacks.portfolio import member_specs
    from .attacks.stand_in import he2019_different_head
    from .attacks.whitebox import he2019_normalisation

    for i, entry in enumerate(spec.attacks):
        for setting in entry.settings():
            params = setting["params"]
            checked = [(f"attacks[{i}]", entry.name, params)]
            if entry.name == "strongest":
                checked += [(f"attacks[{i}].members.{m['name']}", m["name"], m)
                            for m in member_specs(params.get("members")) or []]
            for where, name, p in checked:
                try:
                    if name in ("shadow_head", "model_reconstruction") and p.get("shadow") == "he2019":
                        where += ".shadow"
                        he2019_different_head(point, shape, cuts.split(point).feature_shape())
                    if name == "rmle" and p.get("search") == "he2019":
                        where += ".search"
                        he2019_normalisation(point, cuts.split(point).head, shape)
                except ConfigError as exc:
                    raise ConfigError(f"spec field {where}: {exc}, or remove split {point!r}") from None


# --------------------------------------------------------------------------------------------------
# running one unit (a target and the cells attacking it) — runs in a worker


@dataclass
class CellOutcome:
    """A worker's result for one cell: rows, timings and the tensors the driver turns into artifacts."""

    cell_hash: str
    metrics: list[tuple[str, int, float]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    original: np.ndarray | None = None
    reconstruction: np.ndarray | None = None
    checkpoint: str | None = None
    target_cached: bool = False
    error: str | None = None


_DATA_CACHE: dict[tuple, Any] = {}


def _loading(spec: ExperimentSpec) -> dict[str, list]:
    """The spec's options for loading its data (value range, image shape), only those it sets."""
    options = {"value_range": spec.value_range, "image_shape": spec.image_shape}
    return {k: list(v) for k, v in options.items() if v is not None}


def _load_data(name: str, data_dir: str | None, seed: int, download: bool = False, loading: dict | None = None):
    from .data import load_dataset

    loading = loading or {}
    key = (name, data_dir, seed, repr(sorted(loading.items())))
    if key not in _DATA_CACHE:
        # Two datasets in memory per worker are enough: units are grouped by dataset, and an attacker may hold
        # another one (aux other_distribution).
        while len(_DATA_CACHE) >= 2:
            _DATA_CACHE.pop(next(iter(_DATA_CACHE)))
        _DATA_CACHE[key] = load_dataset(name, data_dir=data_dir, seed=seed, download=download,
                                        **{k: tuple(v) for k, v in loading.items()})
    return _DATA_CACHE[key]


#: The fields of a cell's config that make its target (``plan`` hashes them into the target hash).
_TARGET_FIELDS = ("dataset", "model", "split", "defense", "seed", "train", "revision", "loading")


def _target_path(root: Path, target_hash: str) -> Path:
    return root / "artifacts" / "targets" / target_hash[:20]


def _get_target(config: dict[str, Any], target_hash: str, data, root: Path, device: str, progress: bool):
    """Load the cached trained target, or train it and cache it.

    Returns (target, defense, training times, cached); the times (``train_seconds`` wall,
    ``train_cpu_seconds`` process CPU) are the ones measured when the target was trained, also when cached
    (for a target whose training was resumed, those of the last process only).
    """
    from .defenses import build_defense
    from .models import build_model, split
    from .train import Trainer, load_checkpoint, save_checkpoint

    path = _target_path(root, target_hash)
    if path.with_suffix(".json").is_file():
        try:
            target, defense, meta = load_checkpoint(path, device=device)
            return target, defense, meta.get("train_times", {}), True
        except CheckpointError:
            pass  # a half-written cache entry (killed mid-save): train again and overwrite it
    sibling = _sibling_path(config, root)
    if sibling is not None and sibling.with_suffix(".json").is_file():
        # Undefended, the trained model does not depend on where it is cut (the same draws, the same arithmetic):
        # the model trained for another split point, cut here.
        model = build_model(config["model"], num_classes=data.num_classes, input_shape=data.image_shape)
        try:
            _, defense, meta = load_checkpoint(sibling, model=model, device=device)
        except CheckpointError:
            pass  # train it below
        else:
            target = split(model, config["split"], input_shape=data.image_shape).to(device).eval()
            save_checkpoint(path, target, defense, extra={"train_times": meta.get("train_times", {}), "target_config": {
                k: config[k] for k in ("dataset", "model", "split", "defense", "seed", "train")}})
            return target, defense.eval(), meta.get("train_times", {}), True
    wall, cpu = time.perf_counter(), time.process_time()
    train = config["train"]
    model = build_model(config["model"], num_classes=data.num_classes, input_shape=data.image_shape)
    target = split(model, config["split"], input_shape=data.image_shape)
    defense = build_defense(config["defense"], feature_shape=target.feature_shape())
    train_set = data.train if train["train_n"] is None else data.train.take(train["train_n"])
    # Training state after every epoch: a run killed mid-training continues from its last epoch.
    state = path.with_name(path.name + ".training")
    trainer = Trainer(target, defense, epochs=train["epochs"], batch_size=train["batch_size"], lr=train["lr"],
                      lr_halve_every=train["lr_halve_every"], protocol=train.get("protocol", "default"),
                      augment=train.get("augment", "none"),
                      seed=config["seed"], device=device, progress=progress, checkpoint_dir=state)
    trainer.fit(train_set, resume=True)
    if train.get("tail_epochs"):
        trainer.fit_tail(train_set, train["tail_epochs"])
    times = {"train_seconds": time.perf_counter() - wall, "train_cpu_seconds": time.process_time() - cpu}
    save_checkpoint(path, target, defense, extra={"train_times": times, "target_config": {
        k: config[k] for k in ("dataset", "model", "split", "defense", "seed", "train")}})
    if sibling is not None:  # written after the checkpoint, so it never names a half-written one
        sibling.parent.mkdir(parents=True, exist_ok=True)
        for suffix in (".safetensors", ".json"):
            shutil.copyfile(path.with_suffix(suffix), sibling.with_suffix(suffix + ".tmp"))
        for suffix in (".safetensors", ".json"):
            sibling.with_suffix(suffix + ".tmp").replace(sibling.with_suffix(suffix))
    shutil.rmtree(state, ignore_errors=True)
    return target.eval(), defense.eval(), times, False


def _sibling_path(config: dict[str, Any], root: Path) -> Path | None:
    """Where the trained model shared by every split point of an undefended target is kept; ``None`` when the
    training depends on the split point (a defense sits at the cut; ``tail_epochs`` freeze the head)."""
    if config["defense"] != {"name": "none"} or config["train"].get("tail_epochs"):
        return None
    key = config_hash({k: v for k, v in config.items() if k in _TARGET_FIELDS and k != "split"})
    return root / "artifacts" / "models" / key[:20]


def run_unit(unit: dict[str, Any], root: str, progress: bool = False, threads: int = 1) -> Iterator[CellOutcome]:
    """Run one target's cells, yielding each cell's outcome as soon as it is measured.

    ``unit`` is ``{"target_hash", "cells": [{"hash", "config"}, ...], "data_dir", "device"}`` (plain
    data, so it travels to process and Ray workers). A failing cell yields an outcome with ``error``.
    """
    root_path = Path(root)
    device = unit["device"]
    target = trained_defense = None
    target_rows: dict[str, list[tuple[str, int, float]]] = {}  # per wire setting
    train_times: dict[str, float] = {}
    cached = False
    with torch_threads(threads):
        for cell in unit["cells"]:
            config, start = cell["config"], time.perf_counter()
            try:
                data = _load_data(config["dataset"], unit["data_dir"], config["seed"], unit["download"],
                                  config.get("loading"))
                first = target is None
                evaluation = config["evaluation"]
                if first:
                    target, trained_defense, train_times, cached = _get_target(config, unit["target_hash"], data,
                                                                               root_path, device, progress)
                wire = config.get("wire")
                defense = trained_defense if wire is None else through_wire(trained_defense, **wire)
                if (key := json.dumps(wire, sort_keys=True)) not in target_rows:
                    target_rows[key] = measure_target(target, defense, data, seed=config["seed"],
                                                      test_n=evaluation["test_n"], metrics=evaluation["metrics"],
                                                      device=device)
                    target_rows[key] += [(k, -1, v) for k, v in train_times.items() if k in evaluation["metrics"]]
                attack_start = time.perf_counter()
                setting = config["attack"]
                other = None if setting.get("aux_data") is None else _load_data(
                    setting["aux_data"], unit["data_dir"], config["seed"], unit["download"])
                result = measure_attack(target, defense, data, setting, images=setting.get("images",
                                        evaluation["images"]), seed=attack_seed(config["seed"], setting),
                                        test_n=evaluation["test_n"], metrics=evaluation["metrics"], device=device,
                                        progress=progress, other=other)
            except (SplitShieldError, RuntimeError, ValueError, TypeError) as exc:
                last = traceback.format_exception_only(type(exc), exc)[-1].strip()
                yield CellOutcome(cell["hash"], error=last)
                continue
            now = time.perf_counter()
            yield CellOutcome(
                cell["hash"], metrics=target_rows[key] + result.metrics,
                # The training time is charged to the cell that trained the target; the others reuse it.
                timings={"train_seconds": train_times.get("train_seconds", 0.0) if first and not cached else 0.0,
                         "attack_seconds": now - attack_start, "compute_seconds": now - start},
                original=result.original, reconstruction=result.reconstruction,
                checkpoint=str(_target_path(root_path, unit["target_hash"]).relative_to(root_path)) + ".safetensors",
                target_cached=cached or not first)


def run_unit_all(unit: dict[str, Any], root: str, threads: int = 1) -> list[CellOutcome]:
    """:func:`run_unit` collected into a list: what Ray workers execute."""
    return list(run_unit(unit, root, progress=False, threads=threads))


def _run_unit_into(unit: dict[str, Any], root: str, threads: int, outcomes: Any) -> None:
    """:func:`run_unit`, each outcome put on the queue ``outcomes`` as soon as it is measured: what the local
    worker processes execute, so that the driver stores a cell while its unit's other cells still run."""
    for outcome in run_unit(unit, root, progress=False, threads=threads):
        outcomes.put(outcome)


# --------------------------------------------------------------------------------------------------
# the driver: executors, artifacts, the store


@dataclass
class RunSummary:
    """What a call to :func:`run_experiment` did."""

    run_id: int
    cells_total: int
    cells_skipped: int
    cells_done: int
    failures: dict[str, str]
    seconds: float
    overhead_seconds: float
    compute_seconds: float


def _units(cells: list[Cell], spec: ExperimentSpec) -> list[dict[str, Any]]:
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell.target_hash, []).append(cell)
    return [{"target_hash": h, "data_dir": spec.data_dir, "download": spec.download, "device": spec.device,
             "cells": [{"hash": c.hash, "config": c.config} for c in group]} for h, group in groups.items()]


def _write_artifacts(store: ResultStore, cell: Cell, outcome: CellOutcome, pngs: bool) -> dict[str, str]:
    from safetensors.numpy import save_file

    artifacts = {}
    if outcome.checkpoint:
        artifacts["checkpoint"] = outcome.checkpoint
    if outcome.reconstruction is None:
        return artifacts
    folder = Path("artifacts") / "cells" / cell.hash[:20]
    (store.root / folder).mkdir(parents=True, exist_ok=True)
    tensors = folder / "reconstruction.safetensors"
    save_file({"original": np.ascontiguousarray(outcome.original),
               "reconstruction": np.ascontiguousarray(outcome.reconstruction)}, str(store.root / tensors))
    artifacts["reconstruction"] = str(tensors)
    if pngs:
        from .figures import reconstruction_grid

        png = folder / "grid.png"
        reconstruction_grid(torch.from_numpy(outcome.original),
                            [(cell.attack_label, torch.from_numpy(outcome.reconstruction))], store.root / png,
                            title=f"{cell.config['split']} · {cell.defense_label}")
        artifacts["grid"] = str(png)
    return artifacts


def _local_results(units: list[dict[str, Any]], root: str, jobs: int, progress: bool,
                   threads: int) -> Iterator[CellOutcome]:
    if jobs <= 1:
        for unit in units:
            yield from run_unit(unit, root, progress=progress, threads=threads)
        return
    import multiprocessing
    from queue import Empty

    # spawn: a forked child would inherit the parent's torch thread pool and open database handle.
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        outcomes = manager.Queue()
        pending = {pool.submit(_run_unit_into, unit, root, threads, outcomes) for unit in units}
        # A worker puts a unit's outcomes before its task returns: once every task is done, draining the queue
        # leaves nothing behind.
        while pending or not outcomes.empty():
            try:
                yield outcomes.get(timeout=0.5)
                continue
            except Empty:
                pass
            finished = {future for future in pending if future.done()}
            for future in finished:
                future.result()  # a worker that crashed outside a cell raises here
            pending -= finished


def _ray_results(units: list[dict[str, Any]], root: str, address: str | None, threads: int) -> Iterator[CellOutcome]:
    try:
        import ray
    except ImportError:
        raise ConfigError("executor 'ray' needs Ray: pip install 'splitshield[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    task = ray.remote(num_cpus=threads)(run_unit_all)
    pending = [task.remote(unit, root, threads) for unit in units]
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        yield from ray.get(ready[0])


def select(cells: list[Cell], patterns: list[str]) -> list[Cell]:
    """The cells whose path ``dataset/model/split/defense label/attack label/seed=N`` matches one of the
    shell-style ``patterns`` (``*`` any text, ``?`` one character, ``[...]`` a set); all cells when none given."""
    if not patterns:
        return cells
    chosen = [c for c in cells if any(fnmatch.fnmatchcase(c.path, p) for p in patterns)]
    if not chosen:
        raise ConfigError(f"--only {' '.join(patterns)}: matches none of the spec's {len(cells)} cells, whose "
                          f"paths look like {cells[0].path!r}")
    return chosen


def run_experiment(spec: ExperimentSpec, db: str | Path = "results.db", *, executor: str = "local", jobs: int = 1,
                   address: str | None = None, threads: int = 1, progress: bool = True, pngs: bool = False,
                   only: list[str] | None = None, log: Callable[[str], None] | None = None) -> RunSummary:
    """Run every cell of ``spec`` not already done in the store ``db``.

    Parameters
    ----------
    executor:
        ``local`` (sequential, or ``jobs`` worker processes) or ``ray`` (``address`` as for ``ray.init``;
        a local Ray instance when ``None`` and none is running).
    threads:
        Torch threads per cell. Keep it fixed to compare numbers across executors.
    progress:
        Progress bars: cells overall, and (sequential local runs) the running cell's training/attack.
    pngs:
        Also write a reconstruction grid PNG per cell beside its tensors (the report draws its own
        grids from the tensors; a PNG per cell costs about 0.3 s of matplotlib in the driver).
    only:
        Run only the cells matching one of these patterns (:func:`select`); the others stay as they are.
    log:
        Called with one line per finished cell (for ``--quiet`` logs).
    """
    from tqdm.auto import tqdm

    if executor not in ("local", "ray"):
        raise ConfigError(f"executor must be 'local' or 'ray', got {executor!r}")
    if jobs < 1:
        raise ConfigError(f"jobs must be >= 1, got {jobs}")
    start = time.perf_counter()
    cells = select(plan(spec), only or [])
    by_hash = {c.hash: c for c in cells}
    store = ResultStore(db)
    try:
        run_id = store.start_run(spec.name, spec.model_dump(), executor, len(cells))
        store.register_cells(run_id, [c.row() for c in cells])
        status = store.status(by_hash)
        todo = [c for c in cells if status.get(c.hash) != "done"]
        units = _units(todo, spec)
        root = str(store.root.resolve())
        if executor == "ray":
            results = _ray_results(units, root, address, threads)
        else:
            results = _local_results(units, root, jobs, progress and jobs == 1, threads)
        failures: dict[str, str] = {}
        overhead = compute = 0.0
        bar = tqdm(total=len(todo), desc="cells", unit="cell", disable=not progress, position=0)
        done = 0
        for outcome in results:
            write_start = time.perf_counter()
            cell = by_hash[outcome.cell_hash]
            if outcome.error is not None:
                store.record_failure(cell.hash, outcome.error)
                failures[cell.hash] = outcome.error
                message = f"FAILED {cell.config['split']} {cell.defense_label} {cell.attack_label}: {outcome.error}"
            else:
                artifacts = _write_artifacts(store, cell, outcome, pngs)
                store.record(CellRecord(cell.hash, outcome.metrics, outcome.timings, artifacts, outcome.target_cached))
                compute += outcome.timings.get("compute_seconds", 0.0)
                agg = {n: v for n, i, v in outcome.metrics if i == -1}
                shown = ", ".join(f"{k}={v:.3f}" for k, v in agg.items())
                message = f"{cell.config['split']} | {cell.defense_label} | {cell.attack_label} | {shown}"
            done += 1
            overhead += time.perf_counter() - write_start
            bar.update(1)
            if log is not None:
                log(f"[{done}/{len(todo)}] {message}")
        bar.close()
        store.finish_run(run_id, done)
    finally:
        store.close()
    seconds = time.perf_counter() - start
    return RunSummary(run_id, len(cells), len(cells) - len(todo), done - len(failures), failures, seconds,
                      overhead, compute)
