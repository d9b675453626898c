"""Line and bar charts built as plain Plotly dicts.

plotly.express builds, validates and re-lays-out a Python object per trace: about 1 s
for 50 site curves on a loaded 2-core machine, on every page load. These helpers make
the same figures (one trace per colour / dash group in order of appearance, px's
colours, trace names and legend groups, axis titles from ``labels``, the dashboard's
margins and legend) in one ``go.Figure`` construction, a fraction of that.

In the browser the cost is per trace and legend entry rather than per point (a 50-curve
chart with its 50-entry legend draws in about 0.45 s on a loaded 2-core machine, one
curve of the same 5,000 points in about 0.25 s), so ``site_lines`` draws a federation
of more than ``MAX_SITE_TRACES`` sites as one grey trace holding every site's curve plus
the few sites at the bad end in colour, and ``heatmap`` and ``scatter`` replace
px.imshow and px.scatter.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

COLORS = qualitative.Plotly
DASHES = ("solid", "dot", "dash", "longdash", "dashdot", "longdashdot")
MAX_SITE_TRACES = 12   # more sites than this: one grey trace for all of them, HIGHLIGHT in colour
HIGHLIGHT = 5
ALL_SITES_COLOR = "rgba(110, 110, 110, 0.35)"
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
        title: str = "", labels: dict | None = None, color_map: dict | None = None,
        hover_data: list[str] | None = None) -> go.Figure:
    traces = []
    colors = _levels(df, color)
    for key, part in _groups(df, [color] if color else []):
        name = str(key[0]) if key else ""
        fill = (color_map or {}).get(key[0]) if key else None
        fill = fill or COLORS[colors.index(key[0]) % len(COLORS) if key else 0]
        traces.append({"type": "bar", "name": name, "legendgroup": name, "showlegend": bool(key),
                       "x": part[x].to_numpy(), "y": part[y].to_numpy(), "marker": {"color": fill},
                       **_hover(part, [x, y], hover_data, labels)})
    return _figure(traces, df, x, y, title, labels, legend=color or "", barmode=barmode)


def scatter(df: pd.DataFrame, x: str, y: str, color: str | None = None, hover_data: list[str] | None = None,
            title: str = "", labels: dict | None = None, size: int | None = None) -> go.Figure:
    """Markers, one trace per ``color`` group (px.scatter's traces, names and colours)."""
    traces = []
    colors = _levels(df, color)
    for key, part in _groups(df, [color] if color else []):
        name = str(key[0]) if key else ""
        marker = {"color": COLORS[colors.index(key[0]) % len(COLORS)] if key else COLORS[0]}
        if size:
            marker["size"] = size
        traces.append({"type": "scatter", "mode": "markers", "name": name, "legendgroup": name,
                       "showlegend": bool(key), "x": part[x], "y": part[y], "marker": marker,
                       **_hover(part, [x, y], hover_data, labels)})
    return _figure(traces, df, x, y, title, labels, legend=color or "")


def heatmap(frame: pd.DataFrame, title: str = "", zlabel: str = "", colors: tuple = (),
            zmin: float | None = None, zmax: float | None = None) -> go.Figure:
    """``frame`` (rows = y, columns = x) as px.imshow(aspect="auto") draws it: first row
    on top, axis titles from the index and column names, a colour bar titled ``zlabel``."""
    x, y = frame.columns.name or "x", frame.index.name or "y"
    trace = {"type": "heatmap", "z": frame.to_numpy(dtype=float), "x": frame.columns.to_numpy(),
             "y": [str(v) for v in frame.index], "zmin": zmin, "zmax": zmax,
             "colorbar": {"title": {"text": zlabel}},
             "hovertemplate": f"{x}: %{{x}}<br>{y}: %{{y}}<br>{zlabel}: %{{z}}<extra></extra>"}
    if colors:
        trace["colorscale"] = [[i / (len(colors) - 1), c] for i, c in enumerate(colors)]
    fig = _figure([trace], pd.DataFrame({x: frame.columns}), x, y, title, None, legend="")
    fig.update_yaxes(autorange="reversed")
    return fig


def site_lines(df: pd.DataFrame, x: str, y: str, site: str = "site", worst: str = "min", title: str = "",
               labels: dict | None = None, markers: bool = False) -> go.Figure:
    """One curve per site, as ``line(color=site)``; beyond MAX_SITE_TRACES sites, every
    site's curve in one grey trace (hovering names the site) and the HIGHLIGHT sites with
    the lowest (``worst="min"``) or highest (``"max"``) latest value in colour, with a legend."""
    sites = _levels(df, site)
    if len(sites) <= MAX_SITE_TRACES:
        return line(df, x, y, color=site, markers=markers, title=title, labels=labels)
    mode = "lines+markers" if markers else "lines"
    known = df.dropna(subset=[y])
    latest = known.sort_values(x, kind="stable").groupby(site, sort=False)[y].last()
    latest = latest.sort_values(ascending=worst != "max", kind="stable")
    shown = list(latest.index[:HIGHLIGHT])
    xs, ys, names = [], [], []
    for key, part in df.groupby(site, sort=False):
        xs.append(np.append(part[x].to_numpy(dtype=float), np.nan))
        ys.append(np.append(part[y].to_numpy(dtype=float), np.nan))
        names.append(np.append(np.full(len(part), str(key), dtype=object), ""))
    label = (labels or {}).get(y, y)
    traces = [{"type": "scatter", "mode": mode, "name": f"all {len(sites)} sites", "legendgroup": "all",
               "x": np.concatenate(xs), "y": np.concatenate(ys), "text": np.concatenate(names),
               "hovertemplate": f"%{{text}}<br>{x}: %{{x}}<br>{label}: %{{y}}<extra></extra>",
               "line": {"color": ALL_SITES_COLOR, "width": 1}, "marker": {"color": ALL_SITES_COLOR}}]
    for i, name in enumerate(shown):
        part = df[df[site] == name]
        color = COLORS[i % len(COLORS)]
        traces.append({"type": "scatter", "mode": mode, "name": str(name), "legendgroup": str(name),
                       "x": part[x].to_numpy(), "y": part[y].to_numpy(), "line": {"color": color},
                       "marker": {"color": color}})
    legend = (labels or {}).get(site, site)
    if shown:
        legend += f": the {len(shown)} {'highest' if worst == 'max' else 'lowest'} at their latest round in colour"
    return _figure(traces, df, x, y, title, labels, legend=legend)


def lower_is_better(metric: str) -> bool:
    """Losses, calibration errors and false-positive rates: the bad end is the high one."""
    return any(word in metric for word in ("loss", "ece", "error", "fpr", "brier"))


def _hover(part: pd.DataFrame, shown: list[str], hover_data: list[str] | None, labels: dict | None) -> dict:
    """customdata and a hovertemplate naming ``shown`` and ``hover_data`` columns (px's hover)."""
    if not hover_data:
        return {}
    labels = labels or {}
    lines = [f"{labels.get(shown[0], shown[0])}=%{{x}}", f"{labels.get(shown[1], shown[1])}=%{{y}}"]
    lines += [f"{labels.get(c, c)}=%{{customdata[{i}]}}" for i, c in enumerate(hover_data)]
    return {"customdata": part[hover_data].to_numpy(dtype=object),
            "hovertemplate": "<br>".join(lines) + "<extra></extra>"}


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
