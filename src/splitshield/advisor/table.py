"""The advisor's answer: a row per cut (:class:`PointAdvice`), the table and its recommendation (:class:`Advice`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .leakage import gpz_zone
from .recommend import RANKINGS, Ranking, best_cut, budget_reasons, fixed, pareto_front, strongest_measure

#: The column groups of :meth:`Advice.table`.
TABLE_GROUPS = ("edge", "wire", "leakage")


@dataclass(frozen=True)
class PointAdvice:
    """Everything measured at one cut. Per image throughout; ``None`` where not measured.

    Attributes
    ----------
    point, feature_shape:
        The cut's name and the shape of one feature.
    head_macs, tail_macs, head_params, head_mb, head_ms, head_ms_b32:
        Compute (:class:`~splitshield.advisor.costs.ComputeCost`): multiply-adds of head and tail, the head's
        parameters and weight size in MB, its milliseconds per image at batch 1 and at batch 32.
    bytes_float32, bytes_float16, bytes_8bit:
        Bytes per image on the wire (codec frames with headers); 8-bit is the mean over measured images.
    accuracy_8bit:
        Task accuracy in [0, 1] with the tail on decoded 8-bit features.
    black_box_psnr, black_box_ssim, white_box_psnr, white_box_ssim:
        Each fast attack's mean PSNR (dB) and SSIM on held-out images: the black-box inverse network
        (:class:`~splitshield.advisor.FastAttack`) and white-box rMLE (:class:`~splitshield.advisor.FastWhiteBox`).
    psnr, ssim, strongest_threat:
        The strongest fast attack's PSNR and SSIM, and its threat: the one with the highest mean SSIM, or PSNR
        when the advice ranks by PSNR.
    ce_floor:
        Conditional-entropy MSE floor at the advisor's noise level (squared pixel units).
    gpz_r2, gpz_r2_norm:
        GPZ intra-class radius R̄² (squared feature units) and R̄² divided by the total variance V.
    gpz_drop, gpz_drop_norm:
        Relative drop of R̄² (and of R̄²/V) from the previous cut of the table (the previous legal cut when every
        cut is scored; with a subset of ``points``, the previous one of the subset).
    """

    point: str
    feature_shape: tuple[int, ...]
    head_macs: int
    tail_macs: int
    head_params: int
    head_mb: float
    head_ms: float
    head_ms_b32: float
    bytes_float32: int
    bytes_float16: int | None
    bytes_8bit: float | None
    accuracy_8bit: float | None = None
    black_box_psnr: float | None = None
    black_box_ssim: float | None = None
    white_box_psnr: float | None = None
    white_box_ssim: float | None = None
    psnr: float | None = None
    ssim: float | None = None
    strongest_threat: str | None = None
    ce_floor: float | None = None
    gpz_r2: float | None = None
    gpz_r2_norm: float | None = None
    gpz_drop: float | None = None
    gpz_drop_norm: float | None = None

    @property
    def wire_kbytes(self) -> float:
        """kB (10³ bytes) per image on the wire: 8-bit coded when measured, else float32."""
        return (self.bytes_8bit if self.bytes_8bit is not None else self.bytes_float32) / 1000


def _num(value: float | None, spec: str | None = None) -> str:
    """``value`` formatted by ``spec``; by default three significant digits with no exponent above 1000
    (:func:`~splitshield.advisor.recommend.fixed`); a dash when missing."""
    return "–" if value is None else fixed(value) if spec is None else format(value, spec)


def _kb(size: float | None) -> str:
    """Bytes as kB (10³ bytes)."""
    return _num(None if size is None else size / 1000)


def _pct(value: float | None, spec: str = ".1f") -> str:
    """A fraction as a percentage: 0.912 -> '91.2%' ('91%' with spec '.0f')."""
    if value is None:
        return "–"
    text = f"{100 * value:{spec}}"
    return f"{text.lstrip('-') if float(text) == 0 else text}%"  # a drop of -0.2 % reads 0 %, not -0 %


def _count(value: float) -> str:
    """12 -> '12', 61706 -> '61.7k', 11181642 -> '11.2M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


@dataclass
class Advice:
    """Every cut of a model scored for edge cost, wire bytes and leakage, with the recommended cut.

    Dataframe-like: ``len(advice)``, iteration over :class:`PointAdvice` rows, ``advice["ssim"]`` (one column as a
    list), :meth:`records` (``pandas.DataFrame(advice.records())``). Plots and pages: :meth:`write_report`.

    Attributes
    ----------
    rows:
        One :class:`PointAdvice` per cut, in the model's execution order.
    ranking:
        The leakage measure cuts are ranked by (a key of :data:`~splitshield.advisor.recommend.RANKINGS`), or
        ``None`` when leakage was not measured (costs only).
    max_edge_ms, max_kbytes:
        The budgets: head milliseconds per image at batch 1, kB per image on the wire (:attr:`PointAdvice.wire_kbytes`).
    meta:
        How it was measured: model, input shape, dataset, device, threads, seed, budgets of the estimate.
    notes:
        What the user should know (e.g. why leakage was not measured).
    timings:
        Seconds per stage: ``trace`` (the model's graph), ``inputs``, ``split``, ``compute``, ``features``,
        ``wire``, ``statistics``, and ``attack (THREAT)`` per fast attack.
    originals, reconstructions:
        The held-out images [N, C, H, W] and, per cut, the strongest fast attack's reconstructions of them
        (:attr:`PointAdvice.strongest_threat`), in [0, 1].
    """

    rows: list[PointAdvice]
    ranking: str | None
    max_edge_ms: float | None = None
    max_kbytes: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    originals: torch.Tensor | None = None
    reconstructions: dict[str, torch.Tensor] = field(default_factory=dict)

    # ---------------------------------------------------------------------------------------------- the table

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[PointAdvice]:
        return iter(self.rows)

    def __getitem__(self, column: str) -> list[Any]:
        """One column (a :class:`PointAdvice` field) as a list, in row order."""
        names = [f.name for f in dataclasses.fields(PointAdvice)]
        if column not in names:
            raise KeyError(f"no column {column!r}; columns: {', '.join(names)}")
        return [getattr(r, column) for r in self.rows]

    @property
    def points(self) -> list[str]:
        return [r.point for r in self.rows]

    def row(self, point: str) -> PointAdvice:
        """The row of cut ``point``."""
        return self.rows[self.points.index(point)]

    def records(self) -> list[dict[str, Any]]:
        """The rows as dicts (every field, plus ``wire_kbytes``, ``pareto_ms``, ``pareto_bytes``, ``recommended``)."""
        fronts = set(self.pareto_latency), set(self.pareto_bytes)
        return [{**dataclasses.asdict(r), "wire_kbytes": r.wire_kbytes, "pareto_ms": r.point in fronts[0],
                 "pareto_bytes": r.point in fronts[1], "recommended": r.point == self.recommended} for r in self.rows]

    # ---------------------------------------------------------------------------------------------- the advice

    @property
    def rank(self) -> Ranking | None:
        return RANKINGS[self.ranking] if self.ranking else None

    @property
    def strongest_by(self) -> str:
        """What each cut's strongest fast attack was chosen by, ``ssim`` or ``psnr``
        (:func:`~splitshield.advisor.recommend.strongest_measure`)."""
        return strongest_measure(self.ranking)

    def leaks(self) -> list[float | None]:
        """Each cut's leakage, oriented so that higher means more (``None`` where unmeasured, NaN (a diverged attack)
        or costs only; an infinite PSNR, an exact reconstruction, is the most leakage there is)."""
        rank = self.rank
        if rank is None:
            return [None] * len(self.rows)
        values = [getattr(r, rank.column) for r in self.rows]
        return [rank.leak(v) if v is not None and not math.isnan(v) else None for v in values]

    @property
    def pareto_latency(self) -> list[str]:
        """Cuts on the Pareto front of leakage against head milliseconds (batch 1)."""
        return [self.rows[i].point for i in pareto_front([r.head_ms for r in self.rows], self.leaks())]

    @property
    def pareto_bytes(self) -> list[str]:
        """Cuts on the Pareto front of leakage against bytes per image on the wire."""
        return [self.rows[i].point for i in pareto_front([r.wire_kbytes for r in self.rows], self.leaks())]

    @property
    def ruled_out(self) -> dict[str, str]:
        """Cuts that break a budget, with the budgets each breaks in words."""
        out = {}
        for r in self.rows:
            reasons = budget_reasons(r.head_ms, r.wire_kbytes, self.max_edge_ms, self.max_kbytes)
            if reasons:
                out[r.point] = " and ".join(reasons)
        return out

    @property
    def recommended(self) -> str | None:
        """The cut within budgets that leaks least (fewer head multiply-adds, then fewer bytes, among equals);
        ``None`` when leakage was not measured or no cut meets the budgets."""
        ruled_out = self.ruled_out
        index = best_cut(self.leaks(), [r.point not in ruled_out for r in self.rows],
                         [(r.head_macs, r.wire_kbytes) for r in self.rows])
        return None if index is None else self.rows[index].point

    @property
    def gpz_zone(self) -> list[str]:
        """Liu et al.'s Golden Partition Zone: the cuts from the one after the largest relative drop of R̄² (see
        :func:`~splitshield.advisor.leakage.gpz_zone`); ``[]`` when R̄² was not measured."""
        return [self.rows[i].point for i in gpz_zone([r.gpz_drop for r in self.rows])]

    @property
    def budgets_met(self) -> bool:
        """Whether some cut meets every budget."""
        return len(self.ruled_out) < len(self.rows)

    def sentence(self) -> str:
        """The advice in one plain-language sentence."""
        rank = self.rank
        if not self.budgets_met:
            return f"No cut meets the budgets ({self._budget_words()}): each breaks at least one, as listed."
        if rank is None:
            within = [r.point for r in self.rows if r.point not in self.ruled_out]
            budgets = f"; within the budgets: {', '.join(within)}" if self._budget_words() else ""
            return f"Costs only: leakage was not measured, so no cut is recommended{budgets}."
        best, ruled_out = self.recommended, self.ruled_out
        if best is None:
            within = " within the budgets" if ruled_out else ""
            return f"No cut{within} has a {rank.label} value (see the notes), so no cut is recommended."
        r = self.row(best)
        where = "this CPU" if str(self.meta.get("device", "cpu")) == "cpu" else str(self.meta["device"])
        wire = self.meta.get("wire_8bit", "8-bit coding") if r.bytes_8bit is not None else "float32"
        text = (f"Cut at {best}: {fixed(r.head_ms, 2)} ms per image on {where}, {fixed(r.wire_kbytes)} kB per image "
                f"after {wire}, {rank.label} {fixed(getattr(r, rank.column))}")
        if r.tail_macs == 0:
            text += " (there the device runs the whole model: the tail has no multiply-adds)"
        leaks = dict(zip(self.points, self.leaks(), strict=True))
        # What the extra head compute buys: every cheaper alternative leaks at least this much.
        cheaper = [c.point for c in self.rows if c.head_macs < r.head_macs and c.point not in ruled_out]
        valued = [p for p in cheaper if leaks[p] is not None]
        if valued:
            least = getattr(self.row(min(valued, key=lambda p: leaks[p])), rank.column)
            scope = "every cheaper cut within the budgets" if ruled_out else "every cheaper cut"
            unknown = [p for p in cheaper if leaks[p] is None]
            scope += f" but {', '.join(unknown)} (no value)" if unknown else ""
            text += (f"; {scope} (fewer head multiply-adds) has {rank.label} {'≥' if rank.higher_leaks else '≤'} "
                     f"{fixed(least)}")
        # Cuts that would leak less are ruled out by a budget, not forgotten: name them.
        tighter = [p for p in ruled_out if leaks[p] is not None and leaks[p] < leaks[best]]
        if tighter:
            verb = "breaks" if len(tighter) == 1 else "break"
            text += f"; {', '.join(tighter)} would leak less but {verb} the budgets"
        return text + "."

    def ruled_out_lines(self) -> list[str]:
        """The cuts the budgets rule out, in words: one line per cut when none is left, else one line for all."""
        if not self.ruled_out:
            return []
        if not self.budgets_met:
            return [f"{point}: {reason}" for point, reason in self.ruled_out.items()]
        return ["Ruled out by the budgets: " + "; ".join(f"{p} ({why})" for p, why in self.ruled_out.items()) + "."]

    def _budget_words(self) -> str:
        words = []
        if self.max_edge_ms is not None:
            words.append(f"head ≤ {self.max_edge_ms:g} ms per image")
        if self.max_kbytes is not None:
            words.append(f"≤ {self.max_kbytes:g} kB per image")
        return ", ".join(words)

    # ---------------------------------------------------------------------------------------------- rendering

    def table(self, groups: Sequence[str] = TABLE_GROUPS) -> tuple[list[str], list[list[str]]]:
        """The table as text: a header and one row of cells per cut, the cut's name first.

        ``groups`` picks the columns (:data:`TABLE_GROUPS`): ``edge`` (head compute and latency), ``wire`` (feature
        shape, tail compute, bytes, accuracy on 8-bit features), ``leakage`` (measures present, each fast attack's
        SSIM, or PSNR when ranked by it, beside the strongest's when more than one ran, then the advice
        marks: ★ recommended, ``ms`` / ``kB`` on the Pareto front of leakage vs head latency / bytes, ``GPZ`` in
        Liu et al.'s zone, from the cut after the largest drop of R̄²). Columns never measured are left out.
        """
        wire = self.meta.get("wire_8bit", "8-bit").split(" (")[0]
        by, spec = self.strongest_by, {"ssim": ".3f", "psnr": ".2f"}[self.strongest_by]
        fronts, best, zone = (set(self.pareto_latency), set(self.pareto_bytes)), self.recommended, self.gpz_zone

        def marks(r: PointAdvice) -> str:
            return " ".join(m for m, on in (("★", r.point == best), ("ms", r.point in fronts[0]),
                                            ("kB", r.point in fronts[1]), ("GPZ", r.point in zone)) if on)

        def per_attack(threat: str) -> tuple[str, str, str, Callable[[PointAdvice], str]]:
            field = f"{threat}_{by}"
            return "leakage", f"{by.upper()} {threat.replace('_', ' ')}", field, lambda r: _num(getattr(r, field), spec)

        columns: list[tuple[str, str, str | None, Callable[[PointAdvice], str]]] = [
            ("edge", "head MMAC", None, lambda r: fixed(r.head_macs / 1e6)),
            ("edge", "head params", None, lambda r: _count(r.head_params)),
            ("edge", "head MB", None, lambda r: fixed(r.head_mb)),
            ("edge", "head ms (b=1)", None, lambda r: fixed(r.head_ms)),
            ("edge", "head ms/img (b=32)", None, lambda r: fixed(r.head_ms_b32)),
            ("wire", "feature", None, lambda r: "×".join(map(str, r.feature_shape))),
            ("wire", "tail MMAC", None, lambda r: fixed(r.tail_macs / 1e6)),
            ("wire", "kB float32", None, lambda r: _kb(r.bytes_float32)),
            ("wire", "kB float16", None, lambda r: _kb(r.bytes_float16)),
            ("wire", f"kB {wire}", "bytes_8bit", lambda r: _kb(r.bytes_8bit)),
            ("wire", f"accuracy {wire}", "accuracy_8bit", lambda r: _pct(r.accuracy_8bit)),
            ("leakage", "PSNR", "psnr", lambda r: _num(r.psnr, ".2f")),
            ("leakage", "SSIM", "ssim", lambda r: _num(r.ssim, ".3f")),
            per_attack("black_box"),
            per_attack("white_box"),
            ("leakage", "CE floor", "ce_floor", lambda r: _num(r.ce_floor)),
            ("leakage", "R̄²", "gpz_r2", lambda r: _num(r.gpz_r2)),
            ("leakage", "R̄²/V", "gpz_r2_norm", lambda r: _num(r.gpz_r2_norm, ".3f")),
            ("leakage", "R̄² drop", "gpz_drop", lambda r: _pct(r.gpz_drop, ".0f")),
            ("leakage", "R̄²/V drop", "gpz_drop_norm", lambda r: _pct(r.gpz_drop_norm, ".0f")),
        ]
        if self.ranking is not None:
            columns.append(("leakage", "advice", None, marks))

        def measured(field: str) -> bool:
            return any(getattr(r, field) is not None for r in self.rows)

        # With one fast attack, its own column would repeat the strongest's.
        per_threat = {f"black_box_{by}", f"white_box_{by}"}
        several = sum(measured(f) for f in per_threat) > 1
        shown = [(name, cell) for group, name, field, cell in columns if group in groups
                 and (field is None or measured(field) and (several or field not in per_threat))]
        return ["point", *(name for name, _ in shown)], [[r.point, *(cell(r) for _, cell in shown)] for r in self.rows]

    def write_report(self, out: str | Path) -> list[Path]:
        """Write ``advice.md``, a self-contained ``advice.html`` and ``figures/*.png`` (two Pareto plots and the
        reconstruction strips) to the folder ``out``; returns the paths written."""
        from .pages import write_report

        return write_report(self, out)
