"""The advice as pages: ``advice.md`` and a self-contained ``advice.html`` (images embedded), with two Pareto plots
and the strongest fast attack's reconstruction strips, built with the report's own tables and style."""

from __future__ import annotations

import html
import math
from pathlib import Path

from ..figures import pareto_plot, reconstruction_grid
from ..report import _data_uri, _html_table, _markdown_table, output_folder, write_pages
from .table import Advice

#: How the table was measured; ``{by}`` is what the strongest fast attack is chosen by (SSIM or PSNR).
HOW = ("Costs are per image. Multiply-adds are PyTorch's FLOP counter's (matrix products and convolutions; "
       "element-wise work is not counted); head milliseconds are measured on this machine, the fastest of a few "
       "runs (on a CPU, the notes name cuts timed while this process got too little of the cores). Bytes are "
       "codec frames with their headers, one image per frame; 8-bit frames are quantised over each image's range. "
       "Leakage: fast attacks with small fixed budgets (stated above) reconstruct the same held-out test images; "
       "PSNR and SSIM are the strongest attack's (the highest {by}), beside each attack's {by} when several ran. "
       "Then the conditional-entropy MSE floor (an estimate for comparing cuts) and the GPZ intra-class radius R̄² "
       "of the features (R̄²/V: divided by their total variance; drop: from the previous cut). Marks: ★ "
       "recommended, ms / kB on the Pareto front of leakage against head latency / bytes, GPZ in Liu et al.'s "
       "zone (from the cut after the largest drop of R̄²).")


def _meta(advice: Advice) -> str:
    m = advice.meta
    parts = [f"input {'×'.join(map(str, m['input_shape']))}", f"data {m['data'] or 'none'}",
             f"device {m['device']} ({m['threads']} thread{'s' * (m['threads'] != 1)})", f"seed {m['seed']}",
             f"wire {m['wire_8bit']}"]
    if "accuracy" in m:
        parts.append(f"test accuracy {m['accuracy']:.1%} (float features)")
    if m.get("fast_attacks"):
        parts.append(f"fast attacks on {m['fast_images']} held-out images: " + "; ".join(m["fast_attacks"].values()))
    if any(r.ce_floor is not None for r in advice.rows):
        parts.append(f"CE-floor noise {m['noise']:g} × the feature's std")
    return "; ".join(parts) + "."


def _plottable(values: list[float]) -> list[float]:
    """``values`` with ±inf moved just beyond the finite ones (a tenth of their range), so that a plot can show them."""
    finite = [v for v in values if math.isfinite(v)] or [0.0]
    margin = 0.1 * (max(finite) - min(finite)) or 1.0
    return [max(finite) + margin if v == math.inf else min(finite) - margin if v == -math.inf else v for v in values]


def _score(advice: Advice, point: str) -> str:
    """The measure the strongest fast attack at ``point`` was chosen by, as a strip's label: 'SSIM 0.62'."""
    row = advice.row(point)
    return f"PSNR {row.psnr:.1f} dB" if advice.strongest_by == "psnr" else f"SSIM {row.ssim:.2f}"


def _figures(advice: Advice, folder: Path) -> list[tuple[Path, str]]:
    figures = []
    rank = advice.rank
    if rank is not None:
        # Diverged attacks (NaN) have no value to plot; an exact reconstruction (PSNR +inf) is drawn above the rest.
        known = [i for i, v in enumerate(advice.leaks()) if v is not None]
        rows = [advice.rows[i] for i in known]
        leakage = _plottable([getattr(r, rank.column) for r in rows])
        names = [r.point + (" (∞)" if math.isinf(getattr(r, rank.column)) else "") for r in rows]
        direction = "higher" if rank.higher_leaks else "lower"
        best = advice.recommended
        highlight = next((i for i, r in enumerate(rows) if r.point == best), None)
        for name, costs, front, xlabel in (
                ("latency", [r.head_ms for r in rows], advice.pareto_latency, "head ms per image (batch 1)"),
                ("bytes", [r.wire_kbytes for r in rows], advice.pareto_bytes, "kB per image on the wire")):
            on_front = [i for i, r in enumerate(rows) if r.point in front]
            path = pareto_plot(costs, leakage, names, on_front, folder / f"pareto-{name}.png",
                               xlabel, f"{rank.label} ({direction} = more leakage)",
                               f"{advice.meta['model']}: leakage vs {xlabel.split(' per')[0]}", highlight)
            figures.append((path, f"Pareto front: leakage vs {xlabel}"))
    if advice.originals is not None and advice.reconstructions:
        strips = [(f"{p}\n{_score(advice, p)}\n{advice.row(p).strongest_threat.replace('_', ' ')}", x)
                  for p, x in advice.reconstructions.items()]
        path = reconstruction_grid(advice.originals, strips, folder / "reconstructions.png", title="The strongest "
                                   "fast attack per cut: held-out images (top) and their reconstructions")
        figures.append((path, "Reconstructions per cut"))
    return figures


def write_report(advice: Advice, out: str | Path) -> list[Path]:
    """Write ``advice.md``, ``advice.html`` and ``figures/*.png`` into the folder ``out``; returns their paths."""
    folder = output_folder(out)
    title = f"Where to cut {advice.meta['model']}"
    header, body = advice.table()
    how = HOW.format(by=advice.strongest_by.upper())
    timing = " · ".join(f"{stage} {seconds:.1f} s" for stage, seconds in advice.timings.items())
    summary = [advice.sentence(), *advice.ruled_out_lines(), *advice.notes]
    figures = _figures(advice, folder / "figures")
    md = [f"# {title}", "", _meta(advice), "", "## Advice", "", *(f"- {s}" for s in summary), "",
          "## Every cut", "", how, "", _markdown_table(header, body), "", f"Time: {timing}."]
    page = [f"<h1>{html.escape(title)}</h1>", f"<p class='meta'>{html.escape(_meta(advice))}</p>", "<h2>Advice</h2>",
            "<div class='summary'><ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in summary) + "</ul></div>",
            "<h2>Every cut</h2>", f"<p class='meta'>{html.escape(how)}</p>", _html_table(header, body),
            f"<p class='meta'>Time: {html.escape(timing)}.</p>"]
    for path, caption in figures:
        md += ["", f"![{caption}]({path.relative_to(folder).as_posix()})"]
        page.append(f"<h3>{html.escape(caption)}</h3><img alt='{html.escape(caption)}' src='{_data_uri(path)}'>")
    md_path, html_path = write_pages(folder / "advice", md, page, f"{title} — splitshield")
    return [md_path, html_path, *(path for path, _ in figures)]
