"""Reports from a results store: Markdown + one self-contained HTML file + PNG figures.

For every (dataset, model, split) the report gives

- a table of task accuracy and each attack's metrics per defense setting (means over seeds);
- a privacy–utility plot: accuracy against the best attack's SSIM and against its MSE, one curve per
  defense family (its settings are the points), the conditional-entropy MSE floor estimate as a dashed line
  where it was computed (the table adds the certified bound on I(x; z), and a note on what each can show);
- reconstruction grids: the private images, then each attack's reconstruction per defense strength;
- a plain-language summary of the best trade-off.

The HTML embeds every image as a data URI, so it opens offline as a single file.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

import numpy as np
import torch

from .errors import ConfigError, DataError
from .store import ResultStore

INVERSION = ("ssim", "psnr", "mse")
#: A completion cell's numbers: the attack's label accuracy, and its labelled images' worth without the features.
COMPLETION = ("completion_accuracy", "scratch_accuracy")
#: Re-identification (:mod:`splitshield.reidentify`): the evaluator's accuracy on the reconstructions, and on the
#: true images.
REID = ("reid_accuracy", "reid_ceiling")
#: Accuracy loss still counted as "keeping accuracy", in fraction points (1 pt).
ACCURACY_TOLERANCE = 0.01


@dataclass
class DefenseRow:
    """One defense setting within one (dataset, model, split): metrics averaged over seeds."""

    label: str
    family: str
    config: dict[str, Any]
    accuracy: float | None
    ce_floor: float | None  # the conditional-entropy MSE floor estimate (stored as ``ce_floor``)
    attacks: dict[str, dict[str, float]]  # attack label -> {metric -> mean over seeds}
    cells: list[dict[str, Any]]
    mi_bound: float | None = None  # the certified bound on I(x; z), nats per image

    def best(self, metric: str) -> tuple[str, float] | None:
        """The strongest inversion attack by ``metric`` (highest SSIM/PSNR, lowest MSE): (label, value)."""
        values = [(a, m[metric]) for a, m in self.attacks.items() if m.get(metric) is not None]
        if not values:
            return None
        return min(values, key=lambda t: t[1]) if metric == "mse" else max(values, key=lambda t: t[1])


@dataclass
class Section:
    """Everything reported for one (dataset, model, split)."""

    dataset: str
    model: str
    split: str
    seeds: list[int]
    rows: list[DefenseRow]
    inversion_attacks: list[str]
    completion_attacks: list[str]
    #: Where imported cells came from (file and tool); ``None`` for cells splitshield measured.
    source: str | None = None
    #: How this section's protocol differs from its siblings' (same dataset, model, split), e.g.
    #: ``train.tail_epochs=1``; ``None`` without siblings.
    setting: str | None = None

    @property
    def title(self) -> str:
        imported = f" · imported from {self.source}" if self.source else ""
        setting = f" · {self.setting}" if self.setting else ""
        return f"{self.dataset} · {self.model} · split {self.split}{setting}{imported}"

    @property
    def slug(self) -> str:
        name = f"{self.dataset}-{self.model}-{self.split}" + (f"-{self.source.split()[0]}" if self.source else "")
        if self.setting:
            name += "-" + hashlib.sha256(self.setting.encode()).hexdigest()[:8]
        return "".join(ch if ch.isalnum() else "-" for ch in name)


@dataclass
class ReportFiles:
    """Paths written by :func:`build_report`, and the sections it reported."""

    markdown: Path
    html: Path
    figures: list[Path]
    sections: list[Section]


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return mean(present) if present else None


#: The fields of a cell's config that are neither where it is (dataset, model, split), nor its defense, seed or
#: attack: the protocol (training, loading, wire...). Cells of different protocols are never averaged together.
_NOT_PROTOCOL = ("dataset", "model", "split", "defense", "seed", "attack", "evaluation", "revision", "imported")


def _protocol(cell: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cell["config"].items() if k not in _NOT_PROTOCOL}


def _differences(protocols: list[dict[str, Any]]) -> list[str]:
    """For each protocol, the fields in which it differs from the others: ``train.tail_epochs=1``."""

    def flat(protocol: dict[str, Any]) -> dict[str, str]:
        out = {}
        for key, value in protocol.items():
            items = value.items() if isinstance(value, dict) else [(None, value)]
            out.update({f"{key}.{k}" if k else key: json.dumps(v, sort_keys=True) for k, v in items})
        return out

    flats = [flat(p) for p in protocols]
    keys = sorted({k for f in flats for k in f})
    varying = [k for k in keys if len({f.get(k) for f in flats}) > 1]
    return [", ".join(f"{k}={f.get(k, 'unset')}" for k in varying) for f in flats]


def _tell_apart(cells: list[dict[str, Any]]) -> None:
    """Relabel the cells whose attack label another attack setting of ``cells`` shares.

    A cell's label names what sets its attack apart within its own spec, so two specs can give one label to two
    attackers (``rmle`` for the setting search in one and for ``search: null`` in the other). Where that
    happens in one section, the colliding settings are labelled again among themselves.
    """
    from .experiment import attack_labels

    def setting(cell: dict[str, Any]) -> dict[str, Any]:
        return cell["config"].get("attack") or cell["attack"]

    settings: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for cell in cells:
        settings[cell["attack_label"]][json.dumps(setting(cell), sort_keys=True)] = setting(cell)
    for label, distinct in settings.items():
        if len(distinct) < 2 or not all(_SETTING_FIELDS <= set(s) for s in distinct.values()):
            continue
        relabelled = dict(zip(distinct, attack_labels(list(distinct.values())), strict=True))
        for cell in cells:
            if cell["attack_label"] == label:
                cell["attack_label"] = relabelled[json.dumps(setting(cell), sort_keys=True)]


#: What an attack setting holds when the engine stored it (imported cells may hold less, and keep their labels).
_SETTING_FIELDS = {"name", "threat", "aux", "adaptive", "params"}


def load_sections(store: ResultStore) -> list[Section]:
    """Group the store's finished cells of this splitshield's results revision by (dataset, model, split) and
    defense setting; imported cells form sections of their own, per source file."""
    from .experiment import current_cells, defense_family, imported_cells

    cells, stale = current_cells(store)
    imported = imported_cells(store)
    if not cells and not imported:
        older = f" ({stale} were measured by another splitshield revision and would be measured again)" if stale else ""
        raise ConfigError(f"{store.path}: no finished cells to report{older}; "
                          f"run `splitshield run SPEC --db {store.path}`")
    groups: dict[tuple[str, str, str, str | None, str], list[dict[str, Any]]] = defaultdict(list)
    for cell in [*cells, *imported]:
        imported_from = cell["config"].get("imported")
        source = f"{imported_from['file']} ({imported_from['by']})" if imported_from else None
        protocol = json.dumps(_protocol(cell), sort_keys=True)
        groups[(cell["dataset"], cell["model"], cell["split"], source, protocol)].append(cell)
    # Where one (dataset, model, split, source) was measured under several protocols, say how they differ.
    siblings: dict[tuple, list[tuple]] = defaultdict(list)
    for key in groups:
        siblings[key[:4]].append(key)
    setting: dict[tuple, str | None] = {}
    for keys in siblings.values():
        texts = _differences([json.loads(k[4]) for k in keys]) if len(keys) > 1 else [None]
        setting.update(zip(keys, texts, strict=True))
    sections = []
    for key, group in groups.items():
        _tell_apart(group)
        dataset, model, split, source, _ = key
        by_defense: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for cell in group:
            by_defense[cell["defense_label"]].append(cell)
        inversion, completion = [], []
        rows = []
        for label, dcells in by_defense.items():
            per_attack: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for cell in dcells:
                per_attack[cell["attack_label"]].append(cell)
                kind = completion if "completion_accuracy" in cell["metrics"] else inversion
                if cell["attack_label"] not in kind:
                    kind.append(cell["attack_label"])
            # Accuracy belongs to the trained target: average over targets (seeds), not over attacks.
            per_target = {c["target_hash"]: c["metrics"] for c in dcells}
            attacks = {a: {m: _mean(c["metrics"].get(m) for c in cs)
                           for m in (*INVERSION, *COMPLETION, *REID)} for a, cs in per_attack.items()}
            rows.append(DefenseRow(label, defense_family(dcells[0]["defense"]), dcells[0]["defense"],
                                   _mean(m.get("accuracy") for m in per_target.values()),
                                   _mean(m.get("ce_floor") for m in per_target.values()), attacks, dcells,
                                   mi_bound=_mean(m.get("mi_bound") for m in per_target.values())))
        sections.append(Section(dataset, model, split, sorted({c["seed"] for c in group}), rows, inversion,
                                completion, source, setting[key]))
    return sections


# --------------------------------------------------------------------------------------------------
# text


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def summary_sentence(section: Section) -> str:
    """One plain-language finding for a section: the defense with the best privacy at ≤ 1 pt cost."""
    base = next((r for r in section.rows if r.family == "none"), None)
    defended = [r for r in section.rows if r.family != "none" and r.best("ssim") and r.accuracy is not None]
    context = [section.model, section.dataset, *([section.setting] if section.setting else []),
               *([f"imported from {section.source.split()[0]}"] if section.source else [])]
    where = f"At split {section.split} ({', '.join(context)})"
    if base is None or base.best("ssim") is None or base.accuracy is None:
        if not defended:
            return f"{where}, no inversion attack was measured."
        top = min(defended, key=lambda r: r.best("ssim")[1])
        return (f"{where}, {top.label} gives the lowest best-attack SSIM, {top.best('ssim')[1]:.2f}, at "
                f"{_pct(top.accuracy)} accuracy (no undefended baseline in the store).")
    base_attack, base_ssim = base.best("ssim")
    if not defended:
        return (f"{where}, without a defense the best attack ({base_attack}) reaches SSIM {base_ssim:.2f} at "
                f"{_pct(base.accuracy)} accuracy.")
    keeping = [r for r in defended if r.accuracy >= base.accuracy - ACCURACY_TOLERANCE]
    if keeping:
        top = min(keeping, key=lambda r: r.best("ssim")[1])
        attack, ssim = top.best("ssim")
        diff = 100 * (top.accuracy - base.accuracy)
        verb = "pushes" if ssim < base_ssim else "leaves"
        return (f"{where}, {top.label} keeps accuracy within 1 pt ({_pct(top.accuracy)} vs {_pct(base.accuracy)}, "
                f"{diff:+.1f} pt) and {verb} the best attack's SSIM from {base_ssim:.2f} to {ssim:.2f} ({attack}).")
    top = min(defended, key=lambda r: base.accuracy - r.accuracy)
    attack, ssim = top.best("ssim")
    return (f"{where}, no defense keeps accuracy within 1 pt of {_pct(base.accuracy)}; the cheapest, {top.label}, "
            f"costs {100 * (base.accuracy - top.accuracy):.1f} pt and moves the best attack's SSIM from "
            f"{base_ssim:.2f} to {ssim:.2f} ({attack}).")


#: What the CE floor column can and cannot show, printed under a table that has it.
FLOOR_EXPLANATION = (
    "CE floor estimate: the least MSE any inversion could reach if each class's images were Gaussian (CEM's "
    "conditional-entropy argument). It is an estimate, not a guarantee: real images have less entropy than a "
    "Gaussian of the same covariance, so it can err high, while near-constant pixels make it far lower than the "
    "MSE attacks reach. It cannot certify a defense, and attacks landing above it say nothing either way.")
#: What the I(x;z) bound column shows, printed under a table that has it.
BOUND_EXPLANATION = (
    "I(x;z) bound: a certified upper bound, in nats per image, on what the sent feature reveals about the image "
    "to any attacker, from the Gaussian noise and the clean feature's variance alone (no assumption on the "
    "images; the variances are measured on training images). Lower is more private, 0 would be nothing; it "
    "bounds information, not an attack's MSE.")


def _reid_explanation(dataset: str) -> str:
    """What the re-identification column shows, with the chance level when the dataset's class count is known."""
    from .data import get_dataset_info

    try:
        classes = get_dataset_info(dataset).num_classes
    except DataError:
        classes = None
    chance = f" Chance is 1/{classes} = {100 / classes:.1f} %." if classes else ""
    return ("Re-identified: how often an evaluator classifier, trained by the auditor on the true training images "
            "(not the target, not the attacker's), names the true class (on faces: the person) in a reconstruction; "
            f"in brackets, its accuracy on the true images themselves.{chance}")


def _table(section: Section) -> tuple[list[str], list[list[str]]]:
    header = ["defense", "accuracy"]
    reid = [a for a in section.inversion_attacks
            if any(r.attacks.get(a, {}).get("reid_accuracy") is not None for r in section.rows)]
    for a in section.inversion_attacks:
        header += [f"{a} SSIM", f"{a} PSNR (dB)", f"{a} MSE"]
        header += [f"{a} re-identified (true images)"] if a in reid else []
    for a in section.completion_attacks:
        header += [f"{a} accuracy", f"{a}: its labels, from scratch"]
    noise_columns = [(name, key) for name, key in (("CE floor estimate (MSE)", "ce_floor"),
                                                   ("I(x;z) bound (nats)", "mi_bound"))
                     if any(getattr(r, key) is not None for r in section.rows)]
    header += [name for name, _ in noise_columns]
    body = []
    for r in section.rows:
        line = [r.label, _pct(r.accuracy)]
        for a in section.inversion_attacks:
            m = r.attacks.get(a, {})
            line += [_num(m.get("ssim")), _num(m.get("psnr"), 2), _num(m.get("mse"), 4)]
            if a in reid:
                line.append(f"{_pct(m.get('reid_accuracy'))} ({_pct(m.get('reid_ceiling'))})")
        line += [_pct(r.attacks.get(a, {}).get(m)) for a in section.completion_attacks for m in COMPLETION]
        line += ["–" if getattr(r, key) is None else f"{getattr(r, key):.3g}" for _, key in noise_columns]
        body.append(line)
    return header, body


def _attack_table(section: Section) -> tuple[list[str], list[list[str]]] | None:
    """Each inversion attack's threat, images, quality against the undefended model (where the section has it)
    and its time per cell (fitting and inverting, the mean over every cell it ran in); ``None`` with fewer than
    two inversion attacks."""
    if len(section.inversion_attacks) < 2:
        return None
    undefended = next((r for r in section.rows if r.family == "none"), None)
    header = ["attack", "threat", "images per cell"]
    if undefended is not None:
        header += ["SSIM, no defense", "PSNR (dB), no defense"]
    header += ["seconds per cell (fit + invert)"]
    kept = any(k.startswith("kept:") for r in section.rows for c in r.cells for k in c["metrics"])
    if kept:
        header.append("images, by the alternative kept (a portfolio's member, a query-free shadow)")
    body = []
    for a in section.inversion_attacks:
        cells = [c for r in section.rows for c in r.cells if c["attack_label"] == a]
        setting = cells[0]["attack"]
        images = setting.get("images", cells[0]["config"].get("evaluation", {}).get("images", "–"))
        line = [a, str(setting.get("threat", "–")), "one per class" if images == "first_per_class" else str(images)]
        if undefended is not None:
            m = undefended.attacks.get(a, {})
            line += [_num(m.get("ssim")), _num(m.get("psnr"), 2)]
        seconds = _mean(c.get("attack_seconds") for c in cells)
        line.append("–" if seconds is None else f"{seconds:,.1f}")
        if kept:
            line.append(_kept_text(cells))
        body.append(line)
    return header, body


def _kept_text(cells: list[dict[str, Any]]) -> str:
    """``rmle 62 %, inverse_network 38 %``: the share of images per alternative an attack kept (a portfolio's
    members, a query-free attack's shadows), averaged over ``cells``."""
    members = sorted({k for c in cells for k in c["metrics"] if k.startswith("kept:")})
    shares = [(m.removeprefix("kept:"), _mean(c["metrics"].get(m) for c in cells)) for m in members]
    return ", ".join(f"{name} {_pct(share)}" for name, share in sorted(shares, key=lambda t: -(t[1] or 0))) or "–"


def _markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<div class='table-wrap'><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>"


# --------------------------------------------------------------------------------------------------
# paired comparisons: a defense with and without a plug-in


@dataclass
class PairedGain:
    """What adding ``plugin`` (the last part of a composed defense, e.g. CEM) to the defenses of ``base`` does to
    ``attack``, over every base setting measured with and without it (gains are relative MSE increases:
    +0.3 means the attack's reconstruction error grew by 30 %).

    Attributes
    ----------
    pairs, matched:
        (setting, seed) pairs measured both ways, and those whose accuracies differ by at most the window.
    gain_matched, gain_all:
        Mean relative MSE gain over the matched pairs, and over all pairs (the same strength).
    gain_curve, curve_points:
        Mean relative MSE gain over the base's own privacy–utility curve (its (accuracy, MSE) points,
        linearly interpolated at the plug-in setting's accuracy), and how many plug-in settings fell within
        the curve's accuracy range (extended by the window).
    accuracy_change:
        Mean accuracy with the plug-in minus without, in fraction points.
    time_ratio:
        Mean training CPU time with the plug-in over without (wall time for cells that lack CPU time).
    """

    base: str
    plugin: str
    attack: str
    pairs: int
    matched: int
    gain_matched: float | None
    gain_all: float | None
    gain_curve: float | None
    curve_points: int
    accuracy_change: float | None
    time_ratio: float | None


def _without_plugin(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(the defense without its last part, that part) for a composed defense; ``None`` otherwise."""
    if config.get("name") != "compose" or len(config.get("parts", [])) < 2:
        return None
    parts = config["parts"]
    base = parts[0] if len(parts) == 2 else {"name": "compose", "parts": parts[:-1]}
    return base, parts[-1]


def _key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


def _per_seed(row: DefenseRow, attack: str) -> dict[int, tuple[float, float, float | None]]:
    """seed -> (accuracy, the attack's MSE, training time) of a defense row's cells."""
    out = {}
    for cell in row.cells:
        m = cell["metrics"]
        if cell["attack_label"] == attack and m.get("accuracy") is not None and m.get("mse") is not None:
            out[cell["seed"]] = (m["accuracy"], m["mse"], m.get("train_cpu_seconds") or m.get("train_seconds"))
    return out


def _interpolate(curve: list[tuple[float, float]], accuracy: float, window: float) -> float | None:
    """The MSE of an (accuracy, MSE) curve at ``accuracy``, linear between its points; ``None`` outside its
    accuracy range extended by ``window`` (where the end point's MSE is used)."""
    curve = sorted(curve)
    if not curve or not curve[0][0] - window <= accuracy <= curve[-1][0] + window:
        return None
    if accuracy <= curve[0][0]:
        return curve[0][1]
    for (a0, m0), (a1, m1) in zip(curve, curve[1:]):  # noqa: B905 - pairs of neighbours
        if a0 <= accuracy <= a1:
            return m0 if a1 == a0 else m0 + (m1 - m0) * (accuracy - a0) / (a1 - a0)
    return curve[-1][1]


def paired_gains(section: Section, window: float = ACCURACY_TOLERANCE) -> list[PairedGain]:
    """Every (base family, plug-in setting, inversion attack) of ``section`` measured with and without the
    plug-in; ``window`` is the accuracy difference (fraction points) still counted as "matched"."""
    from .experiment import defense_label

    by_config = {_key(r.config): r for r in section.rows}
    groups: dict[tuple[str, str], list[tuple[DefenseRow, DefenseRow]]] = defaultdict(list)
    for row in section.rows:
        split = _without_plugin(row.config)
        if split is None or _key(split[0]) not in by_config:
            continue
        base = by_config[_key(split[0])]
        groups[(base.family, defense_label(split[1]))].append((base, row))
    out = []
    for (family, plugin), members in groups.items():
        curve_rows = [r for r in section.rows if r.family == family]
        for attack in section.inversion_attacks:
            gains, matched, deltas, ratios = [], [], [], []
            for base, row in members:
                without, with_ = _per_seed(base, attack), _per_seed(row, attack)
                for seed in sorted(set(without) & set(with_)):
                    (acc0, mse0, t0), (acc1, mse1, t1) = without[seed], with_[seed]
                    gain = mse1 / mse0 - 1
                    gains.append(gain)
                    deltas.append(acc1 - acc0)
                    if abs(acc1 - acc0) <= window + 1e-12:
                        matched.append(gain)
                    if t0 and t1:
                        ratios.append(t1 / t0)
            if not gains:
                continue
            curve = [(r.accuracy, r.attacks[attack]["mse"]) for r in curve_rows
                     if r.accuracy is not None and r.attacks.get(attack, {}).get("mse") is not None]
            above = []
            for _, row in members:
                mse = row.attacks.get(attack, {}).get("mse")
                ref = _interpolate(curve, row.accuracy, window) if row.accuracy is not None and mse else None
                if ref:
                    above.append(mse / ref - 1)
            out.append(PairedGain(family, plugin, attack, len(gains), len(matched), _mean(matched), _mean(gains),
                                  _mean(above), len(above), _mean(deltas), _mean(ratios)))
    return out


def _signed_pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.1f} %"


def _paired_table(gains: list[PairedGain], window: float) -> tuple[list[str], list[list[str]]]:
    header = ["base", "plug-in", "attack", f"pairs within {100 * window:g} pt / all",
              "MSE gain at matched accuracy", "MSE gain at the same strength", "above the base's curve (points)",
              "accuracy change", "training time ×"]
    body = [[g.base, g.plugin, g.attack, f"{g.matched} / {g.pairs}", _signed_pct(g.gain_matched),
             _signed_pct(g.gain_all), f"{_signed_pct(g.gain_curve)} ({g.curve_points})",
             "–" if g.accuracy_change is None else f"{100 * g.accuracy_change:+.2f} pt",
             _num(g.time_ratio, 2)] for g in gains]
    return header, body


PAIRED_EXPLANATION = (
    "Each row adds a plug-in (the last part of a composed defense) to the settings of a base defense and compares "
    "the attack's reconstruction MSE with and without it (a positive gain: the attack does worse). Matched "
    "accuracy: only the (setting, seed) pairs whose accuracies differ by at most {window} pt. Same strength: all "
    "pairs. Above the base's curve: the plug-in setting's MSE over the base's own accuracy–MSE curve, "
    "interpolated at the same accuracy. Training time ×: training CPU time with the plug-in over without.")


# --------------------------------------------------------------------------------------------------
# figures


def privacy_utility_plot(section: Section, path: Path) -> Path | None:
    """Accuracy vs the best attack's SSIM (left) and MSE (right), one curve per defense family.

    Returns ``None`` when the section has no inversion attack or no accuracy to plot.
    """
    rows = [r for r in section.rows if r.accuracy is not None and r.best("ssim") is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    families: dict[str, list[DefenseRow]] = defaultdict(list)
    for r in rows:
        families[r.family].append(r)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (family, members) in enumerate(families.items()):
        colour = colours[i % len(colours)]
        for ax, metric in zip(axes, ("ssim", "mse"), strict=True):
            points = sorted((r.best(metric)[1], 100 * r.accuracy) for r in members if r.best(metric) is not None)
            if not points:  # a spec that did not record this metric
                continue
            xs, ys = zip(*points, strict=True)
            marker = "*" if family == "none" else "o"
            ax.plot(xs, ys, marker=marker, markersize=11 if family == "none" else 6, color=colour, label=family,
                    linestyle="-" if len(points) > 1 else "none")
        floors = sorted((r.ce_floor, 100 * r.accuracy) for r in members if r.ce_floor is not None)
        if floors:
            xs, ys = zip(*floors, strict=True)
            axes[1].plot(xs, ys, linestyle="--", marker="|", color=colour, label=f"CE floor estimate ({family})")
    axes[0].set_xlabel("best attack SSIM (higher = more leakage)")
    axes[1].set_xlabel("best attack MSE (lower = more leakage)")
    for ax in axes:
        ax.set_ylabel("task accuracy with defense (%)")
        ax.grid(alpha=0.3)
    legend = next((ax for ax in axes[::-1] if ax.get_legend_handles_labels()[0]), None)
    if legend is not None:  # the MSE panel, unless the spec recorded no MSE
        legend.legend(fontsize=8, loc="best")
    fig.suptitle(f"Privacy–utility: {section.title}", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _load_reconstruction(cell: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    from safetensors.numpy import load_file

    path = cell["artifacts"].get("reconstruction")
    if path is None or not Path(path).is_file():
        return None
    arrays = load_file(str(path))
    return torch.from_numpy(np.array(arrays["original"])), torch.from_numpy(np.array(arrays["reconstruction"]))


#: Images shown per grid row: a cell evaluated on more images shows its first ones.
GRID_IMAGES = 10


def reconstruction_grids(section: Section, folder: Path) -> tuple[list[Path], list[str]]:
    """One grid per defense family and evaluated image set: the originals, the undefended rows, then a row per
    (defense strength, attack); first seed only, at most :data:`GRID_IMAGES` images. Also the rows left out
    because their cell recorded a reconstruction file that is not on disk (``"defense · attack"``): artifacts
    stay with the checkout that measured them, so a store copied elsewhere draws only what it has."""
    from .figures import reconstruction_grid

    seed = section.seeds[0]
    families: dict[str, list[DefenseRow]] = defaultdict(list)
    for r in section.rows:
        families[r.family].append(r)
    baseline = families.get("none", [])
    paths: list[Path] = []
    missing: list[str] = []
    for family, members in families.items():
        if family == "none" and len(families) > 1:
            continue  # the undefended rows open every other family's grid
        shown = members if family == "none" else [*baseline, *members]
        # Attacks evaluated on different images (e.g. one on the first 1000 test images, one on the first of each
        # class) get a grid each: a row always shows the same private images as the first.
        grids: dict[bytes, tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]] = {}
        for r in shown:
            for attack in section.inversion_attacks:
                cell = next((c for c in r.cells if c["attack_label"] == attack and c["seed"] == seed), None)
                loaded = _load_reconstruction(cell) if cell else None
                if loaded is None:
                    if cell and cell["artifacts"].get("reconstruction") and f"{r.label} · {attack}" not in missing:
                        missing.append(f"{r.label} · {attack}")
                    continue
                originals, reconstruction = loaded[0][:GRID_IMAGES], loaded[1][:GRID_IMAGES]
                ssim = cell["metrics"].get("ssim")
                entry = grids.setdefault(originals.numpy().tobytes(), (originals, []))
                entry[1].append((f"{r.label}\n{attack}\nSSIM {_num(ssim, 2)}", reconstruction))
        name = "".join(ch if ch.isalnum() else "-" for ch in family)
        for i, (originals, rows) in enumerate(grids.values()):
            suffix = f"-{i + 1}" if len(grids) > 1 else ""
            paths.append(reconstruction_grid(originals, rows, folder / f"{section.slug}-grid-{name}{suffix}.png",
                                             title=f"{section.title} · {family} (seed {seed})"))
    return paths, missing


# --------------------------------------------------------------------------------------------------
# the report


_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1150px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
.table-wrap { overflow-x: auto; margin: 1em 0; }
table { border-collapse: collapse; font-size: 0.8em; }
th, td { border: 1px solid #ccc; padding: .25em .45em; text-align: right; }
td:first-child { min-width: 9em; max-width: 16em; overflow-wrap: anywhere; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: .8em 0; border: 1px solid #eee; }
.summary { background: #f6f8fa; border-left: 4px solid #2b6cb0; padding: .6em 1em; }
.meta { color: #666; font-size: 0.9em; }
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def output_folder(path: str | Path) -> Path:
    """``path`` as a folder, created if missing; a clear error when a file is in the way."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output folder {out} is a file; pass the path of a folder (--out)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def build_report(db: str | Path, out_dir: str | Path, title: str | None = None,
                 window: float = ACCURACY_TOLERANCE) -> ReportFiles:
    """Write ``report.md``, ``report.html`` (self-contained) and ``figures/*.png`` to ``out_dir``.

    ``window`` is the accuracy difference (fraction points) within which a paired comparison counts as
    matched (:func:`paired_gains`).
    """
    if not 0 <= window <= 1:
        raise ConfigError(f"window must be an accuracy difference in [0, 1] (fraction points), got {window}")
    db = Path(db)
    from .experiment import current_cells

    with ResultStore.open_readonly(db) as store:  # never writes: a file that is not a store is refused
        sections = load_sections(store)
        runs = store.runs()
        stale = current_cells(store)[1]
    out = output_folder(out_dir)
    figures_dir = out / "figures"
    name = title or (runs[-1]["name"] if runs else "splitshield")
    n_cells = sum(len(r.cells) for s in sections for r in s.rows)
    older = (f" ({stale} cells measured by another splitshield revision, whose numbers may differ, are left out; "
             "`splitshield run` measures them again)") if stale else ""
    meta = (f"{n_cells} cells from {db.name}{older}; metrics are means over the evaluation images and over seeds; "
            "SSIM uses a 7×7 uniform window (scikit-image's default), PSNR assumes a data range of 1.")
    summaries = [summary_sentence(s) for s in sections]
    md = [f"# Split-inference leakage report: {name}", "", meta, "", "## Summary", ""]
    md += [f"- {s}" for s in summaries]
    body = [f"<h1>Split-inference leakage report: {html.escape(name)}</h1>", f"<p class='meta'>{html.escape(meta)}</p>",
            "<h2>Summary</h2><div class='summary'><ul>"
            + "".join(f"<li>{html.escape(s)}</li>" for s in summaries) + "</ul></div>"]
    figures: list[Path] = []
    for section, sentence in zip(sections, summaries, strict=True):
        header, rows = _table(section)
        seeds = ", ".join(map(str, section.seeds))
        md += ["", f"## {section.title}", "", f"Seeds: {seeds}.", "", sentence, "", _markdown_table(header, rows)]
        body += [f"<h2>{html.escape(section.title)}</h2>", f"<p class='meta'>Seeds: {html.escape(seeds)}.</p>",
                 f"<p>{html.escape(sentence)}</p>", _html_table(header, rows)]
        notes = [note for key, note in (("ce_floor", FLOOR_EXPLANATION), ("mi_bound", BOUND_EXPLANATION))
                 if any(getattr(r, key) is not None for r in section.rows)]
        if any(h.endswith("re-identified (true images)") for h in header):
            notes.append(_reid_explanation(section.dataset))
        if notes:
            md += ["", " ".join(notes)]
            body.append(f"<p class='meta'>{html.escape(' '.join(notes))}</p>")
        compared = _attack_table(section)
        if compared:
            md += ["", "### Attacks compared", "", _markdown_table(*compared)]
            body += ["<h3>Attacks compared</h3>", _html_table(*compared)]
        gains = paired_gains(section, window)
        if gains:
            explanation = PAIRED_EXPLANATION.format(window=f"{100 * window:g}")
            paired_header, paired_rows = _paired_table(gains, window)
            md += ["", "### Paired comparisons: with and without a plug-in", "", explanation, "",
                   _markdown_table(paired_header, paired_rows)]
            body += ["<h3>Paired comparisons: with and without a plug-in</h3>",
                     f"<p class='meta'>{html.escape(explanation)}</p>", _html_table(paired_header, paired_rows)]
        plot = privacy_utility_plot(section, figures_dir / f"{section.slug}-privacy-utility.png")
        grids, missing = reconstruction_grids(section, figures_dir)
        for fig, caption in [*([(plot, "Privacy–utility trade-off")] if plot else []),
                             *((g, "Reconstructions") for g in grids)]:
            figures.append(fig)
            rel = fig.relative_to(out).as_posix()
            md += ["", f"![{caption}]({rel})"]
            body.append(f"<img alt='{html.escape(caption)}' src='{_data_uri(fig)}'>")
        if missing:
            absent = (f"Not in the reconstruction figures: {', '.join(missing)}. Their cells recorded reconstruction "
                      "files that are not on this disk (artifacts stay with the checkout that measured them); "
                      "their numbers above are the stored ones.")
            md += ["", absent]
            body.append(f"<p class='meta'>{html.escape(absent)}</p>")
    md_path, html_path = write_pages(out / "report", md, body, f"{name} — splitshield report")
    return ReportFiles(md_path, html_path, figures, sections)


def write_pages(stem: Path, md: list[str], body: list[str], title: str) -> tuple[Path, Path]:
    """Write ``stem.md`` (the Markdown lines ``md``) and a self-contained ``stem.html`` (the HTML fragments
    ``body``, titled ``title``); returns both paths."""
    md_path, html_path = stem.with_suffix(".md"), stem.with_suffix(".html")
    md_path.write_text("\n".join(md) + "\n")
    html_path.write_text("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
                         f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
                         f"<body>{''.join(body)}</body></html>\n")
    return md_path, html_path


# --------------------------------------------------------------------------------------------------
# the audit gate


@dataclass(frozen=True)
class AuditViolation:
    """Why the gate fails for one cell: an attack that beat a bar (``metric``, ``value`` > ``limit``), or a
    ``reason`` it cannot pass (no number, a failed or missing cell, a bar no attack measured).

    A violation that concerns no single cell (a bar no attack measured) has an empty ``dataset``.
    """

    dataset: str
    model: str
    split: str
    defense: str
    attack: str
    seed: int
    metric: str
    value: float | None = None
    limit: float | None = None
    reason: str | None = None

    def __str__(self) -> str:
        where = (f"{self.dataset}/{self.model}/{self.split} defense={self.defense} attack={self.attack} "
                 f"seed={self.seed}: ") if self.dataset else ""
        if self.reason is not None:
            return where + self.reason
        return f"{where}{self.metric} {self.value:.4g} > {self.limit:.4g}"


def _violation(cell: dict[str, Any], metric: str, **what: Any) -> AuditViolation:
    return AuditViolation(cell["dataset"], cell["model"], cell["split"], cell["defense_label"], cell["attack_label"],
                          cell["seed"], metric, **what)


def _measures(attack: dict[str, Any], metrics: dict[str, Any] | None = None) -> tuple[str, ...]:
    """The metrics an attack setting produces: SSIM/PSNR/MSE for an inversion attack, completion accuracy for
    model completion; for an attack splitshield does not know, those its ``metrics`` hold, else all of them."""
    from .attacks import ATTACKS, CompletionAttack, InversionAttack, attack_name

    cls = ATTACKS.get(attack_name(str(attack.get("name"))))
    if cls is not None and issubclass(cls, InversionAttack):
        return INVERSION
    if cls is not None and issubclass(cls, CompletionAttack):
        return ("completion_accuracy",)
    known = tuple(m for m in (*INVERSION, "completion_accuracy") if m in (metrics or {}))
    return known or (*INVERSION, "completion_accuracy")


def _missing(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _cell_violations(cell: dict[str, Any], limits: dict[str, float | None]) -> list[AuditViolation]:
    """What fails the gate in one audited cell: its status, a missing (NaN) number, a number above its bar."""
    if cell["status"] == "failed":
        error = (cell.get("error") or "no error recorded").strip().splitlines() or ["no error recorded"]
        return [_violation(cell, "", reason=f"the cell failed ({error[-1][:200]}): it measured nothing")]
    if cell["status"] != "done":
        return [_violation(cell, "", reason=f"the cell never ran (status {cell['status']}); rerun the spec")]
    out = []
    for metric in _measures(cell["attack"], cell["metrics"]):
        limit = limits.get(metric)
        if limit is None:
            continue
        if metric not in cell["metrics"]:
            out.append(_violation(cell, metric, limit=limit, reason=f"{metric} missing: the attack produced no number"))
        elif _missing(cell["metrics"][metric]):
            out.append(_violation(cell, metric, limit=limit,
                                  reason=f"{metric} is NaN: the attack produced no number"))
        elif cell["metrics"][metric] > limit:
            out.append(_violation(cell, metric, value=cell["metrics"][metric], limit=limit))
    return out


def _audited_cells(store: ResultStore, hashes: Iterable[str] | None) -> tuple[list[dict[str, Any]], list[str]]:
    """The audited cells whatever their status, and the wanted hashes the store does not hold.

    ``hashes=None``: every cell splitshield measured at this results revision (not imported ones).
    """
    from .experiment import RESULTS_REVISION

    rows = store.cells(status=None)
    if hashes is None:
        return [c for c in rows if c["config"].get("revision", 1) == RESULTS_REVISION], []
    by_hash = {c["hash"]: c for c in rows}
    wanted = list(dict.fromkeys(hashes))
    return [by_hash[h] for h in wanted if h in by_hash], [h for h in wanted if h not in by_hash]


def _unmeasured_bars(cells: list[dict[str, Any]], limits: dict[str, float | None]) -> list[AuditViolation]:
    """A bar that no audited cell's attack measures: a gate with no attack cannot pass."""
    measured = {m for c in cells for m in _measures(c["attack"], c["metrics"])}
    return [AuditViolation("", "", "", "", "", -1, metric, limit=limit,
                           reason=f"no audited attack measures {metric}: a gate with no attack cannot pass")
            for metric, limit in limits.items() if limit is not None and metric not in measured]


def audit(store: ResultStore, max_ssim: float | None = None, max_psnr: float | None = None,
          max_completion_accuracy: float | None = None, hashes: Iterable[str] | None = None) -> list[AuditViolation]:
    """Everything that fails the gate: every audited cell whose attack beats a bar (mean over the evaluation
    images, per seed), whose audited metric is missing or NaN, that failed or never ran; and every bar that no
    audited attack measures. An empty list is a pass.

    ``hashes`` restricts the check to those cells (the ones of one spec; a hash the store lacks never ran);
    ``None`` checks all the cells of this splitshield's results revision.
    """
    limits = {"ssim": max_ssim, "psnr": max_psnr, "completion_accuracy": max_completion_accuracy}
    if all(v is None for v in limits.values()):
        raise ConfigError("audit needs at least one bar: --max-ssim, --max-psnr or --max-completion-accuracy")
    cells, absent = _audited_cells(store, hashes)
    out = [v for cell in cells for v in _cell_violations(cell, limits)]
    out += [AuditViolation("", "", "", "", "", -1, "", reason=f"cell {h[:12]} is not in the store: it never ran")
            for h in absent]
    return out + _unmeasured_bars(cells, limits)


def bar_setters(store: ResultStore, metrics: Iterable[str], hashes: Iterable[str] | None = None) -> list[str]:
    """Per metric, the audited cell whose attack came closest to (or beyond) the bar: the attack that set it.

    One line each: ``ssim 0.412: attack=strongest on mnist-5k/lenet/ReLU2 defense=none seed=0``.
    """
    cells, _ = _audited_cells(store, hashes)
    lines = []
    for metric in metrics:
        measured = [c for c in cells if c["status"] == "done" and not _missing(c["metrics"].get(metric))]
        if measured:
            top = max(measured, key=lambda c: c["metrics"][metric])
            lines.append(f"{metric} {top['metrics'][metric]:.4g}: attack={top['attack_label']} on {top['dataset']}/"
                         f"{top['model']}/{top['split']} defense={top['defense_label']} seed={top['seed']}")
    return lines


# --------------------------------------------------------------------------------------------------
# the audit gate's attack budgets

#: The smallest attack budgets the audit gate accepts, per attack and parameter (``aux_n`` is the attack
#: setting's number of auxiliary images; unset, the attacker has them all).
#:
#: A privacy gate is only as strong as the attack it runs: with a few optimiser steps any model "passes".
#: The minimums are where the attacks stop improving, measured on LeNet at ``ReLU2`` (mnist-5k, undefended,
#: 10 images): rMLE's SSIM is 0.67 at 300 iterations, 0.71 at 500, 0.752 at 1000 and 0.757 at 3000 and 5000
#: (He et al. run 5000 at most split points: the default); the inverse network's SSIM is 0.65 at 300 steps
#: and 0.67 at 1000 and 3000 (default 3000; cem_lenet.yaml trains 1000 steps of 128); the shadow head and
#: model reconstruction train like the inverse network and then run rMLE (their minimums are the shadow head's,
#: not measured for model reconstruction on its own). A batch under 32 images, or fewer than 256 auxiliary
#: images (where the inverse network warns that it overfits), makes a decoder (or stand-in head) that
#: under-reports leakage. Model completion's default is its minimum, 500 full-batch steps on 40 labels
#: (InfoScissors' count): its accuracy
#: is not monotone in the steps (76 % at 50, 69-71 % at 100-300, 77 % at 500, 68 % at 2000: 40 labels
#: overfit), so the gate asks for the setting it was designed with. UnSplit's defaults are its minimums too
#: (4 restarts of 50 rounds; where it stops improving is not measured yet): with fewer restarts its result
#: turns on the luck of the clone's initialisation. A parameter left at its default is never
#: weak: the defaults are the attacks' own settings (rMLE's are He et al.'s per split point, 500 iterations
#: at a learning rate of 0.1 at ``fc2``).
MIN_AUDIT_BUDGETS: dict[str, dict[str, int]] = {
    "rmle": {"iters": 1000},
    "inverse_network": {"steps": 1000, "batch_size": 32, "aux_n": 256},
    "shadow_head": {"steps": 1000, "batch_size": 32, "iters": 1000, "aux_n": 256},
    "model_reconstruction": {"steps": 1000, "batch_size": 32, "iters": 1000, "aux_n": 256},
    "model_completion": {"steps": 500, "n_labels": 40},
    "unsplit": {"rounds": 50, "restarts": 4},
    "prior_inversion": {"steps": 1000, "latent_iters": 200, "aux_n": 256},
}


@dataclass(frozen=True)
class AttackBudget:
    """One budget of one attack setting of a spec: the value the audit runs it with and the gate's minimum.

    ``source`` is ``"set"`` (the spec sets it) or where a default comes from (``"default"``,
    ``"He et al.'s default at ReLU2"``); ``value`` ``None`` means "all" (``aux_n`` unset).
    """

    entry: int
    attack: str
    name: str
    field: str
    value: int | None
    minimum: int
    source: str

    @property
    def weak(self) -> bool:
        """Set by the spec below the minimum (a default is never weak)."""
        return self.source == "set" and self.value is not None and self.value < self.minimum

    def __str__(self) -> str:
        shown = "all" if self.value is None else str(self.value)
        origin = "" if self.source == "set" else f"{self.source}; "
        return f"{self.field}={shown} ({origin}minimum {self.minimum})"


def _default(name: str, field: str, splits: list[str]) -> tuple[int | None, str]:
    """The value an attack uses for an unset budget, and where it comes from."""
    import inspect

    from .attacks import ATTACKS
    from .attacks.whitebox import rmle_settings

    if field == "aux_n":
        return None, "default"
    default = inspect.signature(ATTACKS[name]).parameters[field].default
    if default is None and field == "iters":  # rMLE's iterations: He et al.'s per split point
        per_split = {s: rmle_settings(s, None, None, None, None)[0] for s in splits}
        weakest = min(per_split, key=per_split.__getitem__)
        return per_split[weakest], f"He et al.'s default at {weakest}"
    return default, "default"


def attack_budgets(spec: Any) -> list[AttackBudget]:
    """The budgets of every attack setting of an :class:`~splitshield.config.ExperimentSpec`, in spec order,
    each against :data:`MIN_AUDIT_BUDGETS`."""
    from .attacks.portfolio import allowed_members, member_specs
    from .experiment import attack_labels

    settings = [(i, s) for i, entry in enumerate(spec.attacks) for s in entry.settings()]
    labels = attack_labels([s for _, s in settings])
    out = []
    for (i, setting), label in zip(settings, labels, strict=True):
        members = [(setting["name"], setting["params"])]
        if setting["name"] == "strongest":  # the portfolio is as strong as each of its members
            given = member_specs(setting["params"].get("members"))
            members = ([(m["name"], m) for m in given] if given
                       else [(m, {}) for m in allowed_members(setting["threat"])])
        # A portfolio of several members holds back `holdout` aux images from them to calibrate its choice.
        held = setting["params"].get("holdout", 16) if setting["name"] == "strongest" and len(members) > 1 else 0
        for name, params in members:
            for field, minimum in MIN_AUDIT_BUDGETS.get(name, {}).items():
                given = setting.get(field) if field == "aux_n" else params.get(field)
                if field == "aux_n" and given is not None:
                    given -= held
                value, source = (given, "set") if given is not None else _default(name, field, list(spec.splits))
                shown = label if name == setting["name"] else f"{label}/{name}"
                out.append(AttackBudget(i, shown, name, field, value, minimum, source))
    return out


def budget_lines(budgets: list[AttackBudget]) -> list[str]:
    """One line per attack setting: ``rmle: iters=1000 (minimum 1000)``."""
    per_attack: dict[str, list[AttackBudget]] = defaultdict(list)
    for b in budgets:
        per_attack[b.attack].append(b)
    return [f"{attack}: {', '.join(map(str, bs))}" for attack, bs in per_attack.items()]


def weak_attacks(spec: Any, budgets: list[AttackBudget]) -> list[str]:
    """One line per way the spec's attacks are weaker than the gate accepts, in spec order: a budget below its
    minimum, a non-adaptive attacker, noise as the attacker's data, mixmatch fine-tuning the cloud's part as the
    only completion attack on a U-shaped split (each says the fix)."""
    from .models.split import U_SEPARATOR

    # On a U-shaped split, mixmatch fine-tuning the cloud's part labelled fewer images than the frozen probe
    # (ResNet-20, results page): alone it can under-report label leakage.
    u_shaped = any(U_SEPARATOR in s for s in spec.splits)
    fine_tuning_only = all(s["params"].get("method", "supervised") == "mixmatch" and s["params"].get("fine_tune", True)
                           for s in spec.attack_settings() if s["name"] == "model_completion")
    problems = []
    for i, entry in enumerate(spec.attacks):
        problems += [f"spec field attacks[{i}].{_budget_field(b)} ({b.name}): {b.value} is below the audit's "
                     f"minimum {b.minimum}; raise it" for b in budgets if b.entry == i and b.weak]
        if u_shaped and entry.name == "model_completion" and fine_tuning_only:
            problems.append(f"spec field attacks[{i}].fine_tune ({entry.name}): on a U-shaped split, mixmatch "
                            "fine-tuning the cloud's part alone can under-report label leakage; set fine_tune: false "
                            "or add the supervised probe, {name: model_completion}, beside it")
        if not entry.adaptive:
            problems.append(f"spec field attacks[{i}].adaptive ({entry.name}): a non-adaptive attacker ignores the "
                            "defense and under-reports leakage; remove `adaptive: false`")
        if entry.aux in ("noise", "random_fields"):
            problems.append(f"spec field attacks[{i}].aux ({entry.name}): an attacker holding only {entry.aux} "
                            "under-reports leakage; use same_distribution or same_set")
    return list(dict.fromkeys(problems))


def _budget_field(budget: AttackBudget) -> str:
    """Where the spec sets ``budget``: ``iters``, or ``members.rmle.iters`` for a portfolio's member."""
    member = "/" in budget.attack and budget.field != "aux_n"
    return f"members.{budget.name}.{budget.field}" if member else budget.field


def unmeasured_bars(spec: Any, max_ssim: float | None = None, max_psnr: float | None = None,
                    max_completion_accuracy: float | None = None) -> list[str]:
    """One line per bar that no attack of the spec measures (an SSIM bar without an inversion attack...)."""
    measured = {m for s in spec.attack_settings() for m in _measures(s)}
    bars = {"ssim": ("--max-ssim", max_ssim), "psnr": ("--max-psnr", max_psnr),
            "completion_accuracy": ("--max-completion-accuracy", max_completion_accuracy)}
    from .attacks import ATTACKS, InversionAttack

    names = [name for name, cls in ATTACKS.items() if issubclass(cls, InversionAttack)]
    inversion = f"an inversion attack ({', '.join(names[:-1])} or {names[-1]})"
    kind = {"ssim": inversion, "psnr": inversion,
            "completion_accuracy": "a model_completion attack"}
    return [f"{option}: the spec's attacks do not measure {metric}; add {kind[metric]} to its attacks "
            "(a gate with no attack cannot fail)" for metric, (option, limit) in bars.items()
            if limit is not None and metric not in measured]
