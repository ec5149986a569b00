"""A tiny document model for the report: blocks rendered as Markdown or as one HTML file.

Inline text may use `code` and **bold**; everything else is literal. Markdown tables are
padded so that report.md also reads well in a terminal.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Code:
    text: str
    lang: str = "bash"


@dataclass(frozen=True)
class Image:
    src: str  # file name next to the report
    alt: str


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]
    align: str = ""  # one of l/r per column


Block = Heading | Para | Code | Image | Table


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _width(text: str) -> int:
    # Emoji count double in a terminal; close enough for alignment.
    return len(text) + sum(1 for ch in text if ord(ch) > 0x2500)


def _md_table(t: Table) -> str:
    cols = len(t.header)
    rows = [[_cell(c) for c in t.header]] + [[_cell(c) for c in r] + [""] * (cols - len(r))
                                            for r in t.rows]
    widths = [max(3, *(_width(r[i]) for r in rows)) for i in range(cols)]
    align = (t.align + "l" * cols)[:cols]

    def fmt(row: list[str]) -> str:
        cells = []
        for i, c in enumerate(row):
            pad = " " * (widths[i] - _width(c))
            cells.append(pad + c if align[i] == "r" else c + pad)
        return "| " + " | ".join(cells) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":" if a == "r" else "-" * (w + 2))
                          for w, a in zip(widths, align, strict=True)) + "|"
    return "\n".join([fmt(rows[0]), rule, *(fmt(r) for r in rows[1:])])


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + b.text)
        elif isinstance(b, Para):
            out.append(b.text)
        elif isinstance(b, Code):
            out.append(f"```{b.lang}\n{b.text}\n```")
        elif isinstance(b, Image):
            out.append(f"![{b.alt}]({b.src})")
        elif isinstance(b, Table):
            out.append(_md_table(b))
    return "\n\n".join(out) + "\n"


_INLINE = re.compile(r"`([^`]+)`|\*\*(.+?)\*\*|\*(.+?)\*")


def _inline(text: str) -> str:
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[pos:m.start()]))
        if m.group(1) is not None:
            out.append(f"<code>{html.escape(m.group(1))}</code>")
        elif m.group(2) is not None:
            out.append(f"<strong>{html.escape(m.group(2))}</strong>")
        else:
            out.append(f"<em>{html.escape(m.group(3))}</em>")
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


STYLE = """
body { font: 15px/1.45 -apple-system, BlinkMacSystemFont, "Segoe UI", Helvetica, Arial,
       sans-serif; max-width: 1240px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.35em; border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { font-size: 1.15em; margin-top: 1.6em; } h3 { font-size: 1em; }
table { border-collapse: collapse; margin: .6em 0; }
th, td { border: 1px solid #ddd; padding: .3em .6em; vertical-align: top; }
th { background: #f4f4f4; } td.r, th.r { text-align: right; }
code, pre { font-family: SFMono-Regular, Menlo, Consolas, monospace; font-size: .9em; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; border-radius: 4px; }
img { max-width: 100%; border: 1px solid #eee; }
"""


def to_html(blocks: list[Block], title: str, png: bytes | None) -> str:
    """One self-contained page; the picture is embedded as base64."""
    body = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Code):
            body.append(f"<pre><code>{html.escape(b.text)}</code></pre>")
        elif isinstance(b, Image):
            if png is not None:
                src = "data:image/png;base64," + base64.b64encode(png).decode()
                body.append(f'<p><img src="{src}" alt="{html.escape(b.alt)}"></p>')
        elif isinstance(b, Table):
            align = (b.align + "l" * len(b.header))[:len(b.header)]
            head = "".join(f'<th class="{a}">{_inline(h)}</th>'
                           for h, a in zip(b.header, align, strict=True))
            rows = "".join(
                "<tr>" + "".join(f'<td class="{a}">{_inline(c)}</td>'
                                 for c, a in zip(r, align, strict=False)) + "</tr>"
                for r in b.rows)
            thead = f"<thead><tr>{head}</tr></thead>" if any(b.header) else ""
            body.append(f"<table>{thead}<tbody>{rows}</tbody></table>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
