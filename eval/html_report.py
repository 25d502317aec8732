"""``report.html``: one self-contained page a person opens to see a bench or demo run.

The results table (the same cells as ``results.md``, :func:`~diffdistill.eval.report.table_parts`),
the labelled sample grid, the FID-vs-steps plot and, when present, the convergence curves —
images embedded as ``data:`` URIs, so the page needs no network and no sibling files and can
be mailed or attached as it is. The layout is one column that fits a phone; tables scroll
sideways rather than shrink.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from pathlib import Path

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;
max-width:1100px;padding:12px;line-height:1.45;color:#1b1b1b}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
.scroll{overflow-x:auto}table{border-collapse:collapse;font-size:.9em}
th,td{border:1px solid #ccc;padding:3px 8px;white-space:nowrap}th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto;border:1px solid #ddd}img.grid{image-rendering:pixelated}
p.note,li{font-size:.9em;color:#444}
"""


def image_html(path, alt: str, pixelated: bool = False) -> str:
    """An ``<img>`` with the PNG embedded (empty string when the file is missing);
    ``pixelated``: scaled without smoothing (sample grids of small images)."""
    path = Path(path)
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    cls = ' class="grid"' if pixelated else ""
    return (f'<img{cls} src="data:image/png;base64,{data}" alt="{html.escape(alt)}" '
            f'title="{html.escape(path.name)}">')


def table_html(head: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 0
               ) -> str:
    """A table; columns from ``numeric_from`` on are right-aligned numbers."""
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = []
    for cells in rows:
        tds = "".join(
            f'<td class="num">{html.escape(c)}</td>' if numeric_from and i >= numeric_from
            else f"<td>{html.escape(c)}</td>" for i, c in enumerate(cells))
        body.append(f"<tr>{tds}</tr>")
    return (f'<div class="scroll"><table><thead><tr>{th}</tr></thead><tbody>'
            f'{"".join(body)}</tbody></table></div>')


def bench_sections(results, folder) -> list[tuple[str, str]]:
    """The bench's part of a page: table, grid, FID-vs-steps plot, convergence curves (the
    images that exist in ``folder``)."""
    from diffdistill.eval.report import table_parts

    folder = Path(folder)
    intro, head, rows, notes = table_parts(results)
    table = (f'<p class="note">{html.escape(intro)}</p>' + table_html(head, rows, 4)
             + "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    sections = [("Results", table)]
    for name, heading, alt in (
            ("grid.png", "Samples (rows: model @ steps; columns: the same seeds and prompts)",
             "sample grid"),
            ("fid_vs_steps.png", "Quality vs sampling steps", "metrics vs steps"),
            ("convergence.png", "Convergence: quick metric vs training step and wall time",
             "convergence curves")):
        img = image_html(folder / name, alt, pixelated=name == "grid.png")
        if img:
            sections.append((heading, img))
    return sections


def write_html(path, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """Write the page atomically: a title, then one ``<h2>`` section per (heading, html)."""
    parts = [f"<h2>{html.escape(h)}</h2>\n{body}" for h, body in sections]
    page = ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>"
            f"<h1>{html.escape(title)}</h1>\n" + "\n".join(parts) + "\n</body></html>\n")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_bench_html(results, folder) -> Path:
    """``report.html`` in a bench's output folder."""
    title = f"diffdistill bench — {results.date[:10]}"
    return write_html(Path(folder) / "report.html", title, bench_sections(results, folder))
