"""``fedcare site ...``: commands a hospital runs on its own machine."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer

from fedcare.errors import PrivacyError

site_app = typer.Typer(no_args_is_help=True)


@site_app.callback()
def site() -> None:
    """Commands for a hospital site: its privacy ledger, its SuperNode, its audit log."""


@site_app.command("privacy")
def privacy(
    ledger: Path = typer.Option(..., help="The site's privacy ledger file (SQLite)"),
    budget: Optional[float] = typer.Option(None, help="Epsilon cap to compare with (default: the cap recorded with the latest round)"),
    delta: Optional[float] = typer.Option(None, help="Report epsilon at this delta (default: the latest round's)"),
    accountant: Optional[str] = typer.Option(None, help="prv or rdp (default: the latest round's)"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table"),
) -> None:
    """What each dataset's records have spent, per run and in total, and what is left."""
    from .ledger import SiteLedger

    if not ledger.is_file():
        raise PrivacyError(f"no privacy ledger at {ledger}; give the path the site's SuperNode "
                           "uses (node config 'ledger') or a file in `fedcare simulate --ledger-dir`")
    if accountant is not None and accountant not in ("prv", "rdp"):
        raise PrivacyError(f"--accountant must be prv or rdp, got {accountant!r}")
    if delta is not None and not 0 < delta < 1:
        raise PrivacyError(f"--delta must be in (0, 1), got {delta}")
    summary = SiteLedger(ledger).summary(delta=delta, accountant=accountant, budget=budget)
    if as_json:
        typer.echo(json.dumps({"ledger": str(ledger), "datasets": summary}, indent=2, default=_json_default))
        return
    _print_table(ledger, summary)


def _json_default(value):
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)


def _print_table(ledger: Path, summary: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not summary:
        console.print(f"{ledger}: no DP-SGD rounds recorded yet")
        return
    for ds in summary:
        cap = f"{ds['budget']:g}" if ds["budget"] > 0 else "none"
        left = f"{ds['remaining']:.3f}" if ds["remaining"] is not None else "unlimited"
        table = Table("run", "rounds", "attempts", "DP-SGD steps", "epsilon (run alone)",
                      title=(f"dataset {ds['dataset_id']}: epsilon {ds['epsilon']:.3f} spent in total, "
                             f"cap {cap}, left {left} (delta {ds['delta']:g}, {ds['accountant']})"))
        for run in ds["runs"]:
            table.add_row(run["run_id"], str(run["rounds"]), str(run["attempts"]), str(run["steps"]),
                          f"{run['epsilon']:.3f}")
        console.print(table)
