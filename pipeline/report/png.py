"""report.png: the report's grids drawn with PIL - query image on the left, one row per
method, each hit framed green (relevant) or grey (not), with its rank and score."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from pipeline.report.sections import (
    CELL,
    GREEN,
    GREY,
    QUERY,
    THUMB,
    MethodHits,
    ReportHit,
    Section,
    display_labels,
    fit_image,
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
        picture = fit_image(section.image, QUERY)
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
            picture = fit_image(hit.image, THUMB)
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
