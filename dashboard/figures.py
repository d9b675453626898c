"""Line and bar charts built as plain Plotly dicts.

plotly.express builds, validates and re-lays-out a Python object per trace: about 1 s
for 50 site curves on a loaded 2-core machine, on every page load. These helpers make
the same figures (one trace per colour / dash group in order of appearance, px's
colours, trace names and legend groups, axis titles from ``labels``, the dashboard's
margins and legend) in one ``go.Figure`` construction, a fraction of that.
"""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

COLORS = qualitative.Plotly
DASHES = ("solid", "dot", "dash", "longdash", "dashdot", "longdashdot")
# a small template: the default "plotly" one is deep-copied and validated per figure
# (~0.4 s each under load), and Streamlit's theme restyles the chart in the browser anyway
LAYOUT = {"margin": {"l": 10, "r": 10, "t": 40, "b": 10}, "legend": {"orientation": "h", "y": -0.2},
          "template": {"layout": {"colorway": list(COLORS)}}}


def line(df: pd.DataFrame, x: str, y: str, color: str | None = None, line_dash: str | None = None,
         markers: bool = False, title: str = "", labels: dict | None = None) -> go.Figure:
    traces = []
    colors, dashes = _levels(df, color), _levels(df, line_dash)
    for key, part in _groups(df, [c for c in (color, line_dash) if c]):
        values = dict(zip([c for c in (color, line_dash) if c], key))
        name = ", ".join(str(v) for v in key)
        style = {"color": COLORS[colors.index(values[color]) % len(COLORS)] if color else COLORS[0]}
        if line_dash:
            style["dash"] = DASHES[dashes.index(values[line_dash]) % len(DASHES)]
        traces.append({"type": "scatter", "mode": "lines+markers" if markers else "lines", "name": name,
                       "legendgroup": name, "showlegend": bool(key), "x": part[x].to_numpy(),
                       "y": part[y].to_numpy(), "line": style, "marker": {"color": style["color"]}})
    return _figure(traces, df, x, y, title, labels, legend=", ".join(c for c in (color, line_dash) if c))


def bar(df: pd.DataFrame, x: str, y: str, color: str | None = None, barmode: str = "relative",
        title: str = "", labels: dict | None = None, color_map: dict | None = None) -> go.Figure:
    traces = []
    colors = _levels(df, color)
    for key, part in _groups(df, [color] if color else []):
        name = str(key[0]) if key else ""
        fill = (color_map or {}).get(key[0]) if key else None
        fill = fill or COLORS[colors.index(key[0]) % len(COLORS) if key else 0]
        traces.append({"type": "bar", "name": name, "legendgroup": name, "showlegend": bool(key),
                       "x": part[x].to_numpy(), "y": part[y].to_numpy(), "marker": {"color": fill}})
    return _figure(traces, df, x, y, title, labels, legend=color or "", barmode=barmode)


def _figure(traces: list[dict], df: pd.DataFrame, x: str, y: str, title: str, labels: dict | None,
            legend: str, **layout) -> go.Figure:
    labels = labels or {}
    xaxis: dict = {"title": {"text": labels.get(x, x)}}
    if x == "round":   # whole rounds: no 1.2, 1.4 ... ticks on short runs
        xaxis["tickformat"] = "d"
        rounds = pd.to_numeric(df[x], errors="coerce") if len(df) else pd.Series(dtype=float)
        if len(rounds) and rounds.max() - rounds.min() <= 20:
            xaxis["dtick"] = 1
    spec = {"data": traces, "layout": {**LAYOUT, "title": {"text": title}, "xaxis": xaxis,
                                       "yaxis": {"title": {"text": labels.get(y, y)}},
                                       "legend": {**LAYOUT["legend"], "title": {"text": labels.get(legend, legend)}},
                                       **layout}}
    return go.Figure(spec)


def _levels(df: pd.DataFrame, column: str | None) -> list:
    return list(pd.unique(df[column])) if column else []


def _groups(df: pd.DataFrame, keys: list[str]):
    if not keys:
        yield (), df
        return
    for key, part in df.groupby(keys, sort=False, dropna=False):
        yield (key if isinstance(key, tuple) else (key,)), part
