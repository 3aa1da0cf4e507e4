"""The report as a document: a list of blocks (headings, paragraphs, tables, images, notes) that the
sections fill in, rendered twice and written into the build directory:

- ``report.html``: one self-contained page (CSS inline, images embedded as base64 PNG, no external
  references), so it opens offline and can be mailed or attached to a CI run;
- ``report.md``: the same content in Markdown, with the images as PNG files in ``report/``.

Text in blocks uses a small Markdown subset (backquoted code, ``**bold**``); numbers are written with
the ``fmt_*`` helpers so every section formats them alike.
"""

from __future__ import annotations

import base64
import html
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPORT_HTML = "report.html"
REPORT_MD = "report.md"
ASSETS_DIR = "report"


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    right: set[int] = field(default_factory=set)  # right-aligned (numeric) columns
    classes: list[list[str]] | None = None  # per-cell CSS class (HTML only), e.g. "ok" / "bad"


@dataclass
class Image:
    name: str
    title: str
    png: bytes
    caption: str


@dataclass
class Doc:
    blocks: list[tuple[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def h2(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, table: Table) -> None:
        self.blocks.append(("table", table))

    def image(self, image: Image) -> None:
        self.blocks.append(("image", image))

    def skipped(self, what: str, why: str) -> None:
        """A plot or section that could not be made: said where it would be and listed at the end."""
        self.blocks.append(("note", f"{what}: skipped, {why}"))
        self.notes.append(f"{what}: {why}")


# --- numbers as text ----------------------------------------------------------------------------


def fmt_int(v: Any) -> str:
    return "-" if v is None else f"{int(v):,}"


def fmt_metric(v: Any) -> str:
    """Accuracy and the other quality figures (AUC, R², errors): four decimals."""
    return "-" if v is None else f"{float(v):.4f}"


def fmt_pct(v: Any) -> str:
    return "-" if v is None else f"{100 * float(v):.1f}%"


def fmt_bytes(v: Any) -> str:
    if v is None:
        return "-"
    v = float(v)
    if v < 1024:
        return f"{int(v)} B"
    for unit in ("KiB", "MiB", "GiB"):
        v /= 1024
        if v < 1024 or unit == "GiB":
            return f"{v:.1f} {unit}"
    return "-"


def fmt_ms(v: Any) -> str:
    if v is None:
        return "-"
    v = float(v)
    return f"{v * 1000:.2f} us" if v < 0.1 else f"{v:.3f} ms"


# --- rendering ----------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:24px auto;max-width:1200px;
padding:0 16px;color:#1b1b1b;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:4px 8px}
th{background:#f2f4f7;text-align:left;vertical-align:bottom}td.r{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafbfc}td.ok{color:#137333;font-weight:600}td.bad{color:#b3261e;font-weight:700}
td.unknown{color:#777}figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #e3e3e3}
figcaption{font-size:.88em;color:#444;max-width:900px}.note{color:#8a5300;background:#fff7e6;border-left:4px solid #f0a020;
padding:4px 10px}code{background:#f2f4f7;padding:0 3px;border-radius:3px}.wrap{overflow-x:auto}
"""


def _inline_html(text: str) -> str:
    """The small Markdown subset the report uses (`code`, **bold**) as HTML, escaped."""
    out, parts = [], text.split("`")
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"<code>{html.escape(part)}</code>")
        else:
            bold = html.escape(part).split("**")
            out.append("".join(f"<strong>{b}</strong>" if j % 2 else b for j, b in enumerate(bold)))
    return "".join(out)


def _render_html(doc: Doc, title: str) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for kind, block in doc.blocks:
        if kind == "h2":
            body.append(f"<h2>{html.escape(block)}</h2>")
        elif kind == "p":
            body.append(f"<p>{_inline_html(block)}</p>")
        elif kind == "note":
            body.append(f'<p class="note">{_inline_html(block)}</p>')
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block.headers)
            rows = []
            for r, row in enumerate(block.rows):
                cells = []
                for c, cell in enumerate(row):
                    cls = [("r" if c in block.right else "")] + ([block.classes[r][c]] if block.classes else [])
                    cls_attr = " ".join(x for x in cls if x)
                    attr = f' class="{cls_attr}"' if cls_attr else ""
                    cells.append(f"<td{attr}>{_inline_html(cell)}</td>")
                rows.append("<tr>" + "".join(cells) + "</tr>")
            body.append(f'<div class="wrap"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')
        elif kind == "image":
            data = base64.b64encode(block.png).decode("ascii")
            body.append(
                f'<figure id="{block.name}"><img src="data:image/png;base64,{data}" alt="{html.escape(block.title)}" '
                f'title="{html.escape(block.title)}"><figcaption>{_inline_html(block.caption)}</figcaption></figure>'
            )
    if doc.notes:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_inline_html(n)}</li>" for n in doc.notes) + "</ul>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(body) + "\n</body></html>\n"
    )


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _render_markdown(doc: Doc, title: str) -> str:
    out = [f"# {title}", ""]
    for kind, block in doc.blocks:
        if kind == "h2":
            out += [f"## {block}", ""]
        elif kind == "p":
            out += [block, ""]
        elif kind == "note":
            out += [f"> **Note**: {block}", ""]
        elif kind == "table":
            out.append("| " + " | ".join(_md_cell(h) for h in block.headers) + " |")
            out.append("|" + "|".join("---:" if i in block.right else "---" for i in range(len(block.headers))) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            out.append("")
        elif kind == "image":
            out += [f"![{block.title}]({ASSETS_DIR}/{block.name}.png)", "", f"*{block.caption}*", ""]
    if doc.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in doc.notes] + [""]
    return "\n".join(out)


# --- writing ------------------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_document(doc: Doc, build_dir: Path, title: str, images: tuple[str, ...]) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``report/<name>.png`` for each image of ``doc``.

    ``images``: every image name the sections may write; one not written this time is removed, so a plot
    skipped this time does not leave last time's picture behind.
    Returns ``{"html": ..., "markdown": ..., "assets": ..., <image name>: png path, ...}``.
    """
    assets = build_dir / ASSETS_DIR
    assets.mkdir(exist_ok=True)
    out: dict[str, Path] = {}
    written = set()
    for kind, block in doc.blocks:
        if kind == "image":
            path = assets / f"{block.name}.png"
            _atomic_write(path, block.png)
            out[block.name] = path
            written.add(block.name)
    for name in images:
        if name not in written:
            (assets / f"{name}.png").unlink(missing_ok=True)
    md, page = build_dir / REPORT_MD, build_dir / REPORT_HTML
    _atomic_write(md, _render_markdown(doc, title).encode("utf-8"))
    _atomic_write(page, _render_html(doc, title).encode("utf-8"))
    return {"html": page, "markdown": md, "assets": assets, **out}
