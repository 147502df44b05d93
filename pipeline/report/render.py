"""Writing the attribution report: report.html (one self-contained file: images inline as
base64 PNG data URIs, inline CSS, no scripts, no links; every text escaped) and report.png
(`pipeline.report.png`), from `Section`s (`pipeline.report.sections`) or from query results
(`write_query_report`, the `ctrak query --report` glue; hit images via
`pipeline.images.hit_images`)."""

from __future__ import annotations

import html
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.report.png import report_png
from pipeline.report.sections import (
    QUERY,
    THUMB,
    MethodHits,
    ReportHit,
    Section,
    data_uri,
    display_labels,
    precision_at_k,
    relevance,
    same_value,
)

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig
    from pipeline.query import QueryResult


# ---- HTML ------------------------------------------------------------------------------------
CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;
 background:#f4f5f7;color:#1f2328}
header{background:#1f2937;color:#fff;padding:18px 28px}
header h1{margin:0;font-size:22px}header p{margin:4px 0 0;color:#cbd5e1}
.legend{padding:10px 28px;font-size:13px;background:#fff;border-bottom:1px solid #e5e7eb;
 color:#4b5563}
.legend b{color:#1f2328}
.ok-sw,.no-sw{display:inline-block;width:14px;height:14px;border-radius:3px;
 vertical-align:-2px;margin:0 4px}
.ok-sw{border:3px solid #2ea043}.no-sw{border:3px solid #bebebe}
main{padding:4px 20px 20px}
section.query{background:#fff;border:1px solid #e5e7eb;border-radius:10px;margin:18px 0;
 padding:14px;display:flex;gap:20px;align-items:flex-start}
.qside{flex:0 0 162px}.qside h2{font-size:13px;margin:0 0 6px;color:#4b5563}
.qside img,.qside .empty{width:160px;height:160px;border:1px solid #d0d7de;border-radius:6px}
.qside dl{margin:10px 0 0}.qside dt{font-size:11px;text-transform:uppercase;color:#6b7280;
 letter-spacing:.04em;margin-top:6px}.qside dd{margin:0;font-weight:600;word-break:break-word}
.note{color:#6b7280;font-size:12px;margin-top:8px}
.methods{flex:1;min-width:0}
h3{margin:4px 0 8px;font-size:15px}h3 .p{font-weight:400;color:#4b5563;margin-left:8px}
ol.grid{list-style:none;padding:0;margin:0 0 14px;display:flex;flex-wrap:wrap;gap:8px}
.hit{width:104px;font-size:12px}
.thumb{position:relative;width:96px;height:96px;border:4px solid #e5e7eb;border-radius:6px;
 background:#fff;display:flex;align-items:center;justify-content:center;overflow:hidden}
.thumb img{max-width:96px;max-height:96px;width:96px;height:96px;object-fit:contain}
img.px{image-rendering:pixelated;image-rendering:crisp-edges}
.hit.ok .thumb{border-color:#2ea043}.hit.no .thumb{border-color:#bebebe}
.hit.no .thumb img{opacity:.75}
.rank{position:absolute;left:0;top:0;background:rgba(31,41,55,.85);color:#fff;font-size:11px;
 padding:1px 5px;border-bottom-right-radius:5px}
.mark{position:absolute;right:2px;top:2px;width:18px;height:18px;border-radius:50%;color:#fff;
 font-size:12px;line-height:18px;text-align:center;font-weight:700}
.ok .mark{background:#2ea043}
.score{font-variant-numeric:tabular-nums;font-weight:600;margin-top:3px}
.cap{color:#374151;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.key{color:#6b7280;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:11px}
.chips{display:flex;flex-wrap:wrap;gap:2px;margin-top:2px}
.chip{background:#eef2f7;border-radius:8px;padding:0 5px;font-size:10.5px;color:#374151}
.chip.match{background:#dcfce7;color:#166534;font-weight:600}
.empty{display:flex;align-items:center;justify-content:center;color:#9ca3af;font-size:11px;
 background:#f9fafb;text-align:center}
"""


def _img(image: np.ndarray | None, side: int, alt: str) -> str:
    if image is None:
        return f'<div class="empty" title="{html.escape(alt)}">no image</div>'
    crisp = ' class="px"' if max(image.shape[:2]) < side else ""
    return f'<img{crisp} src="{data_uri(image)}" alt="{html.escape(alt)}">'


def _hit_html(hit: ReportHit, concept: str | None) -> str:
    e = html.escape
    state = {True: " ok", False: " no", None: ""}[hit.relevant]
    mark = {True: '<span class="mark">✓</span>'}
    chips = "".join(
        f'<span class="chip{" match" if concept and same_value(v, concept) else ""}" '
        f'title="{e(k)}">{e(f"{k}: {v}" if v else k)}</span>'
        for k, v in display_labels(hit.labels).items()
    )
    where = f"shard {hit.shard}, key {hit.key}" if hit.shard else f"key {hit.key}"
    return (
        f'<li class="hit{state}"><div class="thumb">{_img(hit.image, THUMB, hit.caption)}'
        f'<span class="rank">#{hit.rank}</span>{mark.get(hit.relevant, "")}</div>'
        f'<div class="score" title="influence score">{hit.score:.4g}</div>'
        f'<div class="cap" title="{e(hit.caption)}">{e(hit.caption) or "&nbsp;"}</div>'
        f'<div class="key" title="{e(where)}">{e(hit.key)}</div>'
        f'<div class="chips">{chips}</div></li>'
    )


def _method_html(result: MethodHits, concept: str | None) -> str:
    marks = [h.relevant for h in result.hits]
    summary = f"top {len(result.hits)}"
    if result.precision is not None:
        summary = f"P@{len(result.hits)} = {result.precision:.2f}"
    if any(m is not None for m in marks):
        summary += f" · {sum(m is True for m in marks)} of {len(marks)} relevant"
    hits = "".join(_hit_html(h, concept) for h in result.hits)
    return (
        f'<h3>{html.escape(result.method)}<span class="p">{html.escape(summary)}</span></h3>'
        f'<ol class="grid">{hits or "<li>no hits</li>"}</ol>'
    )


def _section_html(section: Section, number: int) -> str:
    e = html.escape
    facts = [("prompt", f"“{section.prompt}”")]
    facts.append(("concept", section.concept or "(the whole prompt)"))
    if section.negative is not None:
        facts.append(("negative c−", f"“{section.negative}”" if section.negative else "(none)"))
    rows = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in facts)
    note = f'<div class="note">{e(section.note)}</div>' if section.note else ""
    image = _img(section.image, QUERY, "query image")
    if section.image is None:
        image = '<div class="empty">no query image<br>(global scope)</div>'
    methods = "".join(_method_html(m, section.concept) for m in section.methods)
    return (
        f'<section class="query"><div class="qside"><h2>Query {number}</h2>{image}'
        f"<dl>{rows}</dl>{note}</div>"
        f'<div class="methods">{methods}</div></section>'
    )


def report_html(sections: Sequence[Section], title: str, subtitle: str = "") -> str:
    """The whole report as one HTML document (no external resources, no scripts)."""
    e = html.escape
    legend = (
        '<div class="legend">Each row: a method\'s top training images for the query, best '
        "first; <b>score</b> = influence on the concept (higher = more). "
        '<span class="ok-sw"></span><b>relevant</b>: a label of the image equals the target '
        'concept · <span class="no-sw"></span><b>not relevant</b>: that label has another value '
        "· no frame: no label to judge by.</div>"
    )
    body = "".join(_section_html(s, i) for i, s in enumerate(sections, 1))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{e(title)}</h1>{f'<p>{e(subtitle)}</p>' if subtitle else ''}</header>"
        f"{legend}<main>{body or '<p>no queries</p>'}</main></body></html>\n"
    )


# ---- writing ---------------------------------------------------------------------------------
def _write(path: Path, data: bytes) -> None:
    """Temporary sibling, then rename: a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def render_report(
    sections: Sequence[Section],
    path_html: str | Path,
    path_png: str | Path | None = None,
    title: str = "Concept-TRAK attribution report",
    subtitle: str = "",
) -> None:
    """Write the self-contained HTML report at `path_html` and, when given, a PNG of the
    same grids at `path_png`."""
    _write(Path(path_html), report_html(sections, title, subtitle).encode("utf-8"))
    if path_png is not None:
        buffer = io.BytesIO()
        report_png(sections, title, subtitle).save(buffer, format="PNG", optimize=True)
        _write(Path(path_png), buffer.getvalue())


# ---- from query results (`ctrak query --report`) ----------------------------------------------
def query_sections(
    results: Mapping[str, Sequence[QueryResult]], images: Mapping[tuple[str, str], np.ndarray]
) -> list[Section]:
    """{method: [QueryResult per query]} (the same queries, in the same order, for every
    method) and {(shard, key): image} -> one Section per query, relevance from metadata."""
    from ctrak.attribution import resolve_negative
    from ctrak.errors import CtrakError

    by_query = list(zip(*results.values(), strict=True))
    sections = []
    for per_method in by_query:
        spec = per_method[0].query
        try:
            negative = resolve_negative(spec.prompt, spec.concept, spec.negative)
        except CtrakError:
            negative = spec.negative
        methods = []
        for method, result in zip(results, per_method, strict=True):
            marks = relevance(spec.concept, [h.metadata for h in result.hits])
            hits = [
                ReportHit(
                    rank=h.rank,
                    key=h.key,
                    score=h.score,
                    caption=h.caption,
                    labels=h.metadata,
                    image=images.get((h.shard, h.key)),
                    relevant=mark,
                    shard=h.shard,
                )
                for h, mark in zip(result.hits, marks, strict=True)
            ]
            methods.append(MethodHits(method, hits, precision_at_k(marks)))
        note = f"image: {spec.image_path}" if spec.image_path else ""
        sections.append(
            Section(spec.prompt, methods, spec.concept, negative, spec.image, note=note)
        )
    return sections


def write_query_report(
    path: str | Path, config: PipelineConfig, results: Sequence[QueryResult]
) -> tuple[Path, Path]:
    """`ctrak query --report PATH`: the report of `results` (one method, the store's) at PATH
    and its PNG next to it; returns both paths."""
    from pipeline.images import hit_images

    storage = config.storage.resolved()
    images = hit_images(config.job.store, results, storage, config.job.data)
    method = config.attribution.gradient.method
    sections = query_sections({method: results}, images)
    html_path = Path(path)
    png_path = html_path.with_suffix(".png")
    if png_path == html_path:
        png_path = html_path.with_name(html_path.name + ".png")
    top = len(results[0].hits) if results else config.job.top_k
    subtitle = f"store {config.job.store} · method {method} · top {top}"
    render_report(sections, html_path, png_path, subtitle=subtitle)
    print(f"report: {html_path} (grid: {png_path})")
    return html_path, png_path
