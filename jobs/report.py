"""A self-contained HTML report: tables plus matplotlib (Agg) figures embedded as base64 PNGs.

No external assets, scripts or fonts: the file can be mailed or archived as is.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from typing import Any

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
td,th{border:1px solid #ddd;padding:.25rem .6rem;text-align:right}th{background:#f5f5f5}
td:first-child,th:first-child{text-align:left}.muted{color:#888}img{max-width:100%}
.figs{display:flex;flex-wrap:wrap;gap:1rem}.figs figure{margin:0;flex:1 1 460px}
"""


def figure_png(fig: Any, *, dpi: int = 100) -> str:
    """A matplotlib figure -> ``data:image/png;base64,...`` (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return '<span class="muted">insufficient data</span>'
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figures(items: Iterable[tuple[str, str]]) -> str:
    """(caption, data URI) pairs side by side."""
    parts = [
        f'<figure><img alt="{html.escape(cap)}" src="{uri}"><figcaption>{html.escape(cap)}</figcaption></figure>'
        for cap, uri in items
    ]
    return f'<div class="figs">{"".join(parts)}</div>'


def paragraph(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def page(title: str, sections: Iterable[tuple[str, str]]) -> str:
    """A complete HTML document; ``sections`` are (heading, trusted inner HTML) pairs."""
    body = "".join(f"<h2>{html.escape(h)}</h2>{inner}" for h, inner in sections)
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )
