"""Dashboard at scale: a SQLite store with 1,000 rounds x 50 sites, every page timed
in headless Chromium.

    python bench/dashboard.py [--rounds 1000] [--sites 50] [--loads 3] [--db PATH]

Fills the store with bulk inserts (schema from ``Store``, rows through SQLAlchemy Core
executemany): per round 50 site rows (with privacy), 51 evaluations (global + sites),
a fairness object from ``models.fairness.aggregate`` over the sites' counts, events.
Then starts ``fedcare dashboard`` on a free loopback port and loads each page
``--loads`` times, each in a fresh browser context (nothing cached in the browser): render
time = from navigation until Streamlit reports the script finished with every Plotly
chart on the page drawn (charts behind a page's other tabs are drawn when the tab is
picked, not at load). Per load it also records when the browser asked for the Plotly
bundle (the page's first chart arrived; compiling that 4.7 MB bundle takes about 1.2 s
of the browser's main thread in every fresh context) and the bytes the page received
over the websocket. Also times the SQL each page issues at load directly (a cache
miss: the first load after the store changed). Writes bench/results/dashboard.json
and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fedcare.config import RunConfig  # noqa: E402
from fedcare.models.fairness import aggregate, site_counts  # noqa: E402
from fedcare.server import queries as q  # noqa: E402
from fedcare.server.store import EvaluationRow, EventRow, Round, SiteRoundRow, Store  # noqa: E402

PAGES = {"runs": "", "convergence": "convergence", "sites": "sites", "fairness": "fairness",
         "privacy": "privacy", "events": "events", "model": "model"}
NO_CHARTS = {"model"}   # the Model page draws no chart: rendered = script finished


def fill(url: str, rounds: int, num_sites: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    sites = [f"hospital-{i:02d}" for i in range(num_sites)]
    cfg = RunConfig(task="heart-disease", rounds=rounds, sites=num_sites)
    cfg.dp.level, cfg.dp.epsilon, cfg.site.budget = "sample", 8.0, 10.0
    with Store(url) as store:
        run_id = store.create_run("heart-disease", "fedavg", cfg.to_dict(), "bench", status="running")
        engine = store.engine
    # per-site fairness counts: a few variants per site, computed on synthetic predictions
    variants = {}
    for s, site in enumerate(sites):
        skill = 0.55 + 0.4 * s / num_sites
        variants[site] = []
        for _ in range(8):
            n = int(rng.integers(30, 120))
            y = rng.integers(0, 2, n)
            p = np.clip(np.where(y == 1, rng.beta(2 + 6 * skill, 3, n), rng.beta(3, 2 + 6 * skill, n)), 0, 1)
            groups = {"sex": rng.choice(["female", "male"], n, p=[0.3, 0.7]),
                      "age_band": rng.choice(["<50", "50-59", "60+"], n)}
            variants[site].append(site_counts(p, y, groups, 5, site))
    t0 = time.time() - rounds * 30.0
    round_rows, site_rows, eval_rows, event_rows = [], [], [], []
    eps = np.zeros(num_sites)
    for rnd in range(1, rounds + 1):
        start = t0 + 30.0 * rnd
        acc = np.clip(0.5 + 0.3 * (1 - np.exp(-rnd / 150)) + rng.normal(0, 0.02, num_sites)
                      - 0.1 * (np.arange(num_sites) % 7 == 0), 0, 1)
        status = np.where(rng.random(num_sites) < 0.97, "accepted", "rejected")
        status[(eps + 0.008 > 10.0)] = "refused"
        eps = np.where(status == "refused", eps, eps + 0.008 + 0.004 * (np.arange(num_sites) % 3))
        counts = {site: variants[site][int(rng.integers(0, 8))] for site in sites}
        round_rows.append(dict(run_id=run_id, round=rnd, started_at=start, ended_at=start + 25, num_sites=num_sites,
                               num_accepted=int((status == "accepted").sum()),
                               metrics={"train_loss": float(1 - acc.mean())}, fairness=aggregate(counts)))
        for i, site in enumerate(sites):
            ok = status[i] == "accepted"
            site_rows.append(dict(
                run_id=run_id, round=rnd, site=site, node_id=None, status=status[i],
                reason="" if ok else ("update norm 14.2 > 5 x round median" if status[i] == "rejected"
                                      else "privacy budget 10 would be exceeded"),
                num_examples=int(100 + 7 * i) if ok else 0, train_loss=float(1 - acc[i]) if ok else None,
                update_bytes=147456 if ok else 0, duration_s=float(rng.gamma(4, 0.5)), metrics={},
                privacy={"epsilon": float(eps[i]), "run_epsilon": float(eps[i]), "delta": 1e-5, "budget": 10.0},
                epsilon=float(eps[i]), run_epsilon=float(eps[i]), delta=1e-5, budget=10.0))
            eval_rows.append(dict(run_id=run_id, round=rnd, scope=site, kind="federated", num_examples=60,
                                  metrics={"accuracy": float(acc[i]), "loss": float(1.2 - acc[i])}))
        eval_rows.append(dict(run_id=run_id, round=rnd, scope="global", kind="federated", num_examples=60 * num_sites,
                              metrics={"accuracy": float(acc.mean()), "loss": float(1.2 - acc.mean()),
                                       "worst_site_accuracy": float(acc.min())}))
        event_rows.append(dict(run_id=run_id, time=start + 25, kind="round", message=f"round {rnd} stored", data=None))
    with engine.begin() as conn:
        conn.execute(sa.insert(Round), round_rows)
        for table, rows in ((SiteRoundRow, site_rows), (EvaluationRow, eval_rows)):
            for i in range(0, len(rows), 10_000):
                conn.execute(sa.insert(table), rows[i:i + 10_000])
        conn.execute(sa.insert(EventRow), event_rows)
    engine.dispose()
    return run_id


def time_queries(url: str, run_id: str, repeats: int = 3) -> dict[str, float]:
    """Median seconds of the SQL each page issues (without Streamlit)."""
    e = q.connect(url)
    latest = q.fairness_latest(e, run_id)[1]
    groups = q.fairness_groups(latest)
    attr = next(iter(groups))
    pages = {   # what each page reads at load (its first tab); the other tabs' queries run when picked
        "runs": lambda: (q.list_runs(e), q.metric_names(e, run_id), q.final_site_metrics(e, run_id, "accuracy"),
                         q.global_metric(e, [run_id], "accuracy")),
        "convergence": lambda: (q.metric_names(e, run_id), q.global_metric(e, [run_id], "accuracy"),
                                q.exported_rounds(e, run_id), q.evaluation_kinds(e, run_id),
                                q.site_metric(e, run_id, "accuracy")),
        "sites": lambda: (q.site_totals(e, run_id), q.participation(e, run_id, max_points=120),
                          q.site_problems(e, run_id)),
        "fairness": lambda: (q.fairness_latest(e, run_id), q.fairness_series(e, run_id, attr, groups[attr], "accuracy"),
                             q.epsilon_siblings(e, run_id)),
        "privacy": lambda: (q.privacy_by_site(e, run_id), q.privacy_audit(e, run_id)),
        "events": lambda: (q.event_counts(e, run_id), q.events(e, run_id)),
    }
    out = {}
    for name, fn in pages.items():
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times)
    e.dispose()
    return out


PLOTLY_REQUESTED = """() => {
    const e = performance.getEntriesByType('resource').find(r => /PlotlyChart/.test(r.name));
    return e ? e.startTime / 1000 : null;
}"""
CHART_COUNT = "() => document.querySelectorAll('[data-testid=\"stPlotlyChart\"]').length"


def time_pages(url: str, run_id: str, loads: int, shots: Path | None, pages: dict[str, str]) -> dict[str, list[dict]]:
    from playwright.sync_api import sync_playwright
    from test_dashboard_browser import (ALL_CHARTS_DRAWN, CHROMIUM, CHROMIUM_ARGS, free_port, start_dashboard, stop,
                                        wait_rendered)

    port = free_port()
    proc = start_dashboard(url, port, Path(tempfile.gettempdir()) / "fedcare-bench-dashboard.log")
    results: dict[str, list[dict]] = {}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            warm = browser.new_page()
            warm.goto(f"http://127.0.0.1:{port}/?run={run_id}")
            wait_rendered(warm, 300_000, title="Runs")
            warm.close()
            for name, path in pages.items():
                results[name] = []
                for i in range(loads):
                    page = browser.new_page(viewport={"width": 1400, "height": 1000})
                    received: list[int] = []
                    page.on("websocket", lambda ws: ws.on("framereceived", lambda data: received.append(len(data))))
                    t = time.perf_counter()
                    page.goto(f"http://127.0.0.1:{port}/{path}?run={run_id}", wait_until="domcontentloaded")
                    wait_rendered(page, 300_000, title=name.capitalize())
                    if name not in NO_CHARTS:
                        page.wait_for_function(ALL_CHARTS_DRAWN, timeout=300_000)
                    results[name].append({"render_s": time.perf_counter() - t, "ws_bytes": sum(received),
                                          "plotly_requested_s": page.evaluate(PLOTLY_REQUESTED),
                                          "charts": page.evaluate(CHART_COUNT)})
                    if shots is not None and i == 0:
                        page.screenshot(path=str(shots / f"bench-{name}.png"))
                    page.close()
            browser.close()
    finally:
        stop(proc)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=1000)
    p.add_argument("--sites", type=int, default=50)
    p.add_argument("--loads", type=int, default=3)
    p.add_argument("--db", default="", help="SQLite file to create (default: a temporary one)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "dashboard.json"))
    p.add_argument("--screenshots", default="", help="folder for one screenshot per page")
    p.add_argument("--pages", default=",".join(PAGES), help="comma-separated pages to time")
    p.add_argument("--label", default="", help="what this measurement is (e.g. the code version)")
    args = p.parse_args()

    path = Path(args.db) if args.db else Path(tempfile.mkdtemp()) / "bench-dashboard.db"
    if path.exists():
        path.unlink()
    url = f"sqlite:///{path}"
    t = time.perf_counter()
    run_id = fill(url, args.rounds, args.sites)
    fill_s = time.perf_counter() - t
    load_before = os.getloadavg()[0]
    sql = time_queries(url, run_id)
    shots = Path(args.screenshots) if args.screenshots else None
    if shots:
        shots.mkdir(parents=True, exist_ok=True)
    wanted = {n: PAGES[n] for n in args.pages.split(",")}
    pages = time_pages(url, run_id, args.loads, shots, wanted)
    result = {
        "rounds": args.rounds, "sites": args.sites, "loads": args.loads, "fill_s": round(fill_s, 2),
        "db_bytes": path.stat().st_size, "cpu_count": os.cpu_count(),
        "label": args.label, "load_average_1m_before": round(load_before, 2),
        "load_average_1m_after": round(os.getloadavg()[0], 2),
        "pages": {name: _page_result(v, sql.get(name)) for name, v in pages.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.label}: load average {result['load_average_1m_before']} before, {result['load_average_1m_after']} after "
          f"({result['cpu_count']} CPUs)")
    print(f"store: {args.rounds} rounds x {args.sites} sites, {result['db_bytes'] / 2**20:.1f} MiB, filled in {fill_s:.1f} s")
    print(f"{'page':<12} {'render (median s)':>18} {'Plotly asked (s)':>17} {'charts':>7} {'websocket KiB':>14} "
          f"{'SQL (s)':>8}   renders")
    for name, r in result["pages"].items():
        sql_s = "-" if r["sql_s"] is None else f"{r['sql_s']:.3f}"
        asked = "-" if r["plotly_requested_s"] is None else f"{r['plotly_requested_s']:.2f}"
        print(f"{name:<12} {r['median_render_s']:>18.2f} {asked:>17} {r['charts']:>7} {r['ws_kib']:>14.0f} "
              f"{sql_s:>8}   {r['renders_s']}")
    print(f"written to {out}")


def _page_result(loads: list[dict], sql_s: float | None) -> dict:
    asked = [x["plotly_requested_s"] for x in loads if x["plotly_requested_s"] is not None]
    return {"median_render_s": round(statistics.median(x["render_s"] for x in loads), 3),
            "renders_s": [round(x["render_s"], 3) for x in loads],
            "plotly_requested_s": round(statistics.median(asked), 3) if asked else None,
            "charts": max(x["charts"] for x in loads),
            "ws_kib": round(statistics.median(x["ws_bytes"] for x in loads) / 1024, 1),
            "sql_s": round(sql_s, 4) if sql_s is not None else None}


if __name__ == "__main__":
    main()
