"""``report.md`` and a self-contained ``report.html`` built from the same blocks.

The Markdown links PNG files written next to it; the HTML embeds the same PNGs as base64 data
URIs, so it opens offline and can be mailed as one file.
"""

from __future__ import annotations

import base64
import html
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segshare.data.io import write_text_atomic
from segshare.evaluation.metrics import ALL_METRICS, nanmean
from segshare.evaluation.plots import box_plots, overlay_montage

#: Metrics of the statistics table (TN is omitted: it only measures the image size).
TABLE_METRICS = tuple(m for m in ALL_METRICS if m != "TN")
NUM_WORST = 5

Block = tuple[str, object]  # ("h1"|"h2"|"p"|"list"|"table"|"image", payload)


def _fmt(value) -> str:
    if isinstance(value, int | np.integer):
        return str(int(value))
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "NaN"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def label_statistics(values: Sequence[float]) -> dict[str, float]:
    """mean (nanmean, as in summary.json), sd (ddof=1), median, n (not NaN) and n_inf."""
    arr = np.asarray(values, float)
    valid = arr[~np.isnan(arr)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sd = float(np.std(valid, ddof=1)) if valid.size > 1 else float("nan")
        med = float(np.median(valid)) if valid.size else float("nan")
    return {
        "mean": nanmean(arr),
        "sd": sd,
        "median": med,
        "n": int(valid.size),
        "n_inf": int(np.isinf(valid).sum()),
    }


def case_score(case: dict) -> float:
    """Ranking score of a case: mean Dice over its labels (NaN ones skipped)."""
    return nanmean([v["Dice"] for v in case["metrics"].values()])


def build_blocks(summary: dict, pictures: dict[str, bytes], title: str) -> list[Block]:
    """The report's content as a list of blocks (shared by Markdown and HTML)."""
    return [
        *_overview_blocks(summary, title),
        *_statistics_blocks(summary, pictures),
        *_case_blocks(summary, pictures),
    ]


def _overview_blocks(summary: dict, title: str) -> list[Block]:
    """Title, what was compared and how, and the foreground and per-label means."""
    cases, names = summary["metric_per_case"], summary["labels"]
    settings = summary.get("settings", {})
    blocks: list[Block] = [("h1", title)]
    blocks.append(
        (
            "list",
            [
                f"predictions: `{settings.get('pred_dir', '?')}`",
                f"references: `{settings.get('ref_dir', '?')}`",
                f"cases evaluated: {len(cases)}; missing predictions: "
                f"{summary['num_missing_predictions']}; predictions without reference: "
                f"{len(summary['unmatched_predictions'])}",
                f"HD95 variant: {settings.get('hd95', '?')}; NSD tolerance: "
                f"{settings.get('nsd_tolerance_mm', '?')} mm; distances in mm (voxel spacing)",
                "Dice/IoU are NaN when reference and prediction are both empty; means skip NaN "
                "(nanmean); distances are inf when exactly one side is empty (see docs/metrics.md)",
            ],
        )
    )
    blocks.append(("h2", "Foreground mean (mean of the per-label means)"))
    fg = summary["foreground_mean"]
    blocks.append(("table", (list(TABLE_METRICS), [[_fmt(fg[m]) for m in TABLE_METRICS]])))
    glob = summary["global_overlap"]
    blocks.append(
        (
            "p",
            "Case-averaged Dice (nanmean over cases) per label: "
            + "; ".join(f"{k} ({n}) {_fmt(summary['mean'][k]['Dice'])}" for k, n in names.items())
            + ". Global Dice (counts summed over cases): "
            + "; ".join(f"{k} ({n}) {_fmt(glob[k]['Dice'])}" for k, n in names.items())
            + ".",
        )
    )
    if summary.get("regions"):
        blocks.append(("h2", "Regions (each the union of its label values)"))
        rows = [
            [f"{name} ({'+'.join(map(str, values))})"]
            + [_fmt(summary["region_mean"][name][m]) for m in TABLE_METRICS]
            for name, values in summary["regions"].items()
        ]
        overall = summary["region_foreground_mean"]
        rows.append(["mean over regions"] + [_fmt(overall[m]) for m in TABLE_METRICS])
        blocks.append(("table", (["region", *TABLE_METRICS], rows)))
    return blocks


def _statistics_blocks(summary: dict, pictures: dict[str, bytes]) -> list[Block]:
    """Box plots and the statistics of every label and metric."""
    cases, names = summary["metric_per_case"], summary["labels"]
    blocks: list[Block] = []
    if "boxplots" in pictures:
        blocks.append(("h2", "Dice and HD95 per label"))
        blocks.append(("image", ("boxplots.png", "Box plots of Dice and HD95 per label")))
    blocks.append(("h2", "Statistics per label and metric"))
    rows = []
    for metric in TABLE_METRICS:
        for key, name in names.items():
            st = label_statistics([c["metrics"][key][metric] for c in cases])
            rows.append(
                [
                    metric,
                    f"{key} ({name})",
                    *(_fmt(st[k]) for k in ("mean", "sd", "median", "n", "n_inf")),
                ]
            )
    blocks.append(("table", (["metric", "label", "mean", "sd", "median", "n", "n_inf"], rows)))
    return blocks


def _case_blocks(summary: dict, pictures: dict[str, bytes]) -> list[Block]:
    """The worst cases, the overlays, missing and unmatched predictions."""
    cases, names = summary["metric_per_case"], summary["labels"]
    blocks: list[Block] = [("h2", f"Worst cases (lowest mean Dice, up to {NUM_WORST})")]
    ranked = sorted(cases, key=lambda c: (math.isnan(case_score(c)), case_score(c)))
    header = ["case", "mean Dice"] + [f"Dice {k}" for k in names] + [f"HD95 {k}" for k in names]
    rows = [
        [c["case_id"], _fmt(case_score(c))]
        + [_fmt(c["metrics"][k]["Dice"]) for k in names]
        + [_fmt(c["metrics"][k]["HD95"]) for k in names]
        for c in ranked[:NUM_WORST]
    ]
    blocks.append(("table", (header, rows)))
    if "overlays" in pictures:
        blocks.append(("h2", "Overlays: worst, median and best case"))
        blocks.append(
            (
                "p",
                "Reference contours solid, prediction contours dashed; slices "
                "through the centre of the reference foreground (RAS grid).",
            )
        )
        blocks.append(("image", ("overlays.png", "Overlay montage")))
    blocks.append(("h2", f"Missing predictions ({summary['num_missing_predictions']})"))
    missing = summary["missing_predictions"]
    blocks.append(
        ("list", [f"`{m['case_id']}`: no `{m['prediction_file']}`" for m in missing] or ["none"])
    )
    if summary["unmatched_predictions"]:
        blocks.append(("h2", "Predictions without a reference (not scored)"))
        blocks.append(("list", [f"`{u}`" for u in summary["unmatched_predictions"]]))
    return blocks


def render_markdown(blocks: list[Block]) -> str:
    """Markdown text of ``blocks`` (pictures linked as files next to the report)."""
    out = []
    for kind, payload in blocks:
        if kind == "h1":
            out.append(f"# {payload}\n")
        elif kind == "h2":
            out.append(f"## {payload}\n")
        elif kind == "p":
            out.append(f"{payload}\n")
        elif kind == "list":
            out.append("\n".join(f"- {item}" for item in payload) + "\n")
        elif kind == "table":
            header, rows = payload
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            out.append("\n".join(lines) + "\n")
        elif kind == "image":
            out.append(f"![{payload[1]}]({payload[0]})\n")
    return "\n".join(out)


def _inline_code(text: str) -> str:
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f0f0f0}td:first-child,td:nth-child(2){text-align:left}
img{max-width:100%}code{background:#f4f4f4;padding:0 3px}"""


def render_html(blocks: list[Block], pictures: dict[str, bytes]) -> str:
    """Self-contained HTML of ``blocks``: PNGs embedded as base64 data URIs, no external links."""
    out = [
        "<!DOCTYPE html>",
        "<html><head><meta charset='utf-8'>",
        f"<title>{html.escape(str(blocks[0][1]))}</title>",
        f"<style>{CSS}</style></head><body>",
    ]
    for kind, payload in blocks:
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{html.escape(str(payload))}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline_code(payload)}</p>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{_inline_code(i)}</li>" for i in payload) + "</ul>")
        elif kind == "table":
            header, rows = payload
            out.append(
                "<table><tr>"
                + "".join(f"<th>{html.escape(h)}</th>" for h in header)
                + "</tr>"
                + "".join(
                    "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>"
                    for row in rows
                )
                + "</table>"
            )
        elif kind == "image":
            data = base64.b64encode(pictures[payload[0].removesuffix(".png")]).decode()
            out.append(f"<img alt='{html.escape(payload[1])}' src='data:image/png;base64,{data}'>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(
    summary: dict,
    output_dir: Path,
    images: dict[str, Path | None] | None = None,
    title: str = "Segmentation evaluation report",
    extra: Sequence[tuple[str, str, bytes]] = (),
) -> dict[str, Path]:
    """Writes ``report.md``, ``report.html`` and their PNGs into ``output_dir``.

    Args:
        summary: the dictionary of :func:`segshare.evaluation.summary.build_summary`.
        output_dir: destination folder.
        images: ``{case_id: image path or None}``; when given, an overlay montage of the worst,
            median and best case is added.
        title: report title.
        extra: ``(heading, name, png)`` pictures added after the overview (e.g. the Dice per
            fold of a cross-validation), written as ``<name>.png``.

    Returns:
        ``{"report.md": path, "report.html": path, ...png paths}``.
    """
    output_dir = Path(output_dir)
    cases, names = summary["metric_per_case"], summary["labels"]
    pictures: dict[str, bytes] = {}
    if cases:
        values = {
            m: {f"{k} ({n})": [c["metrics"][k][m] for c in cases] for k, n in names.items()}
            for m in ("Dice", "HD95")
        }
        pictures["boxplots"] = box_plots(values)
    if images and cases:
        ranked = sorted((c for c in cases if not math.isnan(case_score(c))), key=case_score)
        picks = [("worst", ranked[0]), ("median", ranked[len(ranked) // 2]), ("best", ranked[-1])]
        picks = picks if len(ranked) >= 3 else [("worst", c) for c in ranked[:1]]
        rows = [
            (
                f"{tag}: {c['case_id']} (Dice {_fmt(case_score(c))})",
                images.get(c["case_id"]),
                Path(c["reference_file"]),
                None if c.get("prediction_missing") else Path(c["prediction_file"]),
            )
            for tag, c in picks
        ]
        if rows:
            pictures["overlays"] = overlay_montage(
                rows, {int(k): f"{k} ({n})" for k, n in names.items()}
            )
    blocks = build_blocks(summary, pictures, title)
    at = len(_overview_blocks(summary, title))
    for heading, name, png in extra:
        pictures[name] = png
        blocks[at:at] = [("h2", heading), ("image", (f"{name}.png", heading))]
        at += 2
    written = {}
    for name, png in pictures.items():
        written[f"{name}.png"] = output_dir / f"{name}.png"
        write_text_atomic(png, written[f"{name}.png"])
    written["report.md"] = output_dir / "report.md"
    write_text_atomic(render_markdown(blocks), written["report.md"])
    written["report.html"] = output_dir / "report.html"
    write_text_atomic(render_html(blocks, pictures), written["report.html"])
    return written
