"""Figures and reports, one way for curation, evaluation and the demo: PNG bytes of a matplotlib
figure or a PIL image (no version stamp, so the same run gives the same bytes), and a report of
titled sections written as report.json, report.md with its PNGs beside it, and a self-contained
report.html (the PNGs inlined as base64; nothing to fetch)."""

from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from dinoscale.utils.io import write_bytes, write_json, write_text

REPORT_FILES = {"json": "report.json", "markdown": "report.md", "html": "report.html"}


def figure_png(figure: Figure, dpi: int = 90, tight: bool = False) -> bytes:
    """A matplotlib figure (made with `Figure(...)`, not pyplot) as PNG bytes."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight" if tight else None,
                   metadata={"Software": None})
    return buffer.getvalue()


def image_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Section:
    """A report section: a title, a paragraph, an optional table (header row first) and PNG images
    (name -> bytes; the name is the image's caption)."""

    title: str
    text: str = ""
    table: list[list[str]] | None = None
    images: dict[str, bytes] = field(default_factory=dict)
    preformatted: str = ""


def write_report(out_dir: str | Path, title: str, sections: Sequence[Section], results: Any) -> dict[str, Path]:
    """Write report.json (`results`), report.md with its PNGs, and report.html; returns their paths."""
    out_dir = Path(out_dir)
    image_files: dict[tuple[int, str], str] = {}
    for s, section in enumerate(sections):
        for name, png in section.images.items():
            filename = f"{_slug(section.title)}_{_slug(name)}.png"
            write_bytes(out_dir / filename, png)
            image_files[(s, name)] = filename
    paths = {kind: out_dir / name for kind, name in REPORT_FILES.items()}
    write_json(paths["json"], results)
    write_text(paths["markdown"], _markdown(title, sections, image_files))
    write_text(paths["html"], _html(title, sections))
    return paths


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "figure"


def _markdown(title: str, sections: Sequence[Section], image_files: dict[tuple[int, str], str]) -> str:
    lines = [f"# {title}", ""]
    for s, section in enumerate(sections):
        lines += [f"## {section.title}", ""]
        if section.text:
            lines += [section.text, ""]
        if section.preformatted:
            lines += ["```", section.preformatted, "```", ""]
        if section.table:
            header, *body = section.table
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(row) + " |" for row in body]
            lines.append("")
        for name in section.images:
            lines += [f"![{name}]({image_files[(s, name)]})", ""]
    return "\n".join(lines)


def _html(title: str, sections: Sequence[Section]) -> str:
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "img{max-width:100%}figure{margin:0.5em 0}figcaption{font-size:0.8em}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.text:
            parts.append(f"<p>{html.escape(section.text)}</p>")
        if section.preformatted:
            parts.append(f"<pre>{html.escape(section.preformatted)}</pre>")
        if section.table:
            header, *body = section.table
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body]
            parts.append("</table>")
        for name, png in section.images.items():
            data = base64.b64encode(png).decode()
            parts.append(f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(name)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)
