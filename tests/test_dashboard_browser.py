"""The dashboard in a real browser: ``fedcare dashboard`` on a loopback port, every
page opened in headless Chromium (Playwright on /usr/bin/chromium), screenshots saved
to $FEDCARE_SCREENSHOTS (or a temporary folder).

The store is the demo store of tests/dashboard_demo.py, or $FEDCARE_TEST_DB.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from fedcare.server import queries as q

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ALL_CHARTS_DRAWN = """() => {
    const charts = [...document.querySelectorAll('[data-testid="stPlotlyChart"]')];
    return charts.length > 0 && charts.every(c => c.querySelector('.main-svg'));
}"""
PAGES = {"runs": "", "convergence": "convergence", "sites": "sites", "fairness": "fairness",
         "privacy": "privacy", "events": "events"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_dashboard(db: str, port: int, log: Path) -> subprocess.Popen:
    """``fedcare dashboard`` in its own process group; waits until it serves."""
    env = {k: v for k, v in os.environ.items() if k != "FEDCARE_DASHBOARD_PASSWORD_HASH"}
    proc = subprocess.Popen([sys.executable, "-c", "from fedcare.cli import main; main()", "dashboard",
                             "--db", db, "--port", str(port), "--host", "127.0.0.1"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fedcare dashboard exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"fedcare dashboard did not listen on {port} within 120 s: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def wait_rendered(page, timeout_ms: int = 240_000, title: str | None = None) -> None:
    """Until the page's title is shown (the script got that far; before the app
    connects, the state attribute already reads notRunning), Streamlit reports the
    script finished, and no spinner is left."""
    if title:
        page.wait_for_selector(f'h1:has-text("{title}")', timeout=timeout_ms)
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=timeout_ms)
    page.wait_for_function("() => document.querySelectorAll('[data-testid=stSpinner]').length === 0",
                           timeout=timeout_ms)


def open_and_check(browser, url: str, title: str, shot: Path, must_contain: list[str], chart: bool = True) -> str:
    """Open ``url``, wait until the script finished and every chart on the page is
    drawn, then until each of ``must_contain`` is in the page (or the time is up),
    take a full-page screenshot and return the page's HTML."""
    page = browser.new_page(viewport={"width": 1400, "height": 4000})   # tall: nothing waits below the fold
    try:
        page.goto(url, wait_until="domcontentloaded", timeout=180_000)
        wait_rendered(page, title=title)
        if chart:
            page.wait_for_selector('[data-testid="stPlotlyChart"]', timeout=180_000)
            page.wait_for_function(ALL_CHARTS_DRAWN, timeout=180_000)
        wait_rendered(page)
        try:
            page.wait_for_function("words => words.every(w => document.body.innerHTML.includes(w))",
                                   arg=must_contain, timeout=60_000)
        except PlaywrightTimeout:
            pass                                  # the assertion below names what is missing
        html = page.content()
        _expand_for_screenshot(page)
        page.screenshot(path=str(shot), full_page=True)
    finally:
        page.close()
    missing = [s for s in must_contain if s not in html]
    assert not missing, f"{url}: missing {missing}"
    return html


def _expand_for_screenshot(page) -> None:
    """Streamlit scrolls inside its main block: size the viewport to the content."""
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.wait_for_timeout(300)
    height = page.evaluate("""() => {
        const main = document.querySelector('[data-testid=stMain]') || document.body;
        return Math.max(main.scrollHeight, document.body.scrollHeight);
    }""")
    page.set_viewport_size({"width": 1400, "height": min(max(int(height) + 40, 1000), 8000)})
    page.wait_for_timeout(800)


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    from dashboard_demo import demo_store_url

    return demo_store_url(tmp_path_factory.mktemp("browser"))


@contextlib.contextmanager
def serving(db: str, log: Path):
    """``fedcare dashboard`` on ``db`` at a free loopback port; yields its address."""
    port = free_port()
    proc = start_dashboard(db, port, log)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def server(store_url, tmp_path_factory):
    with serving(store_url, tmp_path_factory.mktemp("log") / "dashboard.log") as address:
        yield address


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("FEDCARE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def pick_run(store_url: str, page: str) -> str:
    """The run that shows the most on ``page``: one with personalised models for
    Convergence, else a DP run with site budgets (else any DP run), most rounds first."""
    engine = q.connect(store_url)
    runs = q.list_runs(engine)
    runs = runs[runs["rounds_done"] > 0].sort_values("rounds_done", ascending=False)
    if page == "convergence":
        local = [r for r in runs["run_id"] if "local" in q.evaluation_kinds(engine, r)]
        if local:
            return local[0]
    budgeted = [r for r in runs["run_id"] if q.privacy_by_site(engine, r)["budget"].notna().any()]
    dp = runs[runs["dp"] != "none"]["run_id"].tolist()
    return (budgeted or dp or runs["run_id"].tolist())[0]


@pytest.mark.parametrize("name", list(PAGES))
def test_page_in_chromium(server, browser, shots, store_url, name):
    run_id = pick_run(store_url, name)
    sites = q.site_totals(q.connect(store_url), run_id)["site"].tolist()
    must = [run_id] + (sites if name not in ("events",) else [])
    open_and_check(browser, f"{server}/{PAGES[name]}?run={run_id}", name.capitalize(), shots / f"{name}.png", must)
    assert (shots / f"{name}.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def simulated_server(simulated_store_url, tmp_path_factory):
    with serving(simulated_store_url, tmp_path_factory.mktemp("log") / "simulated.log") as address:
        yield address


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(PAGES))
def test_real_simulation_page_in_chromium(simulated_server, browser, shots, simulated_store_url, name):
    """Every page on the store of a real ``fedcare simulate`` run (DP on, one site's
    updates rejected)."""
    (run_id,) = q.list_runs(q.connect(simulated_store_url))["run_id"]
    must = [run_id] + (["cleveland", "hungary", "switzerland", "va"] if name != "events" else [])
    open_and_check(browser, f"{simulated_server}/{PAGES[name]}?run={run_id}", name.capitalize(),
                   shots / f"simulated-{name}.png", must)
    assert (shots / f"simulated-{name}.png").stat().st_size > 10_000


def test_task_without_sensitive_attributes_in_chromium(server, browser, shots, store_url):
    runs = q.list_runs(q.connect(store_url))
    text_runs = runs[(runs["task"] == "medical-abstracts") & (runs["rounds_done"] > 0)]
    if text_runs.empty:
        pytest.skip("no medical-abstracts run in this store")
    run_id = text_runs["run_id"].iloc[0]
    html = open_and_check(browser, f"{server}/fairness?run={run_id}", "Fairness", shots / "fairness-classes.png",
                          [run_id])
    assert "no sensitive attributes" in html


def test_non_loopback_address_is_refused(store_url, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FEDCARE_DASHBOARD_PASSWORD_HASH"}
    proc = subprocess.run([sys.executable, "-c", "from fedcare.cli import main; main()", "dashboard",
                           "--db", store_url, "--host", "0.0.0.0", "--port", str(free_port())],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "without a login" in proc.stderr
