"""Shared by the benchmarks: run one federation in process, write JSON, print tables."""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# One intra-op thread, as each virtual site gets in a Flower/Ray simulation (one CPU per
# site): tiny models otherwise spend their time spinning threads on a loaded machine.
if not torch.cuda.is_available():
    torch.set_num_threads(1)


def run_federated(cfg, db_url: str) -> dict:
    """One run through the real ServerApp loop and ClientApp handlers (InProcessGrid:
    same Flower messages, no SuperLink/Ray start-up); returns its report."""
    from fedcare.server.federation import run_federation
    from fedcare.server.local_grid import InProcessGrid
    from fedcare.server.report import build_report
    from fedcare.server.store import Store

    cfg.runtime.db = db_url
    run_id = run_federation(InProcessGrid(cfg, cfg.sites), cfg)
    store = Store(db_url)
    try:
        return build_report(store, run_id)
    finally:
        store.close()


def mean_site_accuracy(report: dict) -> float:
    return statistics.fmean(m["accuracy"] for m in report["final"]["per_site"].values())


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    return path


def print_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(headers, widths)), "-|-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    text = "\n".join(lines)
    print(text)
    return text


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)
