"""The ``splitshield`` command line: a thin layer over the library (parse, call, print)."""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ._fs import check_writable
from ._threads import torch_threads
from .data import BUILTIN, get_dataset_info, list_datasets
from .errors import ConfigError, SplitShieldError
from .models import list_models

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Measure how much of a user's input leaks through split-inference features, and stop it.",
)
console = Console()
err_console = Console(stderr=True)


def _print_table(table: Table) -> None:
    """Print ``table`` on the terminal, or whole into a file or a pipe: a console that is not a terminal is 80 columns
    wide, and rich would cut the table's numbers short ("…") to fit it."""
    (console if console.is_terminal else Console(width=100_000)).print(table)


Seed = Annotated[int, typer.Option(help="Seed of every random choice; same seed, same numbers on CPU.")]
Device = Annotated[str, typer.Option(help="Torch device: cpu, cuda, cuda:1, mps.")]
SpecDevice = Annotated[str | None, typer.Option(
    help="Torch device of every cell (cpu, cuda, cuda:1, mps), in place of the spec's `device`; the cells' "
         "hashes stay the same, so results measured on either device resume each other.")]
# Names come from the registries (imported with the package anyway; torchvision's names are not listed).
ModelName = Annotated[str, typer.Argument(help=f"{', '.join(list_models())}, or a torchvision classifier name.")]
DataDir = Annotated[Path | None, typer.Option(
    "--data-dir", envvar="SPLITSHIELD_DATA",
    help=f"Folder or npz file of {' / '.join(n for n in list_datasets() if get_dataset_info(n).files)}.")]

ValueRange = Annotated[str | None, typer.Option(
    help="LO,HI: the scale the stored pixels are on (e.g. 0,16 for scikit-learn's digits); mapped to 0..255.")]
ImageShape = Annotated[str | None, typer.Option(
    help="C,H,W to convert every image to on loading (grey <-> RGB, resizing), e.g. 3,32,32.")]


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a SplitShieldError into one line on stderr and exit code 2: users see no tracebacks. The
    ``--device`` of every command that has one is checked first, before any work."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            if kwargs.get("device") is not None:
                check_device(kwargs["device"])
            return fn(*args, **kwargs)
        except SplitShieldError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def check_device(text: str, field: str = "--device") -> None:
    """A device this machine has (cpu, cuda[:N], mps), or a one-line ConfigError naming ``field``."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise ConfigError(f"{field}: {text!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{field} {text}: no CUDA GPU is available on this machine; use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{field} {text}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                          f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{field} {text}: Apple's MPS is not available on this machine; use cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{field} {text}: splitshield runs on cpu, cuda or mps")


def parse_shape(text: str, field: str = "--input-shape") -> tuple[int, ...]:
    """'1,28,28' -> (1, 28, 28)."""
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise ConfigError(f"{field}: expected C,H,W such as 1,28,28, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"{field}: expected three positive integers C,H,W such as 1,28,28, got {text!r}")
    return shape


def load_data(dataset: str, data_dir: Path | None, seed: int, value_range: str | None, image_shape: str | None):
    """``load_dataset`` with the CLI's --value-range and --image-shape parsed."""
    from .data import load_dataset

    scale = None
    if value_range is not None:  # load_dataset checks the two numbers and their order
        try:
            scale = tuple(float(v) for v in value_range.split(","))
        except ValueError:
            raise ConfigError(f"--value-range: expected LO,HI such as 0,16, got {value_range!r}") from None
    shape = parse_shape(image_shape, "--image-shape") if image_shape is not None else None
    return load_dataset(dataset, data_dir=data_dir, seed=seed, value_range=scale, image_shape=shape)


def parse_json(text: str | None, field: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        example = '{"name": "gaussian_noise", "sigma": 0.5}'
        raise ConfigError(f"{field}: not valid JSON ({exc.msg}); e.g. '{example}'") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{field}: expected a JSON object, got {type(value).__name__}")
    return value


@app.command()
@friendly
def demo(
    out: Annotated[Path, typer.Option(help="Output folder: results store, report.md, report.html, figures/.")] = Path(
        "splitshield-report"),
    seed: Seed = 0,
    device: Device = "cpu",
    quick: Annotated[bool, typer.Option(help="Tiny budgets (seconds, for smoke tests): numbers are not meaningful.")
                     ] = False,
) -> None:
    """Train LeNet on built-in MNIST digits with no defense, noise and noise + CEM; attack it at conv1 and
    ReLU2 three ways; print the table and write the report."""
    from .demo import run_demo
    from .report import summary_sentence

    result = run_demo(out, seed=seed, device=device, quick=quick)
    for section in result.sections:
        table = Table(title=f"{section.dataset} · {section.model} · split {section.split}: PSNR (dB) / SSIM "
                            "of the reconstructions (first test image of each digit)")
        table.add_column("defense", overflow="fold")
        table.add_column("accuracy", justify="right")
        for attack in section.inversion_attacks:
            table.add_column(attack, justify="right")
        for row in section.rows:
            cells = [f"{row.attacks[a]['psnr']:.1f} / {row.attacks[a]['ssim']:.2f}" if a in row.attacks else "–"
                     for a in section.inversion_attacks]
            table.add_row(row.label, "–" if row.accuracy is None else f"{row.accuracy:.1%}", *cells)
        _print_table(table)
        console.print(summary_sentence(section), highlight=False)
    console.print(f"wrote {result.report.html} and {result.report.markdown} "
                  f"({len(result.report.figures)} figures) in {result.summary.seconds:.0f} s", highlight=False)


@app.command("split-points")
@friendly
def split_points_cmd(
    model: ModelName,
    input_shape: Annotated[str | None, typer.Option(
        help="C,H,W of one input image, e.g. 1,28,28 or 3,32,32 (default: the model's native shape; "
             "torchvision models take grey images too).")] = None,
    num_classes: int = 10,
) -> None:
    """List the legal split points of a model with their feature shapes."""
    from .models import build_model, split_points

    net = build_model(model, num_classes=num_classes, input_shape=parse_shape(input_shape) if input_shape else None)
    shape = tuple(net.model_spec["input_shape"])
    table = Table(title=f"{model}: legal split points for input {shape}")
    table.add_column("#", justify="right")
    table.add_column("point")
    table.add_column("feature shape")
    table.add_column("elements", justify="right")
    table.add_column("also named")
    for i, p in enumerate(split_points(net, shape)):
        elements = 1
        for d in p.feature_shape or ():
            elements *= d
        table.add_row(str(i), p.name, "×".join(map(str, p.feature_shape or ())), str(elements), ", ".join(p.aliases))
    _print_table(table)


@app.command()
@friendly
def train(
    model: ModelName,
    split_at: Annotated[str, typer.Option("--split", help="Split point (see `splitshield split-points`).")],
    out: Annotated[Path, typer.Option(help="Checkpoint path: writes OUT.safetensors and OUT.json.")],
    dataset: Annotated[str, typer.Option(help=f"{', '.join(list_datasets())} ({BUILTIN} is built in).")
                       ] = BUILTIN,
    data_dir: DataDir = None,
    value_range: ValueRange = None,
    image_shape: ImageShape = None,
    epochs: int = 5,
    batch_size: int = 64,
    lr: float = 1e-3,
    augment: Annotated[str, typer.Option(help="none, or he2019: He et al.'s CIFAR-10 augmentation (flip, rotation, "
                                              "shift, zoom).")] = "none",
    defense: Annotated[str | None, typer.Option(help='Defense config as JSON, e.g. \'{"name": "none"}\'.')] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT's training state if present.")] = False,
    seed: Seed = 0,
    device: Device = "cpu",
) -> None:
    """Train a model split at a point (with an optional defense) and save a checkpoint."""
    from .augment import AUGMENTATIONS
    from .defenses import build_defense
    from .models import build_model, split
    from .train import Trainer

    if augment not in AUGMENTATIONS:
        raise ConfigError(f"--augment: one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
    check_writable(out, "--out")  # before training, so no trained model is lost
    data = load_data(dataset, data_dir, seed, value_range, image_shape)
    net = build_model(model, num_classes=data.num_classes, input_shape=data.image_shape)
    target = split(net, split_at, input_shape=data.image_shape)
    config = parse_json(defense, "--defense")
    guard = build_defense(config) if config else None
    trainer = Trainer(target, guard, epochs=epochs, batch_size=batch_size, lr=lr, augment=augment, seed=seed,
                      device=device, checkpoint_dir=out.parent / f".{out.name}.state" if resume else None)
    trainer.fit(data.train, resume=resume)
    accuracy = trainer.evaluate(data.test)
    path = trainer.save(out, metrics={"test_accuracy": accuracy, "dataset": dataset})
    console.print(f"test accuracy {accuracy:.2%}; wrote {path} and {path.with_suffix('.json')}")


@app.command()
@friendly
def attack(
    checkpoint: Annotated[Path, typer.Argument(
        help="NAME.safetensors written by `splitshield train`, or an artifact of `splitshield export`: the edge's "
             "(head + defense), or the cloud's (tail only: what a curious cloud holds; needs --transcript).")],
    attack_choice: Annotated[str, typer.Option("--attack", help="rmle, inverse_network, model_reconstruction, "
                                               "shadow_head, unsplit, prior_inversion, strongest, model_completion "
                                               "(or the old names white_box, black_box, query_free).")
                             ] = "inverse_network",
    dataset: Annotated[str, typer.Option(help="Dataset of the private images and the attacker's aux data.")
                       ] = BUILTIN,
    data_dir: DataDir = None,
    value_range: ValueRange = None,
    image_shape: ImageShape = None,
    aux: Annotated[str, typer.Option(help="same_set, same_distribution, noise, random_fields (smooth random "
                                          "shapes) or other_distribution (with --aux-data).")] = "same_distribution",
    aux_data: Annotated[str | None, typer.Option(
        help="With --aux other_distribution: the dataset whose training images the attacker holds (read from "
             "--data-dir, converted to the target's image shape).")] = None,
    aux_n: Annotated[int | None, typer.Option(help="Keep at most this many auxiliary images (default: all).")
                     ] = None,
    threat: Annotated[str | None, typer.Option(help="white_box, black_box, query_free or architecture_only (default: "
                                                    "the attack's own: rmle white_box, shadow_head query_free, "
                                                    "unsplit architecture_only, else black_box).")
                      ] = None,
    n_images: Annotated[int, typer.Option(help="0: the first test image of each class; N: the first N test images.")
                        ] = 0,
    options: Annotated[str | None, typer.Option(help='Attack parameters as JSON, e.g. \'{"iters": 1000}\'.')] = None,
    non_adaptive: Annotated[bool, typer.Option(help="The attacker ignores the defense (labelled as such).")] = False,
    out: Annotated[Path | None, typer.Option(help="Folder for the grid PNG and reconstructions (safetensors).")
                   ] = None,
    transcript: Annotated[Path | None, typer.Option(
        help="Invert the features recorded by `splitshield serve --record` instead of test images.")] = None,
    limit: Annotated[int | None, typer.Option(
        help="With --transcript: invert at most this many recorded features (the earliest), read streaming.")
                     ] = None,
    seed: Seed = 0,
    device: Device = "cpu",
) -> None:
    """Attack a trained checkpoint and print PSNR / SSIM / MSE (or completion accuracy).

    It measures exactly as `splitshield run` does (one pipeline, one seeding rule): the same checkpoint, attack
    settings and seed give the same numbers as the spec cell with those settings. Given a cloud artifact, the
    attacker holds only what the cloud holds (the tail's weights, the head's architecture, no defense) and
    inverts the features of a --transcript under query_free (shadow_head) or architecture_only (unsplit).
    """
    import torch
    from safetensors.torch import save_file

    from .attacks import ATTACKS, attack_name
    from .config import AUX_KINDS, DEFAULT_THREAT, RESERVED_ATTACK_PARAMS
    from .figures import reconstruction_grid
    from .measure import attack_seed, fit_attack, measure_attack
    from .runtime.artifacts import artifact_kind, load_edge
    from .train import load_checkpoint

    if n_images < 0:
        raise ConfigError(f"--n-images: 0 (the first test image of each class) or a positive count, got {n_images}")
    name = attack_name(attack_choice)
    if name not in ATTACKS:
        raise ConfigError(f"--attack: unknown attack {attack_choice!r}; known: {', '.join(ATTACKS)}")
    kwargs = parse_json(options, "--options") or {}
    if reserved := [k for k in kwargs if k in RESERVED_ATTACK_PARAMS]:
        raise ConfigError(f"--options: {reserved[0]!r} is set by splitshield attack (use --seed for the seed); "
                          "remove it")
    try:
        ATTACKS[name](**kwargs)  # its parameters are checked before any data is loaded
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--options for {name}: {str(exc).splitlines()[0]}") from None
    if aux not in AUX_KINDS:
        raise ConfigError(f"--aux: {aux!r} unknown; use {', '.join(AUX_KINDS)}")
    if aux_n is not None and aux_n < 1:
        raise ConfigError(f"--aux-n: a positive number of auxiliary images, got {aux_n}")
    if (aux == "other_distribution") != (aux_data is not None):
        raise ConfigError("--aux other_distribution needs --aux-data NAME (the attacker's dataset)" if aux_data is None
                          else f"--aux-data is read only with --aux other_distribution (got --aux {aux})")
    if aux_data is not None:
        get_dataset_info(aux_data)  # an unknown name is a one-line error before any loading
    threat = threat or DEFAULT_THREAT[name]
    if threat not in ATTACKS[name].threats:
        raise ConfigError(f"--threat: {name} runs under {' or '.join(ATTACKS[name].threats)}, not {threat!r}")
    if out is not None or transcript is not None:  # before any fitting: a long attack is not lost at its end
        check_writable((out or Path("splitshield-transcript-attack")) / "reconstructions.safetensors", "--out")
    kind = artifact_kind(checkpoint)  # a missing or foreign file is a one-line error here
    extra = {"aux_data": aux_data} if aux_data is not None else {}  # as a spec's setting: only when set
    other = None if aux_data is None else load_data(aux_data, data_dir, seed, None, None)
    if kind == "cloud":
        setting = {"name": name, "threat": threat, "aux": aux, "aux_n": aux_n, "adaptive": False, "params": kwargs,
                   **extra}
        attack_cloud(checkpoint, setting, transcript, limit, out, seed=seed, device=device,
                     data=lambda: load_data(dataset, data_dir, seed, value_range, image_shape), other=other)
        return
    if kind == "edge" and threat == "query_free":
        raise ConfigError(f"{name} runs under query_free: {checkpoint} is an edge artifact, without the tail the "
                          "shadow head is trained through; give the full checkpoint or the cloud artifact")
    if kind == "edge":
        edge = load_edge(checkpoint, device=device)
        target, guard = edge.target, edge.defense
    else:
        target, guard, _ = load_checkpoint(checkpoint, device=device)
    check_transcript_options(name, transcript, limit, target.feature_shape())  # before any fitting
    data = load_data(dataset, data_dir, seed, value_range, image_shape)
    setting = {"name": name, "threat": threat, "aux": aux, "aux_n": aux_n, "adaptive": not non_adaptive,
               "params": kwargs, **extra}
    images = n_images or "first_per_class"
    cell_seed = attack_seed(seed, setting)
    if transcript is not None:
        fitted = fit_attack(target, guard, data, setting, images=images, seed=cell_seed, other=other)
        attack_transcript(fitted.attack, transcript, target.feature_shape(),
                          out or Path("splitshield-transcript-attack"), limit=limit)
        return
    result = measure_attack(target, guard, data, setting, images=images, seed=cell_seed, device=device, other=other)
    mean = {n: v for n, i, v in result.metrics if i == -1}
    label = f"{name} ({threat}, {'non-adaptive' if non_adaptive else 'adaptive'}) at {target.point}"
    if result.reconstruction is None:
        console.print(f"{label}: label accuracy {mean['completion_accuracy']:.2%} on {len(data.test)} test images "
                      f"(the same labelled images, from scratch without the features: {mean['scratch_accuracy']:.2%})")
        return
    console.print(f"{label}: PSNR {mean['psnr']:.2f} dB  SSIM {mean['ssim']:.3f}  MSE {mean['mse']:.5f} "
                  f"on {len(result.original)} images")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        x, x_hat = torch.from_numpy(result.original), torch.from_numpy(result.reconstruction)
        save_file({"x": x, "x_hat": x_hat}, str(out / "reconstructions.safetensors"))
        reconstruction_grid(x, [(label, x_hat)], out / "grid.png")
        console.print(f"wrote {out / 'grid.png'} and {out / 'reconstructions.safetensors'}")


@app.command("advise")
@friendly
def advise_cmd(
    model: ModelName,
    data: Annotated[str | None, typer.Option(
        help=f"Images to measure bytes, accuracy and leakage on: {', '.join(list_datasets())} (default: none, costs "
             "from shapes only).")] = None,
    data_dir: DataDir = None,
    input_shape: Annotated[str | None, typer.Option(
        "--input-shape", "--image-shape",
        help="C,H,W of one image (default: the checkpoint's, else the data's, else the model's native shape); the "
             "data are converted to it.")] = None,
    checkpoint: Annotated[Path | None, typer.Option(
        help="NAME.safetensors of the trained model (`splitshield train`); without it, costs only.")] = None,
    points: Annotated[str | None, typer.Option(
        help="Comma-separated split points to score (default: every legal one; `splitshield split-points`).")] = None,
    max_edge_ms: Annotated[float | None, typer.Option(
        help="Budget: head milliseconds per image (batch 1) on this machine.")] = None,
    max_kbytes: Annotated[float | None, typer.Option(
        help="Budget: kB per image on the wire, 8-bit + zstd coded (float32 without --data).")] = None,
    no_attack: Annotated[bool, typer.Option("--no-attack", help="Costs and statistics only: no fast attack.")] = False,
    threats: Annotated[str | None, typer.Option(
        help="Comma-separated threats of the fast attacks: black_box (inverse network), white_box (rMLE through the "
             "head's weights); a cut's leakage is the best of them (default: both).")] = None,
    images: Annotated[int, typer.Option(
        help="Test images (balanced over the classes) bytes, accuracy and statistics are measured on.")] = 1000,
    noise: Annotated[float, typer.Option(
        help="The CE floor's Gaussian noise, in units of the feature's standard deviation.")] = 0.5,
    rank_by: Annotated[str | None, typer.Option(
        help="Leakage measure cuts are ranked by: ssim, psnr, ce_floor or gpz (default ssim; gpz, the GPZ "
             "statistic R̄²/V, with --no-attack).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for advice.md, advice.html and figures/.")
                   ] = None,
    seed: Seed = 0,
    device: Device = "cpu",
    threads: Annotated[int | None, typer.Option(
        help="Torch threads for the whole run, head timing included, e.g. the edge device's cores (default: "
             "torch's own: the physical cores, or OMP_NUM_THREADS).")] = None,
) -> None:
    """Where should I cut? Score every split point for edge cost, bytes and leakage, and recommend one."""
    from .advisor import RANKINGS, advise
    from .advisor.leakage import FAST_ATTACKS
    from .advisor.table import TABLE_GROUPS

    for field, value in (("--max-edge-ms", max_edge_ms), ("--max-kbytes", max_kbytes), ("--noise", noise)):
        if value is not None and not 0 < value < math.inf:
            raise ConfigError(f"{field}: a positive finite number, got {value:g}")
    if images < 2:
        raise ConfigError(f"--images: at least 2 test images, got {images}")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads: at least 1, got {threads}")
    if rank_by is not None and rank_by not in RANKINGS:
        raise ConfigError(f"--rank-by: {rank_by!r} unknown; use {', '.join(RANKINGS)}")
    if rank_by in ("ssim", "psnr") and no_attack:
        raise ConfigError(f"--rank-by: {rank_by} needs the fast attacks, which --no-attack turns off; rank by "
                          "ce_floor or gpz, or drop --no-attack")
    budgets = {a.threat: a for a in FAST_ATTACKS}
    if threats is not None and no_attack:
        raise ConfigError("--threats: picks the fast attacks, which --no-attack turns off; drop one of the two")
    chosen = list(dict.fromkeys(t.strip() for t in (threats or ",".join(budgets)).split(",") if t.strip()))
    unknown = [t for t in chosen if t not in budgets]
    if unknown or not chosen:
        raise ConfigError(f"--threats: {', '.join(map(repr, unknown)) + ' unknown' if unknown else 'none given'}; "
                          f"use one or both of {', '.join(budgets)}, or --no-attack")
    wanted = [p.strip() for p in points.split(",") if p.strip()] if points is not None else None
    if wanted == []:
        raise ConfigError("--points: name at least one split point, e.g. --points conv1,ReLU2")
    if out is not None:
        check_writable(out / "advice.html", "--out")
    shape = parse_shape(input_shape) if input_shape else None
    net, notes = checkpoint_model(model, checkpoint, shape) if checkpoint is not None else (None, [])
    shape = tuple(net.model_spec["input_shape"]) if net is not None else shape
    loaded = None
    if data is not None:
        from .data import load_dataset

        loaded = load_dataset(data, data_dir=data_dir, seed=seed, image_shape=shape)
    if net is None:
        from .models import build_model

        net = build_model(model, num_classes=loaded.num_classes if loaded else 10,
                          input_shape=shape or (loaded.image_shape if loaded else None))
    elif loaded is not None and loaded.num_classes != net.model_spec["num_classes"]:
        raise ConfigError(f"--data: {data} has {loaded.num_classes} classes but the checkpoint's model "
                          f"{net.model_spec['num_classes']}; pass the data it was trained on")
    with torch_threads(threads):
        advice = advise(net, loaded, points=wanted, trained=checkpoint is not None, attack=not no_attack, noise=noise,
                        fast=[budgets[t] for t in chosen], rank_by=rank_by, max_edge_ms=max_edge_ms,
                        max_kbytes=max_kbytes, images=images, device=device, seed=seed)
    size = "×".join(map(str, advice.meta["input_shape"]))
    # A terminal gets one table where it is wide enough, else one per column group; a file or a pipe one table.
    wide = console.width >= 180 or not console.is_terminal
    for groups in [TABLE_GROUPS] if wide else [[group] for group in TABLE_GROUPS]:
        header, body = advice.table(groups)
        if len(header) == 1:
            continue  # nothing of this group was measured
        table = Table(title=f"{advice.meta['model']} ({size}): {', '.join(groups)}")
        for i, name in enumerate(header):
            widest = max(len(row[i]) for row in body)  # names and marks are never cut short
            table.add_column(name, justify="left" if i == 0 or name == "advice" else "right",
                             min_width=widest if i == 0 or name == "advice" else None)
        for row in body:
            table.add_row(*row)
        _print_table(table)
    console.print(advice.sentence(), highlight=False, soft_wrap=True)
    for line in advice.ruled_out_lines():
        console.print(f"  {line}", highlight=False, soft_wrap=True)
    for note in [*notes, *advice.notes]:
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    console.print("time: " + ", ".join(f"{stage} {s:.1f} s" for stage, s in advice.timings.items()), highlight=False)
    if out is not None:
        written = advice.write_report(out)
        console.print(f"wrote {written[1]} and {written[0]} ({len(written) - 2} figures)", highlight=False)
    if not advice.budgets_met:
        raise typer.Exit(1)


def checkpoint_model(name: str, checkpoint: Path, shape: tuple[int, ...] | None) -> tuple[Any, list[str]]:
    """The uncut model ``name`` with a checkpoint's weights, and notes for the user; a one-line error when the
    checkpoint holds another model or was built for another ``shape`` (C, H, W)."""
    from .models import build_model
    from .train import load_checkpoint

    target, _, meta = load_checkpoint(checkpoint)
    spec = target.model_spec
    if spec["name"] != name:
        raise ConfigError(f"--checkpoint {checkpoint} holds a {spec['name']}, not a {name}: pass {spec['name']}, or "
                          f"the checkpoint of a {name}")
    built = tuple(spec["input_shape"])
    if shape is not None and shape != built:
        raise ConfigError(f"--input-shape {','.join(map(str, shape))}: the checkpoint's model takes "
                          f"{','.join(map(str, built))}; leave --input-shape out")
    net = build_model(**spec)
    load_checkpoint(checkpoint, model=net)  # the halves share net's modules: this loads the uncut model
    defense = (meta.get("defense") or {}).get("name", "none")
    notes = [] if defense == "none" else [f"the checkpoint's defense ({defense}) is not applied: every cut is "
                                          "scored undefended"]
    return net, notes


def check_transcript_options(name: str, transcript: Path | None, limit: int | None,
                             feature_shape: tuple[int, ...]) -> None:
    """``attack --transcript/--limit``: an inversion attack, a positive limit, a valid transcript of this model."""
    from .attacks import ATTACKS
    from .attacks.base import InversionAttack
    from .runtime.transcript import check_transcript

    if transcript is None:
        if limit is not None:
            raise ConfigError("--limit counts recorded features: it needs --transcript PATH")
        return
    if not issubclass(ATTACKS[name], InversionAttack):
        raise _not_an_inversion()
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit: a positive number of recorded features, got {limit}")
    check_transcript(transcript, feature_shape)


def _not_an_inversion() -> ConfigError:
    from .attacks import ATTACKS
    from .attacks.base import InversionAttack

    names = ", ".join(name for name, cls in ATTACKS.items() if issubclass(cls, InversionAttack))
    return ConfigError(f"--transcript: choose an inversion attack ({names})")


def attack_transcript(instance: Any, transcript: Path, feature_shape: tuple[int, ...], out: Path,
                      limit: int | None = None) -> None:
    """The ``attack --transcript`` branch: invert the recorded features (at most ``limit``) and save them."""
    from .attacks.base import InversionAttack
    from .runtime.transcript import invert_transcript, save_reconstructions

    if not isinstance(instance, InversionAttack):
        raise _not_an_inversion()
    images, stamps = invert_transcript(instance, transcript, feature_shape, limit=limit)
    tensors, png = save_reconstructions(images, stamps, out)
    console.print(f"reconstructed {len(images)} images from {transcript}; wrote {tensors} and {png}")


def attack_cloud(cloud_path: Path, setting: dict[str, Any], transcript: Path | None, limit: int | None,
                 out: Path | None, *, seed: int, device: str, data: Callable[[], Any], other: Any = None) -> None:
    """``attack CLOUD``: what a curious cloud holding only the cloud artifact learns from its transcript.

    The attacker gets the tail's weights, an untrained head of the head's architecture, the moments of the
    recorded features (its traffic) and, query-free, the auxiliary data of ``data()``: never a head weight.
    """
    from .attacks.base import TRAFFIC_IMAGES, feature_moments
    from .measure import attack_seed, check_cloud_threat, fit_cloud_attack
    from .runtime.artifacts import load_cloud
    from .runtime.transcript import iter_features

    check_cloud_threat(setting["threat"], setting["name"])
    if transcript is None:
        raise ConfigError(f"{cloud_path} is a cloud artifact: test images cannot be attacked without the head that "
                          "makes their features; pass --transcript PATH (features the cloud recorded), or give the "
                          "full checkpoint to measure on test images")
    cloud = load_cloud(cloud_path, device=device, architecture=True)
    check_transcript_options(setting["name"], transcript, limit, cloud.feature_shape)  # before any fitting
    dataset, traffic = None, None
    if setting["threat"] == "query_free":
        dataset = data()
        if tuple(dataset.image_shape) != tuple(cloud.input_shape):
            raise ConfigError(f"--dataset {dataset.name}: images of shape {','.join(map(str, dataset.image_shape))}, "
                              f"the model takes {','.join(map(str, cloud.input_shape))}; pass --image-shape "
                              f"{','.join(map(str, cloud.input_shape))} or the model's own dataset")
        if dataset.num_classes > cloud.num_classes:
            raise ConfigError(f"--dataset {dataset.name}: {dataset.num_classes} classes, the tail scores "
                              f"{cloud.num_classes}; give the model's own dataset as the attacker's aux data")
        # The features the cloud received are its own to use: their moments guide the shadow head.
        recorded = iter_features(transcript, limit=TRAFFIC_IMAGES, feature_shape=cloud.feature_shape)
        traffic = feature_moments((z for z, _ in recorded), cloud.feature_shape)
    console.print("the cloud artifact holds no defense: the attacker is non-adaptive to any defense on the edge",
                  highlight=False, soft_wrap=True)
    fitted = fit_cloud_attack(cloud, dataset, setting, seed=attack_seed(seed, setting), traffic=traffic, other=other)
    attack_transcript(fitted, transcript, cloud.feature_shape, out or Path("splitshield-transcript-attack"),
                      limit=limit)


@app.command()
@friendly
def export(
    checkpoint: Annotated[Path, typer.Argument(help="NAME.safetensors (+ NAME.json) written by `splitshield train`.")],
    edge: Annotated[Path, typer.Option(help="Edge artifact to write: the head and the defense (for the device).")],
    cloud: Annotated[Path, typer.Option(help="Cloud artifact to write: the tail only (for `splitshield serve`).")],
) -> None:
    """Split a checkpoint into an edge and a cloud artifact: the cloud never gets the head's weights."""
    from .runtime.artifacts import export as export_artifacts

    done = export_artifacts(checkpoint, edge, cloud)
    console.print(f"wrote {done.edge} (head + defense) and {done.cloud} (tail only); fingerprint {done.fingerprint}",
                  highlight=False, soft_wrap=True)


@app.command()
@friendly
def serve(
    checkpoint: Annotated[Path, typer.Argument(help="Cloud artifact (`splitshield export ... --cloud`): the tail.")],
    port: Annotated[int, typer.Option(help="TCP port.")] = 8080,
    host: Annotated[str, typer.Option(help="Interface; 0.0.0.0 exposes the server beyond this machine.")
                    ] = "127.0.0.1",
    token_file: Annotated[Path | None, typer.Option(help="File holding the bearer token clients must send.")] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Serve without authentication (trusted networks only).")
                       ] = False,
    record: Annotated[Path | None, typer.Option(help="SQLite transcript: store every received feature frame.")
                      ] = None,
    max_batch: Annotated[int, typer.Option(help="Largest batch per request, and per dynamic batch of requests.")
                         ] = 256,
    max_delay_ms: Annotated[float, typer.Option(
        help="Dynamic batching: ms a queued request may wait for others to fill a batch (0: no waiting).")] = 0.0,
    timeout: Annotated[float, typer.Option(help="Seconds allowed per request.")] = 30.0,
    threads: Annotated[int, typer.Option(help="Threads per process decoding large frames and recording."
                                             )] = 4,
    workers: Annotated[int, typer.Option(help="Server processes on the one port (each loads the tail).")] = 1,
    max_in_flight: Annotated[int, typer.Option(help="Concurrent requests before answering 'overloaded'.")] = 32,
    device: Device = "cpu",
    allow_head_weights: Annotated[bool, typer.Option(
        "--allow-head-weights", help="Serve a full checkpoint: the cloud then holds the head's weights.")] = False,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate chain: serve HTTPS (with --tls-key).")
                        ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert.")] = None,
    header_timeout: Annotated[float, typer.Option(
        help="Seconds a request's headers may take; then the connection is closed.")] = 10.0,
    keep_alive_timeout: Annotated[float, typer.Option(help="Seconds an idle keep-alive connection is kept.")] = 5.0,
    max_connections: Annotated[int | None, typer.Option(
        help="Open connections at most (default 4096, or what the open-file limit holds); one more closes the "
             "connection waiting longest without a request.")] = None,
    max_header_bytes: Annotated[int, typer.Option(help="Largest request head (request line + headers).")] = 16384,
    record_max_mb: Annotated[float | None, typer.Option(
        help="Rotate the transcript past this size in MiB: transcript.db -> transcript.1.db -> ...")] = None,
    record_keep: Annotated[int | None, typer.Option(
        help="Rotated transcripts kept, newest first (default: all).")] = None,
) -> None:
    """Serve the tail of a cloud artifact over HTTP(S): the cloud side of split inference."""
    from .runtime.artifacts import check_servable
    from .runtime.server import ConnectionLimits, check_options, resolve_token
    from .runtime.server import serve as run_server

    token = resolve_token(token_file, no_auth)
    check_servable(checkpoint, allow_head_weights)  # refused before anything is printed or loaded
    limits = ConnectionLimits(header_timeout=header_timeout, keep_alive_timeout=keep_alive_timeout,
                              max_connections=max_connections, max_header_bytes=max_header_bytes)
    check_options(tls_cert, tls_key, limits, record, record_max_mb, record_keep, max_batch, max_delay_ms, workers)
    # run_server prints the address once the port is bound (a client reading it can connect at once).
    run_server(checkpoint, host=host, port=port, token=token, record=record, max_batch=max_batch,
               request_timeout=timeout, threads=threads, workers=workers, max_in_flight=max_in_flight, device=device,
               allow_head_weights=allow_head_weights, tls_cert=tls_cert, tls_key=tls_key, limits=limits,
               record_max_mb=record_max_mb, record_keep=record_keep, max_delay_ms=max_delay_ms)


@app.command()
@friendly
def infer(
    checkpoint: Annotated[Path, typer.Argument(
        help="Edge artifact (`splitshield export ... --edge`) or the full checkpoint; its head runs here.")],
    images: Annotated[list[Path], typer.Argument(help="Image files or folders of images.")],
    server: Annotated[str, typer.Option(help="Server base URL.")] = "http://127.0.0.1:8080",
    token_file: Annotated[Path | None, typer.Option(help="File holding the bearer token.")] = None,
    encoding: Annotated[str, typer.Option(help="float32, float16, uint8 or uint4.")] = "float32",
    compression: Annotated[str, typer.Option(help="none or zstd.")] = "none",
    batch_size: Annotated[int, typer.Option(help="Images per request (per frame with --stream).")] = 64,
    ca: Annotated[Path | None, typer.Option(
        help="PEM certificate of the authority that signed an https:// server's certificate (default: the "
             "system's).")] = None,
    stream: Annotated[int | None, typer.Option(
        help="Send the frames over the server's /v1/stream WebSocket, this many ahead of their answers, instead "
             "of one HTTP request each.")] = None,
    seed: Seed = 0,
    device: Device = "cpu",
) -> None:
    """Classify images: head and defense on this device, only the features go to the server."""
    from .runtime import CodecOptions, EdgeClient, load_images, read_token

    if stream is not None and stream < 1:
        raise ConfigError(f"--stream: a positive number of frames sent ahead of their answers, got {stream}")
    token = read_token(token_file) if token_file is not None else ""
    with EdgeClient(checkpoint, server, token, codec=CodecOptions(encoding, compression), batch_size=batch_size,
                    seed=seed, device=device, ca=ca) as client:
        with warnings.catch_warnings(record=True) as conversions:
            warnings.simplefilter("always")
            x, files = load_images(images, client.input_shape)
        for w in conversions:  # one line per image converted or resized to fit the model
            err_console.print(f"[yellow]warning:[/] {w.message}", highlight=False, soft_wrap=True)
        probs = (client.predict(x) if stream is None else client.predict_stream(x, window=stream)).softmax(1)
    files = [f.resolve() for f in files]
    root = Path(os.path.commonpath([f.parent for f in files]))
    table = Table(title=f"{len(files)} images in {root} via {server}")
    for col in ("image", "class", "probability"):
        table.add_column(col, justify="right" if col != "image" else "left")
    for f, p in zip(files, probs, strict=True):
        table.add_row(str(f.relative_to(root)), str(int(p.argmax())), f"{float(p.max()):.3f}")
    _print_table(table)


Db = Annotated[Path, typer.Option("--db", help="SQLite results store (created when missing; reruns resume).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars: one log line per finished cell.")]


def _run_spec(spec_path: Path, db: Path, executor: str, address: str | None, jobs: int, quiet: bool,
              grids: bool = False, only: list[str] | None = None, device: str | None = None, quick: bool = False):
    from .config import load_spec, quick_spec
    from .experiment import run_experiment

    spec = load_spec(spec_path)
    if quick:
        spec = quick_spec(spec)
    if device is not None:
        spec = spec.model_copy(update={"device": device})
    else:
        check_device(spec.device, f"{spec_path}: device")
    log = (lambda line: err_console.print(line, highlight=False, soft_wrap=True)) if quiet else None
    summary = run_experiment(spec, db, executor=executor, jobs=jobs, address=address, progress=not quiet,
                             pngs=grids, only=only, log=log)
    err_console.print(f"{spec.name}: {summary.cells_done} cells run, {summary.cells_skipped} already done, "
                      f"{len(summary.failures)} failed, of {summary.cells_total} in {summary.seconds:.1f} s; "
                      f"store {db}", highlight=False, soft_wrap=True)
    for cell, error in summary.failures.items():
        err_console.print(f"[red]failed[/] {cell[:12]}: {error}", highlight=False, soft_wrap=True)
    return spec, summary


@app.command()
@friendly
def run(
    spec: Annotated[Path, typer.Argument(help="Experiment spec, YAML or TOML (see examples/).")],
    db: Db = Path("results.db"),
    executor: Annotated[str, typer.Option(help="local or ray.")] = "local",
    address: Annotated[str | None, typer.Option(help="Ray address (e.g. auto); default: a local Ray instance.")
                       ] = None,
    jobs: Annotated[int, typer.Option(help="Local worker processes (one target's cells per task).")] = 1,
    grids: Annotated[bool, typer.Option(help="Also write a reconstruction grid PNG per cell.")] = False,
    only: Annotated[list[str] | None, typer.Option(
        help="Run only the cells whose path dataset/model/split/defense/attack/seed=N matches this shell "
             "pattern, e.g. 'mnist/*/gaussian_noise(sigma=0.5)*'; repeat for several.")] = None,
    device: SpecDevice = None,
    quick: Annotated[bool, typer.Option(
        help="Smoke run: every cell at tiny budgets (one epoch on 500 images, a few attack steps), stored in "
             "DB-quick.db beside --db; its numbers say nothing about privacy.")] = False,
    quiet: Quiet = False,
) -> None:
    """Run every cell of an experiment spec, storing results; finished cells are skipped on rerun."""
    if quick:
        db = db.with_name(f"{db.stem}-quick{db.suffix}")
    _, summary = _run_spec(spec, db, executor, address, jobs, quiet, grids, only, device, quick)
    if summary.failures:
        raise typer.Exit(1)


@app.command()
@friendly
def report(
    db: Annotated[Path, typer.Argument(help="Results store written by `splitshield run`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("report"),
    title: Annotated[str | None, typer.Option(help="Report title (default: the last run's spec name).")] = None,
    window: Annotated[float, typer.Option(help="Paired comparisons: accuracy difference, in percentage points, "
                                                "within which a pair with and without a plug-in is 'matched'.")
                      ] = 1.0,
) -> None:
    """Write report.md, a self-contained report.html and PNG figures from a results store."""
    from .report import build_report

    if not 0 <= window <= 100:
        raise ConfigError(f"--window: an accuracy difference in percentage points, 0 to 100; got {window}")
    files = build_report(db, out, title=title, window=window / 100)
    console.print(f"wrote {files.html}, {files.markdown} and {len(files.figures)} figures in {out / 'figures'}")


@app.command()
@friendly
def audit(
    spec: Annotated[Path, typer.Argument(help="Experiment spec describing the model, defense and attacks to audit.")],
    max_ssim: Annotated[float | None, typer.Option(help="Fail if any attack's mean SSIM exceeds this.")] = None,
    max_psnr: Annotated[float | None, typer.Option(help="Fail if any attack's mean PSNR (dB) exceeds this.")] = None,
    max_completion_accuracy: Annotated[float | None, typer.Option(
        help="Fail if model completion's accuracy exceeds this (fraction).")] = None,
    db: Db = Path("results.db"),
    executor: Annotated[str, typer.Option(help="local or ray.")] = "local",
    address: Annotated[str | None, typer.Option(help="Ray address.")] = None,
    jobs: Annotated[int, typer.Option(help="Local worker processes.")] = 1,
    allow_weak_attacks: Annotated[bool, typer.Option(
        "--allow-weak-attacks", help="Run attacks below the gate's minimum budgets (MIN_AUDIT_BUDGETS), "
                                     "non-adaptive or on noise; a PASS is then labelled 'with weak attacks'.")
                                  ] = False,
    device: SpecDevice = None,
    quiet: Quiet = False,
) -> None:
    """Privacy gate for CI: run the spec (resuming); exit 1 if any attack beats a bar, gave no number or did not
    run, 0 otherwise; 2 (before running anything) if an attack is below the minimum budgets."""
    from .config import load_spec
    from .experiment import plan
    from .report import audit as find_violations
    from .report import bar_setters
    from .store import ResultStore

    if max_ssim is None and max_psnr is None and max_completion_accuracy is None:
        raise ConfigError("audit needs at least one bar: --max-ssim, --max-psnr or --max-completion-accuracy")
    weak = _audit_preflight(load_spec(spec), max_ssim, max_psnr, max_completion_accuracy, allow_weak_attacks)
    loaded, _ = _run_spec(spec, db, executor, address, jobs, quiet, device=device)
    hashes = [c.hash for c in plan(loaded)]
    bars = {"ssim": max_ssim, "psnr": max_psnr, "completion_accuracy": max_completion_accuracy}
    with ResultStore.open_readonly(db) as store:
        violations = find_violations(store, max_ssim, max_psnr, max_completion_accuracy, hashes=hashes)
        for line in bar_setters(store, [m for m, v in bars.items() if v is not None], hashes=hashes):
            console.print(f"closest to the bar: {line}", highlight=False, soft_wrap=True)
    if violations:
        for v in violations:
            console.print(f"[bold red]FAIL[/] {v}", highlight=False, soft_wrap=True)
        console.print(f"{len(violations)} problem(s): an attack beat a bar, gave no number or did not run",
                      highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    bars = ", ".join(f"{k} <= {v}" for k, v in (("SSIM", max_ssim), ("PSNR", max_psnr),
                                                 ("completion accuracy", max_completion_accuracy)) if v is not None)
    label = " (with weak attacks: not evidence of privacy)" if weak else ""
    console.print(f"[bold green]PASS[/]{label} every attack in {spec} stays within {bars}", highlight=False,
                  soft_wrap=True)


def _audit_preflight(spec: Any, max_ssim: float | None, max_psnr: float | None,
                     max_completion_accuracy: float | None, allow_weak: bool) -> bool:
    """Print the attack budgets the audit runs; exit 2 (one line per problem) on a bar no attack measures, or on
    weak attacks unless allowed (then warn). Returns whether weak attacks were allowed through."""
    from .report import attack_budgets, budget_lines, unmeasured_bars, weak_attacks

    budgets = attack_budgets(spec)
    console.print("attack budgets:", highlight=False)
    for line in budget_lines(budgets):
        console.print(f"  {line}", highlight=False, soft_wrap=True)
    problems = unmeasured_bars(spec, max_ssim, max_psnr, max_completion_accuracy)
    weak = weak_attacks(spec, budgets)
    if weak and allow_weak:
        for line in weak:
            err_console.print(f"[yellow]warning:[/] weak attack allowed: {line}", highlight=False, soft_wrap=True)
    problems += [] if allow_weak else weak
    if problems:
        for line in problems:
            hint = ", or pass --allow-weak-attacks" if line in weak else ""
            err_console.print(f"[bold red]error:[/] {line}{hint}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    return bool(weak)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="splitshield")


if __name__ == "__main__":
    main()
