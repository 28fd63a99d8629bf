"""A picture of the cluster network: nodes with their subnets, and the routes between
them, as a standalone SVG file (no scripts, no external resources)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal
from xml.sax.saxutils import escape

EdgeState = Literal["ok", "missing", "wrong", "unknown"]

COLOURS: dict[str, str] = {"ok": "#2e7d32", "missing": "#c62828", "wrong": "#ef6c00",
                           "unknown": "#9e9e9e"}


@dataclass(frozen=True)
class GraphNode:
    name: str
    subnet: str
    address: str
    note: str = ""  # e.g. the L2 segment, or "this node"


@dataclass(frozen=True)
class GraphEdge:
    src: str  # node names
    dst: str
    state: EdgeState
    label: str = ""  # e.g. "via 192.168.77.2"


def render_svg(nodes: Sequence[GraphNode], edges: Sequence[GraphEdge], *, title: str) -> str:
    n = max(len(nodes), 1)
    radius = 120 + 30 * n
    box_w, box_h = 190, 64
    size = 2 * radius + box_w + 80
    cx = cy = size / 2
    pos: dict[str, tuple[float, float]] = {}
    for i, node in enumerate(nodes):
        angle = -math.pi / 2 + 2 * math.pi * i / n
        pos[node.name] = (cx + radius * math.cos(angle), cy + 30 + radius * math.sin(angle))
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{size:.0f}" height="{size + 60:.0f}" '
        f'viewBox="0 0 {size:.0f} {size + 60:.0f}" font-family="sans-serif">',
        '<defs>' + "".join(
            f'<marker id="arrow-{k}" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
            f'markerHeight="7" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" '
            f'fill="{c}"/></marker>' for k, c in COLOURS.items()) + '</defs>',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="20" y="32" font-size="20" font-weight="bold">{escape(title)}</text>',
    ]
    for e in edges:
        if e.src not in pos or e.dst not in pos:
            continue
        (x1, y1), (x2, y2) = pos[e.src], pos[e.dst]
        dx, dy = x2 - x1, y2 - y1
        length = math.hypot(dx, dy) or 1
        # Two routes per pair (one each way): shift each to its own side of the line, and
        # stop at the boxes' edges.
        ox, oy = -dy / length * 8, dx / length * 8
        t = (box_h / 2 + 6) / max(abs(dy) / length * 1, 0.35) / length
        t = min(t, 0.4)
        sx, sy = x1 + dx * t + ox, y1 + dy * t + oy
        ex, ey = x2 - dx * t + ox, y2 - dy * t + oy
        colour = COLOURS[e.state]
        dash = ' stroke-dasharray="6 4"' if e.state != "ok" else ""
        out.append(f'<line x1="{sx:.1f}" y1="{sy:.1f}" x2="{ex:.1f}" y2="{ey:.1f}" '
                   f'stroke="{colour}" stroke-width="2"{dash} '
                   f'marker-end="url(#arrow-{e.state})"><title>{escape(e.src)} → '
                   f'{escape(e.dst)}: {escape(e.label)} ({e.state})</title></line>')
        if e.label:
            # beside its own line, on the outer side of the pair
            lx, ly = sx + (ex - sx) * 0.3 + ox * 1.6, sy + (ey - sy) * 0.3 + oy * 1.6 + 4
            out.append(f'<text x="{lx:.1f}" y="{ly:.1f}" font-size="10" fill="{colour}" '
                       f'text-anchor="middle">{escape(e.label)}</text>')
    for node in nodes:
        x, y = pos[node.name]
        out.append(f'<rect x="{x - box_w / 2:.1f}" y="{y - box_h / 2:.1f}" width="{box_w}" '
                   f'height="{box_h}" rx="10" fill="#e3f2fd" stroke="#1565c0" '
                   f'stroke-width="2"/>')
        lines = [(node.name, 14, "bold"), (f"pods {node.subnet}", 12, "normal"),
                 (f"{node.address}{'  ' + node.note if node.note else ''}", 11, "normal")]
        for j, (text, fsize, weight) in enumerate(lines):
            out.append(f'<text x="{x:.1f}" y="{y - 14 + j * 17:.1f}" font-size="{fsize}" '
                       f'font-weight="{weight}" text-anchor="middle">{escape(text)}</text>')
    ly = size + 20
    for i, (k, c) in enumerate(COLOURS.items()):
        out.append(f'<line x1="{20 + i * 150}" y1="{ly}" x2="{50 + i * 150}" y2="{ly}" '
                   f'stroke="{c}" stroke-width="2"/><text x="{56 + i * 150}" y="{ly + 4}" '
                   f'font-size="12">route {k}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
