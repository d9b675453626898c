"""The dashboard's Model page (model card, export button), the exported round marked
on the Convergence page, and `fedcare runs` keeping whole run ids at 80 columns.
The store holds one real Fed-Heart-Disease run (real ServerApp/ClientApp round loop)."""
from __future__ import annotations

import io
import json
import os
import pty
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from fedcare.server.store import Store

APP = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> tuple[str, str]:
    from fedcare.launch import resolve_config
    from fedcare.server.federation import run_federation
    from fedcare.server.local_grid import InProcessGrid

    folder = tmp_path_factory.mktemp("model-page")
    cfg = resolve_config("heart-disease", ["train.local_steps=3", f"site.ledger_dir={folder / 'ledgers'}"], rounds=2)
    cfg.runtime.db = f"sqlite:///{folder / 'store.db'}"
    return cfg.runtime.db, run_federation(InProcessGrid(cfg, cfg.sites), cfg)


def open_page(url: str, run_id: str, page: str, monkeypatch) -> AppTest:
    monkeypatch.setenv("FEDCARE_DB", url)
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.session_state["fedcare_run"] = run_id
    at.run()
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_model_page_shows_the_card_and_exports(store_url, monkeypatch):
    url, run_id = store_url
    at = open_page(url, run_id, "model", monkeypatch)
    assert "Exported before: never" in [c.value for c in at.caption]
    at.toggle(key="model_show_card").set_value(True).run()
    text = "\n".join(m.value for m in at.markdown)
    assert f"run `{run_id}` (round 2)" in text and "## Privacy" in text and "## Fairness" in text
    with Store(url) as store:
        from fedcare.server.report import build_report

        final = build_report(store, run_id)["final"]["per_site"]["cleveland"]
    assert f"| cleveland | {final['accuracy']:.4f} | {final['auroc']:.4f} |" in text
    at.button(key="model_export").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Exported before: round 2" in [c.value for c in at.caption]
    download = at.get("download_button")
    assert download, "no download button after the export"
    with Store(url) as store:
        events = [e for e in store.events(run_id) if e["kind"] == "exported"]
    assert [e["data"]["round"] for e in events] == [2]
    # the convergence page marks the exported round on the global curve
    at = open_page(url, run_id, "convergence", monkeypatch)
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert any(a.get("text") == "exported (round 2)" for a in spec["layout"].get("annotations", []))
    assert any(s.get("x0") == 2 for s in spec["layout"].get("shapes", []))


def test_exported_zip_holds_the_model_folder(store_url):
    from fedcare.server.export import export_run, zip_folder

    url, run_id = store_url
    import tempfile

    with tempfile.TemporaryDirectory() as d, Store(url) as store:
        export_run(store, run_id, Path(d) / "m", 1)
        names = set(zipfile.ZipFile(io.BytesIO(zip_folder(Path(d) / "m"))).namelist())
    assert names == {"README.md", "fedcare.json", "fedcare_state.safetensors"}


def test_runs_keeps_whole_run_ids_at_80_columns(store_url):
    url, run_id = store_url
    cmd = [sys.executable, "-c", "from fedcare.cli import main; main()", "runs", "--db", url]
    master, slave = pty.openpty()   # a terminal: the rich table
    proc = subprocess.Popen(cmd, stdout=slave, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "80"})
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=120) == 0
    shown = re.sub(r"\x1b\[[0-9;]*m", "", b"".join(chunks).decode()).replace("\r", "")
    assert run_id in shown, shown
    assert max(len(line) for line in shown.splitlines()) <= 80
    piped = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert piped.split("\t")[0] == run_id
