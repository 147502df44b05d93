"""The attribution report: per query, each method's top-k training images, as HTML and PNG.

    report.html  one self-contained file: images inline as base64 PNG data URIs, inline CSS,
                 no scripts, no links; every text escaped
    report.png   the same grids drawn with PIL: query image on the left, one row per method

A `Section` is one query (prompt c, target concept, negative c-, query image) with one
`MethodHits` per method: its hits in rank order with score I(z, q) = x_q^T phi_z, caption,
labels and image. A hit is marked relevant (green frame, check) when one of its labels equals
the target concept, not relevant (grey frame, faded) when it has that label with another value,
and left unmarked when nothing tells (`relevance`). Rendering is pure; `write_query_report`
is the `ctrak query --report` glue (hit images via `pipeline.images.hit_images`).
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig
    from pipeline.query import QueryResult

THUMB = 96  # px, display size of a hit image (HTML and PNG)
QUERY = 160  # px, display size of the query image
CELL = THUMB + 22  # px, PNG column of one hit
MAX_EMBED = 2 * THUMB  # larger images are shrunk to this before embedding
GREEN, GREY = (46, 160, 67), (190, 190, 190)
HIDDEN_LABELS = {"key", "caption", "url", "status", "error_message"}


@dataclass(frozen=True)
class ReportHit:
    """One retrieved training image; `image` (H, W, 3) uint8, `relevant` True/False/None."""

    rank: int
    key: str
    score: float
    caption: str = ""
    labels: Mapping[str, object] | None = None
    image: np.ndarray | None = field(default=None, repr=False, compare=False)
    relevant: bool | None = None
    shard: str = ""


@dataclass(frozen=True)
class MethodHits:
    """One method's top-k for a query; `precision` = P@k, shown when given."""

    method: str
    hits: Sequence[ReportHit]
    precision: float | None = None


@dataclass(frozen=True)
class Section:
    """One query: prompt, concept, negative, query image (H, W, 3) uint8, methods."""

    prompt: str
    methods: Sequence[MethodHits]
    concept: str | None = None
    negative: str | None = None
    image: np.ndarray | None = field(default=None, repr=False, compare=False)
    note: str = ""


# ---- labels and relevance --------------------------------------------------------------------
def _same(value: object, concept: str) -> bool:
    return isinstance(value, str) and value.strip().lower() == concept.strip().lower()


def relevance(concept: str | None, metadata: Sequence[Mapping | None]) -> list[bool | None]:
    """Per hit: True when a label equals the concept (e.g. {"shape": "triangle"} for
    "triangle"); False when the hit has a label that equals the concept in another hit but not
    in this one (the concept's attribute, another value); None otherwise."""
    if not concept:
        return [None] * len(metadata)
    attributes = {k for m in metadata if m for k, v in m.items() if _same(v, concept)}
    marks: list[bool | None] = []
    for m in metadata:
        if m and any(_same(v, concept) for v in m.values()):
            marks.append(True)
        elif m and attributes & set(m):
            marks.append(False)
        else:
            marks.append(None)
    return marks


def precision_at_k(marks: Sequence[bool | None]) -> float | None:
    """Fraction of relevant hits; None unless every hit is marked True or False."""
    if not marks or any(m is None for m in marks):
        return None
    return sum(bool(m) for m in marks) / len(marks)


def display_labels(metadata: Mapping | None, limit: int = 4) -> dict[str, str]:
    """The short labels worth a chip, {name: text}: str/int values up to 32 characters and
    true flags (text ""); no floats, no key/caption/url; at most `limit`."""
    out: dict[str, str] = {}
    for k, v in (metadata or {}).items():
        if k in HIDDEN_LABELS or isinstance(v, float) or not isinstance(v, str | int | bool):
            continue
        if isinstance(v, bool) and not v:
            continue
        text = "" if isinstance(v, bool) else str(v)
        if len(text) <= 32 and len(out) < limit:
            out[str(k)] = text
    return out


# ---- images ----------------------------------------------------------------------------------
def _picture(image: np.ndarray) -> Image.Image:
    """(H, W, 3|4) or (H, W) uint8 -> an RGB PIL image; ValueError naming any other shape."""
    array = np.asarray(image)
    channels = array.shape[2] if array.ndim == 3 else 1
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or channels not in (1, 3, 4):
        raise ValueError(f"report images are (H, W, 3) uint8, got {array.shape} {array.dtype}")
    if channels == 1:
        array = np.repeat(array.reshape(*array.shape[:2], 1), 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(array[..., :3]))


def _fit(image: np.ndarray, side: int) -> Image.Image:
    """(H, W, 3) uint8 -> a PIL image fitting a side x side box: nearest-neighbour when
    enlarging (pixels stay crisp), Lanczos when shrinking."""
    picture = _picture(image)
    scale = side / max(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    return picture.resize(size, Image.NEAREST if scale >= 1 else Image.LANCZOS)


def _data_uri(image: np.ndarray) -> str:
    """(H, W, 3) uint8 -> data:image/png;base64,..., shrunk to MAX_EMBED px when larger."""
    picture = _picture(image)
    if max(picture.size) > MAX_EMBED:
        picture = _fit(image, MAX_EMBED)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


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
    return f'<img{crisp} src="{_data_uri(image)}" alt="{html.escape(alt)}">'


def _hit_html(hit: ReportHit, concept: str | None) -> str:
    e = html.escape
    state = {True: " ok", False: " no", None: ""}[hit.relevant]
    mark = {True: '<span class="mark">✓</span>'}
    chips = "".join(
        f'<span class="chip{" match" if concept and _same(v, concept) else ""}" '
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


# ---- PNG -------------------------------------------------------------------------------------
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _clip(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text` cut with "..." to fit `width` px."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, lines: int) -> list[str]:
    """Greedy word wrap into at most `lines` lines of `width` px (the last one clipped)."""
    out, line = [], ""
    for word in text.split():
        if line and draw.textlength(f"{line} {word}", font=font) > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    out.append(line)
    if len(out) > lines:
        out = [*out[: lines - 1], " ".join(out[lines - 1 :])]
    return [_clip(draw, text, font, width) for text in out]


def _frame(draw: ImageDraw.ImageDraw, x: int, y: int, side: int, relevant: bool | None) -> None:
    """The relevance frame around a side x side thumbnail at (x, y)."""
    colour, width = {True: (GREEN, 4), False: (GREY, 3), None: ((225, 225, 225), 2)}[relevant]
    draw.rectangle((x - width, y - width, x + side + width - 1, y + side + width - 1), colour)


def _badges(draw: ImageDraw.ImageDraw, x: int, y: int, side: int, hit: ReportHit) -> None:
    """Rank (top left) and, when relevant, a check mark on a green disc (top right)."""
    draw.rectangle((x, y, x + 22, y + 14), (31, 41, 55))
    draw.text((x + 3, y + 1), f"{hit.rank}", (255, 255, 255), font=_font(11))
    if hit.relevant is True:
        cx, cy = x + side - 11, y + 11
        draw.ellipse((cx - 9, cy - 9, cx + 9, cy + 9), GREEN)
        draw.line([(cx - 5, cy), (cx - 1, cy + 4), (cx + 5, cy - 4)], (255, 255, 255), 3)


def _query_column(canvas: Image.Image, x: int, y: int, section: Section) -> None:
    """Query image (QUERY px) at (x, y), then prompt, concept and negative under it."""
    draw, small, normal = ImageDraw.Draw(canvas), _font(11), _font(13)
    if section.image is not None:
        picture = _fit(section.image, QUERY)
        canvas.paste(picture, (x + (QUERY - picture.width) // 2, y))
        draw.rectangle((x - 1, y - 1, x + QUERY, y + QUERY), outline=(208, 215, 222))
    else:
        draw.rectangle((x, y, x + QUERY, y + QUERY), (249, 250, 251), (208, 215, 222))
        tx = x + (QUERY - int(draw.textlength("no query image", font=small))) // 2
        draw.text((tx, y + QUERY // 2 - 8), "no query image", (156, 163, 175), font=small)
    y += QUERY + 8
    lines = _wrap(draw, f"“{section.prompt}”", normal, QUERY + 10, 2)
    lines.append(f"concept: {section.concept or '(whole prompt)'}")
    if section.negative is not None:
        lines.append(f"negative: “{section.negative}”" if section.negative else "negative: -")
    for line in lines:
        draw.text((x, y), _clip(draw, line, normal, QUERY + 10), (31, 35, 40), font=normal)
        y += 17


def _method_row(canvas: Image.Image, x: int, y: int, result: MethodHits, name_w: int) -> None:
    """Method name and P@k at (x, y), then its hits: framed thumbnail, score, labels."""
    draw, small, normal = ImageDraw.Draw(canvas), _font(11), _font(13)
    draw.text((x, y + 30), _clip(draw, result.method, normal, name_w - 10), (0, 0, 0), normal)
    if result.precision is not None:
        text = f"P@{len(result.hits)} = {result.precision:.2f}"
        draw.text((x, y + 50), text, (75, 85, 99), font=small)
    for i, hit in enumerate(result.hits):
        hx, hy = x + name_w + i * CELL, y + 4
        _frame(draw, hx, hy, THUMB, hit.relevant)
        if hit.image is not None:
            picture = _fit(hit.image, THUMB)
            box = Image.new("RGB", (THUMB, THUMB), (255, 255, 255))
            box.paste(picture, ((THUMB - picture.width) // 2, (THUMB - picture.height) // 2))
            if hit.relevant is False:  # fade, as the HTML does
                box = Image.blend(box, Image.new("RGB", box.size, (255, 255, 255)), 0.25)
            canvas.paste(box, (hx, hy))
        else:
            draw.rectangle((hx, hy, hx + THUMB - 1, hy + THUMB - 1), (249, 250, 251))
            draw.text((hx + 24, hy + 40), "no image", (156, 163, 175), font=small)
        _badges(draw, hx, hy, THUMB, hit)
        draw.text((hx, hy + THUMB + 7), f"{hit.score:.4g}", (31, 35, 40), font=normal)
        labels = " · ".join(v or k for k, v in display_labels(hit.labels, limit=2).items())
        text = _clip(draw, labels or hit.caption, small, CELL - 8)
        draw.text((hx, hy + THUMB + 24), text, (75, 85, 99), font=small)


def report_png(sections: Sequence[Section], title: str, subtitle: str = "") -> Image.Image:
    """The report's grids as one RGB image: per section the query column, then per method a
    row of the top-k thumbnails (THUMB px) framed by relevance, with rank, score, labels."""
    left, name_w, pad, row_h, head = QUERY + 30, 130, 20, THUMB + 58, 78
    k = max((len(m.hits) for s in sections for m in s.methods), default=0)
    width = max(pad * 2 + left + name_w + max(k, 1) * CELL, 720)
    heights = [max(len(s.methods) * row_h, QUERY + 110) + 24 for s in sections]
    canvas = Image.new("RGB", (width, head + sum(heights) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    # 1. header: title, subtitle, legend
    draw.rectangle((0, 0, width, 48), (31, 41, 55))
    draw.text((pad, 6), _clip(draw, title, _font(18), width - 2 * pad), (255, 255, 255), _font(18))
    draw.text(
        (pad, 29), _clip(draw, subtitle, _font(12), width - 2 * pad), (203, 213, 225), _font(12)
    )
    _frame(draw, pad + 3, 58, 10, True)
    legend = "relevant: a label equals the target concept"
    draw.text((pad + 20, 56), legend, (55, 65, 81), font=_font(12))
    lx = pad + 36 + int(draw.textlength(legend, font=_font(12)))
    _frame(draw, lx, 58, 10, False)
    text = "not relevant: that label has another value · score: influence, best first"
    draw.text((lx + 17, 56), text, (55, 65, 81), font=_font(12))
    # 2. per section: the query column, then one row per method
    y0 = head
    for section, height in zip(sections, heights, strict=True):
        _query_column(canvas, pad, y0 + 8, section)
        for m, result in enumerate(section.methods):
            _method_row(canvas, pad + left, y0 + 8 + m * row_h, result, name_w)
        draw.line((pad, y0 + height - 6, width - pad, y0 + height - 6), (229, 231, 235), 1)
        y0 += height
    return canvas


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
