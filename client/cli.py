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
    policy: Optional[Path] = typer.Option(None, help="The site's policy: report at its delta and accountant, "
                                                     "against its epsilon_cap"),
    budget: Optional[float] = typer.Option(None, help="Epsilon cap to compare with (default: the policy's, "
                                                      "else the cap recorded with the latest round)"),
    delta: Optional[float] = typer.Option(None, help="Report epsilon at this delta (default: the policy's, else "
                                                     "the smallest recorded: the site's own)"),
    accountant: Optional[str] = typer.Option(None, help="prv or rdp (default: the policy's, else the latest round's)"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table"),
) -> None:
    """What each dataset's records have spent, per run and in total, and what is left."""
    from .ledger import SiteLedger
    from .policy import load_policy

    if not ledger.is_file():
        raise PrivacyError(f"no privacy ledger at {ledger}; give the path the site's SuperNode "
                           "uses (node config 'ledger') or a file in `fedcare simulate --ledger-dir`")
    if accountant is not None and accountant not in ("prv", "rdp"):
        raise PrivacyError(f"--accountant must be prv or rdp, got {accountant!r}")
    if delta is not None and not 0 < delta < 1:
        raise PrivacyError(f"--delta must be in (0, 1), got {delta}")
    site = load_policy(policy.expanduser() if policy else None)
    if site is not None:
        delta = delta if delta is not None else (site.delta or None)
        accountant = accountant or site.accountant or None
        budget = budget if budget is not None else site.epsilon_cap
    summary = SiteLedger(ledger).summary(delta=delta, accountant=accountant, budget=budget)
    if as_json:
        typer.echo(json.dumps({"ledger": str(ledger), "datasets": summary}, indent=2, default=_json_default))
        return
    _print_table(ledger, summary)


def _json_default(value):
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)


def _print_table(ledger: Path, summary: list[dict]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(emoji=False, highlight=False)
    if not summary:
        console.print(f"{ledger}: no DP-SGD rounds recorded yet")
        return
    for ds in summary:
        cap = f"{ds['budget']:g}" if ds["budget"] > 0 else "none"
        left = f"{ds['remaining']:.3f}" if ds["remaining"] is not None else "unlimited"
        table = Table("rounds", "attempts", "DP-SGD steps", "epsilon (run alone)",
                      title=(f"dataset {escape(ds['dataset_id'])}: epsilon {ds['epsilon']:.3f} spent in total, "
                             f"cap {cap}, left {left} (delta {ds['delta']:g}, {ds['accountant']})"))
        table.add_column("run", overflow="fold")
        for run in ds["runs"]:
            table.add_row(str(run["rounds"]), str(run["attempts"]), str(run["steps"]),
                          f"{run['epsilon']:.3f}", escape(run["run_id"]))
        console.print(table)


@site_app.command("check")
def check(
    data: Path = typer.Option(..., help="The site's data folder (with its dataset.toml)"),
    task: Optional[str] = typer.Option(None, help="Family (tabular, text, image, instruct) or preset "
                                                  "(heart-disease, medical-abstracts, breastmnist) to check against"),
    sets: list[str] = typer.Option([], "--set", help="The run's data contract, e.g. data.labels=a,b"),
    min_group_size: Optional[int] = typer.Option(None, help="Groups smaller than this are suppressed (default: the run's)"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text"),
) -> None:
    """Validate the site's data as training reads it; print what the federation would use and what would leave."""
    from fedcare.config import RunConfig

    from .check import check_folder, render

    cfg = RunConfig().apply_sets(sets)
    mode = cfg.train.mode if any(s.split("=")[0].strip() == "train.mode" for s in sets) else None
    summary = check_folder(str(data.expanduser()), task, cfg, min_group_size or cfg.site.min_group_size, mode)
    typer.echo(json.dumps(summary, indent=2) if as_json else render(summary))


@site_app.command("evaluate")
def evaluate_cmd(
    model: Path = typer.Option(..., help="An exported model folder (fedcare export)"),
    data: Path = typer.Option(..., help="This site's data folder (the task's site format)"),
    site: Optional[str] = typer.Option(None, help="Site id within the folder (default: the whole folder as one site)"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables"),
) -> None:
    """Check an exported model on this site's held-out patients, locally: metrics,
    calibration, per-group metrics. Nothing leaves the machine."""
    from .evaluate import evaluate

    result = evaluate(model, data, site)
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=_json_default))
        return
    _print_evaluation(result)


def _print_evaluation(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(emoji=False, highlight=False)
    m = r["model"]
    console.print(f"{m['task']} model of run {m['run_id']} (round {m['round']}) on {r['data']}, "
                  f"site {r['site']}: {r['examples']} held-out examples")
    table = Table("metric", "value", title="metrics")
    for k, v in sorted(r["metrics"].items()):
        table.add_row(k, f"{v:.4f}")
    console.print(table)
    cal = Table("confidence bin", "examples", "mean confidence", "accuracy",
                title=f"calibration: ECE {r['calibration']['ece']:.4f}")
    for b in r["calibration"]["bins"]:
        if b["count"]:
            cal.add_row(f"{b['lower']:.1f}-{b['upper']:.1f}", str(b["count"]), f"{b['confidence']:.3f}",
                        f"{b['accuracy']:.3f}")
    console.print(cal)
    for attr, groups in sorted(r["groups"].items()):
        t = Table("group", "n", "accuracy", "tpr", "fpr", "auroc", title=f"per {attr}")
        for g, c in sorted(groups.items()):
            t.add_row(g, str(c.get("n")), *(("-" if c.get(k) is None else f"{c[k]:.3f}")
                                            for k in ("accuracy", "tpr", "fpr", "auroc")))
        console.print(t)


# ------------------------------------------------------- deployment: SuperNode and audit
@site_app.command("start")
def start(
    site_id: str = typer.Option(..., help="This site's id as it appears in the coordinator's store"),
    data: Path = typer.Option(..., help="The site's own data folder (the task's site format)"),
    superlink: str = typer.Option(..., help="The coordinator's SuperLink as HOST:PORT"),
    root_cert: Path = typer.Option(..., help="The federation's CA certificate (ca.pem from the coordinator)"),
    node_key: Path = typer.Option(..., help="This site's private node key (from `fedcare certs site`)"),
    ledger: Path = typer.Option(..., help="The site's privacy ledger file (SQLite; created, with its folder, if missing)"),
    policy: Optional[Path] = typer.Option(None, help="The site's policy (TOML); without it every run is allowed"),
    audit: Optional[Path] = typer.Option(None, help="Audit log (default: SITE_ID.audit.jsonl next to the ledger)"),
    task: Optional[str] = typer.Option(None, help="Check now that --data loads for this task (and let the "
                                                  "executor load its data and model before the first round)"),
    port: int = typer.Option(9094, help="Local port of the SuperNode's ClientApp API (one per site on a machine)"),
    lora_rank: Optional[int] = typer.Option(None, help="LoRA rank this site trains with (heterogeneous ranks)"),
    workdir: Path = typer.Option(Path("~/.fedcare/site"), help="Folder for the SuperNode's log and node config"),
    threads: int = typer.Option(0, help="torch threads of the site executor (0: torch's default; 1 when "
                                        "several sites share one machine's cores)"),
    per_message: bool = typer.Option(False, help="Let flwr start a fresh ClientApp process for every message "
                                                 "instead of the site's long-lived executor"),
    sets: list[str] = typer.Option([], "--set", help="With --task: the run's data contract to check --data against "
                                                     "before joining, e.g. data.labels=a,b (a family task needs it, "
                                                     "here or in the policy's [contract]; it may only narrow that)"),
) -> None:
    """Join the federation: start this site's SuperNode (runs until Ctrl-C)."""
    from fedcare.server.deploy import SiteSpec, run_site

    ledger.expanduser().parent.mkdir(parents=True, exist_ok=True)   # the ledger's folder, as its help says

    spec = SiteSpec(site_id=site_id, node_key=node_key.expanduser(), data_path=data.expanduser(),
                    ledger=ledger.expanduser(), policy=policy.expanduser() if policy else None,
                    audit=audit.expanduser() if audit else None, lora_rank=lora_rank, port=port, threads=threads)
    run_site(spec, superlink, root_cert.expanduser(), workdir.expanduser(), task=task, echo=typer.echo,
             per_message=per_message, contract=tuple(sets))


@site_app.command("audit")
def audit_cmd(
    log: Path = typer.Option(..., "--log", help="The site's audit log (SITE_ID.audit.jsonl)"),
    verify: bool = typer.Option(False, "--verify", help="Check the hash chain; exit 1 if broken"),
    as_json: bool = typer.Option(False, "--json", help="Print the entries as JSON lines"),
) -> None:
    """Print what left the site, and check the audit log's hash chain."""
    from fedcare.errors import FedcareError

    from .audit import AuditLog

    if not log.is_file():
        raise FedcareError(f"no audit log at {log}")
    book = AuditLog(log)
    entries = list(book.entries())
    for e in entries:
        if as_json:
            typer.echo(json.dumps(e, sort_keys=True))
        elif "_raw" in e:
            typer.echo(f"?    unreadable line: {e['_raw'][:80]}")
        else:
            eps = "-" if e.get("epsilon") is None else f"{e['epsilon']:.4f}"
            typer.echo(f"{e.get('seq'):>4} {_when(e.get('time'))} {e.get('run_id')} r{e.get('round')} "
                       f"{e.get('kind'):<8} {e.get('decision'):<8} {e.get('bytes'):>9} B  eps {eps}  "
                       f"sha256 {str(e.get('payload_sha256'))[:12]}  policy {str(e.get('policy_fingerprint'))[:12]}"
                       + (f"  ({e['reason']})" if e.get("reason") else ""))
    head = book.head()
    if head:
        typer.echo(f"head: seq {head.get('seq')} hash {head.get('hash')}", err=as_json)
    if verify:
        problems = book.verify()
        for p in problems:
            typer.echo(f"BROKEN: {p}", err=True)
        if problems:
            raise typer.Exit(1)
        typer.echo(f"chain intact: {len(entries)} entries", err=as_json)


def _when(ts) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(float(ts), dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if ts else "?"
