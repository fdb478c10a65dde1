"""Server-side SVG for ``mlflowctl ui``: the pipeline graph, drift over time, error histograms.

Plain strings, no plotting library: the page needs no JavaScript to draw
and the orchestrator imports nothing heavy. Every function takes plain data
(what ``/api/state`` returns) and gives one ``<svg>`` element; every text
is escaped. Colours come from CSS classes (``static/ui.css``), so the SVG
follows the page's theme.
"""
from __future__ import annotations

import math
import time
from html import escape
from typing import Any, Iterable, Sequence

NODE_W, NODE_H = 136, 56
COL_GAP, ROW_GAP = 32, 24
PAD = 16


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _f(x: float) -> str:
    """A coordinate, short."""
    return f"{x:.1f}".rstrip("0").rstrip(".") if math.isfinite(x) else "0"


# ---------------------------------------------------------------- pipeline graph
def layers(names: Sequence[str], edges: Iterable[tuple[str, str]]) -> dict[str, int]:
    """Column of each stage: the length of the longest path from a stage without inputs."""
    ups: dict[str, list[str]] = {n: [] for n in names}
    for a, b in edges:
        if a in ups and b in ups:
            ups[b].append(a)
    depth: dict[str, int] = {}

    def visit(n: str, seen: frozenset[str]) -> int:
        if n in depth:
            return depth[n]
        if n in seen:  # a cycle cannot come from doit's task_dep, but never loop forever
            return 0
        d = max((visit(u, seen | {n}) + 1 for u in ups[n]), default=0)
        depth[n] = d
        return d

    for n in names:
        visit(n, frozenset())
    return depth


def pipeline_graph(stages: Sequence[dict[str, Any]], edges: Sequence[tuple[str, str]]) -> str:
    """The stages as boxes in dependency columns, coloured by ``state``, with arrows for ``edges``.

    Each box is a link to the stage's row (``#stage-<name>``) and carries
    ``data-stage`` / ``data-state`` for tests and styles.
    """
    names = [s["name"] for s in stages]
    col = layers(names, edges)
    columns: dict[int, list[str]] = {}
    for n in names:
        columns.setdefault(col[n], []).append(n)
    rows = max((len(v) for v in columns.values()), default=1)
    height = PAD * 2 + rows * NODE_H + (rows - 1) * ROW_GAP + 40  # room for arcs of long edges
    top = PAD + 30
    pos: dict[str, tuple[float, float]] = {}
    for c, members in columns.items():
        block = len(members) * NODE_H + (len(members) - 1) * ROW_GAP
        y0 = top + (rows * NODE_H + (rows - 1) * ROW_GAP - block) / 2
        for i, n in enumerate(members):
            pos[n] = (PAD + c * (NODE_W + COL_GAP), y0 + i * (NODE_H + ROW_GAP))
    width = PAD * 2 + (max(columns, default=0) + 1) * (NODE_W + COL_GAP) - COL_GAP
    out = [f'<svg class="graph" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_f(width)} {_f(height)}" '
           f'width="{_f(width)}" height="{_f(height)}" role="img" aria-label="pipeline graph">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" class="arrowhead"/></marker></defs>']
    by_name = {s["name"]: s for s in stages}
    arcs = 0
    for a, b in edges:
        if a not in pos or b not in pos:
            continue
        (ax, ay), (bx, by) = pos[a], pos[b]
        x1, y1 = ax + NODE_W, ay + NODE_H / 2
        x2, y2 = bx, by + NODE_H / 2
        span = col[b] - col[a]
        if span > 1 and abs(y1 - y2) < 1:  # a long edge on one row would cross the boxes between: arc above
            arcs += 1
            lift = top - 8 - (arcs % 3) * 7
            d = (f"M{_f(ax + NODE_W / 2)},{_f(ay)} C{_f(ax + NODE_W / 2)},{_f(lift - 10)} "
                 f"{_f(bx + NODE_W / 2)},{_f(lift - 10)} {_f(bx + NODE_W / 2)},{_f(by)}")
        else:
            mid = (x1 + x2) / 2
            d = f"M{_f(x1)},{_f(y1)} C{_f(mid)},{_f(y1)} {_f(mid)},{_f(y2)} {_f(x2)},{_f(y2)}"
        state = by_name[b].get("state", "")
        out.append(f'<path class="edge edge-{_e(state)}" d="{d}" marker-end="url(#arrow)" '
                   f'data-edge="{_e(a)}->{_e(b)}"/>')
    for s in stages:
        x, y = pos[s["name"]]
        state = s.get("state", "unknown")
        sub = s.get("label", state)
        dur = s.get("duration_text") or ""
        title = f"{s['name']}: {sub}" + (f" — {'; '.join(s.get('reasons') or [])}" if s.get("reasons") else "")
        out.append(
            f'<a href="#stage-{_e(s["name"])}" class="node node-{_e(state)}" data-stage="{_e(s["name"])}" '
            f'data-state="{_e(state)}"><title>{_e(title)}</title>'
            f'<rect x="{_f(x)}" y="{_f(y)}" width="{NODE_W}" height="{NODE_H}" rx="9"/>'
            f'<text class="node-name" x="{_f(x + NODE_W / 2)}" y="{_f(y + 22)}">{_e(s["name"])}</text>'
            f'<text class="node-sub" x="{_f(x + NODE_W / 2)}" y="{_f(y + 41)}">{_e(sub)}'
            + (f' · {_e(dur)}' if dur else "") + '</text></a>')
    out.append("</svg>")
    return "".join(out)


# ---------------------------------------------------------------- axes helpers
def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else [0.0]
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + step * 1e-6 and len(ticks) < 50:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _fmt_num(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def _fmt_time(ts: float, span: float) -> str:
    t = time.localtime(ts)
    return time.strftime("%H:%M:%S" if span < 3 * 3600 else ("%H:%M" if span < 86400 else "%m-%d %H:%M"), t)


class _Frame:
    """A plotting area inside an SVG: data coordinates to pixels."""

    def __init__(self, width: float, height: float, x0: float, x1: float, y0: float, y1: float,
                 left: float = 52, right: float = 16, top: float = 16, bottom: float = 40) -> None:
        self.w, self.h = width, height
        self.left, self.right, self.top, self.bottom = left, right, top, bottom
        self.x0, self.x1 = x0, (x1 if x1 > x0 else x0 + 1)
        self.y0, self.y1 = y0, (y1 if y1 > y0 else y0 + 1)

    def x(self, v: float) -> float:
        return self.left + (v - self.x0) / (self.x1 - self.x0) * (self.w - self.left - self.right)

    def y(self, v: float) -> float:
        return self.h - self.bottom - (v - self.y0) / (self.y1 - self.y0) * (self.h - self.top - self.bottom)

    def axes(self, xticks: list[tuple[float, str]], yticks: list[tuple[float, str]], xlabel: str,
             ylabel: str) -> list[str]:
        out = []
        for v, text in yticks:
            y = self.y(v)
            out.append(f'<line class="grid" x1="{_f(self.left)}" x2="{_f(self.w - self.right)}" '
                       f'y1="{_f(y)}" y2="{_f(y)}"/>')
            out.append(f'<text class="tick" x="{_f(self.left - 6)}" y="{_f(y + 4)}" text-anchor="end">'
                       f'{_e(text)}</text>')
        base = self.h - self.bottom
        for v, text in xticks:
            x = self.x(v)
            out.append(f'<line class="axis" x1="{_f(x)}" x2="{_f(x)}" y1="{_f(base)}" y2="{_f(base + 4)}"/>')
            out.append(f'<text class="tick" x="{_f(x)}" y="{_f(base + 16)}" text-anchor="middle">{_e(text)}</text>')
        out.append(f'<line class="axis" x1="{_f(self.left)}" x2="{_f(self.w - self.right)}" '
                   f'y1="{_f(base)}" y2="{_f(base)}"/>')
        out.append(f'<line class="axis" x1="{_f(self.left)}" x2="{_f(self.left)}" y1="{_f(self.top)}" '
                   f'y2="{_f(base)}"/>')
        out.append(f'<text class="label" x="{_f((self.left + self.w - self.right) / 2)}" y="{_f(self.h - 6)}" '
                   f'text-anchor="middle">{_e(xlabel)}</text>')
        out.append(f'<text class="label" transform="translate(13 {_f((self.top + base) / 2)}) rotate(-90)" '
                   f'text-anchor="middle">{_e(ylabel)}</text>')
        return out


def _svg_open(cls: str, width: float, height: float, label: str) -> str:
    return (f'<svg class="chart {cls}" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_f(width)} {_f(height)}" '
            f'width="{_f(width)}" height="{_f(height)}" role="img" aria-label="{_e(label)}">')


def _empty(cls: str, width: float, height: float, message: str) -> str:
    return (_svg_open(cls, width, height, message) +
            f'<rect class="empty-box" x="1" y="1" width="{_f(width - 2)}" height="{_f(height - 2)}" rx="8"/>'
            f'<text class="empty" x="{_f(width / 2)}" y="{_f(height / 2)}" text-anchor="middle">{_e(message)}</text>'
            "</svg>")


# ---------------------------------------------------------------- drift over time
def drift_chart(points: Sequence[dict[str, Any]], max_rate: float | None, live: Sequence[dict[str, Any]] = (),
                width: float = 720, height: float = 260) -> str:
    """Drift rate against time: monitor reports as dots, live samples as a line, the limit as a dashed line.

    ``points``: ``{"time", "rate", "version", "source"}`` (``source`` is
    ``stage`` or ``on-demand``); ``live``: ``{"time", "rate"}`` samples of the
    server's live window.
    """
    pts = [p for p in points if isinstance(p.get("rate"), (int, float)) and isinstance(p.get("time"), (int, float))]
    lv = [p for p in live if isinstance(p.get("rate"), (int, float)) and isinstance(p.get("time"), (int, float))]
    if not pts and not lv:
        return _empty("drift-chart", width, height, "no drift figures yet: the monitor stage has not reported")
    times = [p["time"] for p in pts] + [p["time"] for p in lv]
    t0, t1 = min(times), max(times)
    if t1 - t0 < 60:
        t0, t1 = t0 - 30, t1 + 30
    pad = (t1 - t0) * 0.04
    t0, t1 = t0 - pad, t1 + pad
    top = max([p["rate"] for p in pts] + [p["rate"] for p in lv] + [max_rate or 0.0])
    ymax = min(1.0, max(0.1, top * 1.15)) if top <= 1 else top * 1.1
    fr = _Frame(width, height, t0, t1, 0.0, ymax)
    span = t1 - t0
    xt = [(t, _fmt_time(t, span)) for t in nice_ticks(t0, t1, 5)]
    yt = [(v, f"{v:.0%}" if ymax <= 1 else _fmt_num(v)) for v in nice_ticks(0.0, ymax, 4)]
    out = [_svg_open("drift-chart", width, height, "drift rate over time")]
    out += fr.axes(xt, yt, "time", "drift rate")
    if max_rate is not None:
        y = fr.y(max_rate)
        out.append(f'<line class="threshold" x1="{_f(fr.left)}" x2="{_f(width - fr.right)}" y1="{_f(y)}" '
                   f'y2="{_f(y)}"><title>max_drift_rate {max_rate:g}</title></line>')
        out.append(f'<text class="threshold-label" x="{_f(width - fr.right - 4)}" y="{_f(y - 5)}" '
                   f'text-anchor="end">max {max_rate:g}</text>')
    if len(lv) > 1:
        d = " ".join(f"{'M' if i == 0 else 'L'}{_f(fr.x(p['time']))},{_f(fr.y(p['rate']))}" for i, p in enumerate(lv))
        out.append(f'<path class="live-line" d="{d}"/>')
    for p in lv[-1:]:
        out.append(f'<circle class="live-point" cx="{_f(fr.x(p["time"]))}" cy="{_f(fr.y(p["rate"]))}" r="4">'
                   f'<title>live now: {p["rate"]:.2%}</title></circle>')
    series = sorted(pts, key=lambda p: p["time"])
    if len(series) > 1:
        d = " ".join(f"{'M' if i == 0 else 'L'}{_f(fr.x(p['time']))},{_f(fr.y(p['rate']))}"
                     for i, p in enumerate(series))
        out.append(f'<path class="report-line" d="{d}"/>')
    for p in series:
        limit = p["max_rate"] if isinstance(p.get("max_rate"), (int, float)) else max_rate  # the run's own limit
        cls = "report-point" + (" over" if limit is not None and p["rate"] > limit else "")
        cls += " on-demand" if p.get("source") == "on-demand" else ""
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p["time"]))
        out.append(f'<circle class="{cls}" cx="{_f(fr.x(p["time"]))}" cy="{_f(fr.y(p["rate"]))}" r="5">'
                   f'<title>{_e(when)}: version {_e(p.get("version", "?"))}, drift {p["rate"]:.2%} '
                   f'({_e(p.get("source", ""))})</title></circle>')
    out.append("</svg>")
    return "".join(out)


# ---------------------------------------------------------------- histogram
def histogram(edges: Sequence[float] | None, train: Sequence[float] | None, live: Sequence[float] | None,
              threshold: float | None, width: float = 720, height: float = 260, live_extra: int = 0) -> str:
    """Reconstruction-error densities: training (filled) vs live traffic (line), the threshold dashed.

    ``train`` and ``live`` are counts over the bins ``edges``; each is
    normalised to a density, ``live_extra`` (live errors outside the bins)
    keeping its share of the live mass.
    """
    ok = edges is not None and len(edges) >= 2 and all(isinstance(e, (int, float)) for e in edges)
    if not ok:
        return _empty("histogram", width, height, "no training histogram for this version (no concept model)")
    edges = [float(e) for e in edges]
    widths = [max(b - a, 1e-12) for a, b in zip(edges, edges[1:])]

    def density(counts: Sequence[float] | None, extra: int = 0) -> list[float] | None:
        if not counts or len(counts) != len(widths):
            return None
        total = float(sum(counts)) + extra
        if total <= 0:
            return None
        return [c / (total * w) for c, w in zip(counts, widths)]

    dt, dl = density(train), density(live, live_extra)
    ymax = max((dt or []) + (dl or []) + [1e-12]) * 1.1
    x0, x1 = edges[0], edges[-1]
    if threshold is not None and math.isfinite(threshold):
        x1 = max(x1, threshold)
    fr = _Frame(width, height, x0, x1 + (x1 - x0) * 0.02, 0.0, ymax, left=58)
    xt = [(v, _fmt_num(v)) for v in nice_ticks(x0, x1, 6)]
    yt = [(v, _fmt_num(v)) for v in nice_ticks(0.0, ymax, 4)]
    out = [_svg_open("histogram", width, height, "reconstruction error: training vs live")]
    out += fr.axes(xt, yt, "reconstruction error of the concept model", "density")

    def steps(dens: list[float]) -> str:
        pts = [f"M{_f(fr.x(edges[0]))},{_f(fr.y(0))}"]
        for i, v in enumerate(dens):
            pts.append(f"L{_f(fr.x(edges[i]))},{_f(fr.y(v))} L{_f(fr.x(edges[i + 1]))},{_f(fr.y(v))}")
        pts.append(f"L{_f(fr.x(edges[-1]))},{_f(fr.y(0))}")
        return " ".join(pts)

    if dt:
        out.append(f'<path class="train-area" d="{steps(dt)} z"><title>training data</title></path>')
    if dl:
        out.append(f'<path class="live-area" d="{steps(dl)}"><title>live traffic</title></path>')
    if threshold is not None and math.isfinite(threshold):
        x = fr.x(threshold)
        out.append(f'<line class="threshold" x1="{_f(x)}" x2="{_f(x)}" y1="{_f(fr.top)}" '
                   f'y2="{_f(height - fr.bottom)}"><title>threshold {threshold:.4g}</title></line>')
        out.append(f'<text class="threshold-label" x="{_f(x + 4)}" y="{_f(fr.top + 12)}">threshold '
                   f'{threshold:.4g}</text>')
    lx = fr.left + 12
    out.append(f'<rect class="legend-train" x="{_f(lx)}" y="{_f(fr.top + 4)}" width="14" height="10"/>'
               f'<text class="legend" x="{_f(lx + 20)}" y="{_f(fr.top + 13)}">training data</text>')
    live_text = "live traffic" if dl else "live traffic: none yet"
    out.append(f'<line class="legend-live" x1="{_f(lx)}" x2="{_f(lx + 14)}" y1="{_f(fr.top + 27)}" '
               f'y2="{_f(fr.top + 27)}"/><text class="legend" x="{_f(lx + 20)}" y="{_f(fr.top + 31)}">'
               f'{_e(live_text)}</text>')
    out.append("</svg>")
    return "".join(out)
