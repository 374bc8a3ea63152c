"""A page of headings, paragraphs, tables and figures, rendered as self-contained HTML or as Markdown.

The report builds a `Page`; nothing here knows about runs or attacks.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Figure:
    filename: str  # written next to report.md
    png: bytes
    caption: str


@dataclass
class Page:
    title: str
    blocks: list[tuple[str, object]] = field(default_factory=list)  # (kind, content): h2 h3 p pre table figure

    def add(self, kind: str, content: object) -> None:
        self.blocks.append((kind, content))


CSS = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; color: #111; background: #fff; }
h1 { font-size: 1.6rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #999; } h3 { margin-top: 1.4rem; }
table { border-collapse: collapse; margin: 0.6rem 0 1.2rem; font-size: 0.9rem; }
th, td { border: 1px solid #888; padding: 0.25rem 0.55rem; text-align: right; }
th:first-child, td:first-child { text-align: left; white-space: nowrap; }
th { background: #e8e8e8; }
p.caption { font-size: 0.85rem; color: #333; margin: 0.8rem 0 0.2rem; }
figure { margin: 1rem 0 1.6rem; } figure img { max-width: 100%; border: 1px solid #ccc; }
figcaption { font-size: 0.85rem; color: #333; }
pre { background: #f4f4f4; padding: 0.6rem; overflow-x: auto; font-size: 0.8rem; }
"""


def render_html(page: Page) -> str:
    e = html.escape
    out = [f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{e(page.title)}</title>", f"<style>{CSS}</style></head><body>", f"<h1>{e(page.title)}</h1>"]
    for kind, content in page.blocks:
        if kind in ("h2", "h3", "p"):
            out.append(f"<{kind}>{e(str(content))}</{kind}>")
        elif kind == "pre":
            out.append(f"<pre>{e(str(content))}</pre>")
        elif kind == "table":
            t: Table = content  # type: ignore[assignment]
            rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in t.rows)
            head = "".join(f"<th>{e(h)}</th>" for h in t.header)
            out.append(f"<p class='caption'>{e(t.caption)}</p><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "figure":
            f: Figure = content  # type: ignore[assignment]
            data = base64.b64encode(f.png).decode()
            out.append(f"<figure><img src='data:image/png;base64,{data}' alt='{e(f.caption)}'><figcaption>{e(f.caption)}</figcaption></figure>")
    out.append("</body></html>\n")
    return "\n".join(out)


def render_markdown(page: Page) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    out = [f"# {page.title}", ""]
    for kind, content in page.blocks:
        if kind == "h2":
            out += [f"## {content}", ""]
        elif kind == "h3":
            out += [f"### {content}", ""]
        elif kind == "p":
            out += [str(content), ""]
        elif kind == "pre":
            out += ["```", str(content).rstrip("\n"), "```", ""]
        elif kind == "table":
            t: Table = content  # type: ignore[assignment]
            if t.caption:
                out += [f"*{cell(t.caption)}*", ""]
            out.append("| " + " | ".join(cell(h) for h in t.header) + " |")
            out.append("| " + " | ".join("---" for _ in t.header) + " |")
            out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in t.rows]
            out.append("")
        elif kind == "figure":
            f: Figure = content  # type: ignore[assignment]
            out += [f"![{cell(f.caption)}]({f.filename})", "", f"*{f.caption}*", ""]
    return "\n".join(out)
