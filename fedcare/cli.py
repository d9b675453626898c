"""The `fedcare` command line. User errors print one line and exit with code 2."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import ConfigError, FedcareError

app = typer.Typer(help="fedcare: federated LoRA fine-tuning for hospitals, under differential privacy.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
config_app = typer.Typer(help="Inspect the run configuration keys.", no_args_is_help=True)
app.add_typer(config_app, name="config")

SITE_LINES = 20   # `fedcare report` prints a line per site up to this many sites, then a summary
DB_HELP = "SQLAlchemy URL of the store (default: $FEDCARE_DB or sqlite:///fedcare.db)"
SET_HELP = "Override a setting: --set key=value (dotted keys, e.g. lora.r=16, train.local_steps=50, dp.epsilon=3); `fedcare config keys` lists them"


def _db(db: Optional[str]) -> str:
    from .server.store import default_db_url

    return db or default_db_url()


@app.command()
def simulate(
    task: str = typer.Option("heart-disease", help="Task name (fedcare config tasks)"),
    sites: Optional[int] = typer.Option(None, help="Number of virtual hospitals (tasks with natural sites fix it)"),
    rounds: Optional[int] = typer.Option(None, help="Federated rounds"),
    strategy: Optional[str] = typer.Option(None, help="Aggregation strategy (fedcare config strategies)"),
    seed: Optional[int] = typer.Option(None, help="Seed for splits, initial weights and sampling"),
    db: Optional[str] = typer.Option(None, help=DB_HELP),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    ledger_dir: Optional[Path] = typer.Option(None, help="Keep the virtual sites' privacy ledgers here; a second run on the same folder continues their accounts (default: a fresh temporary folder)"),
    baselines: str = typer.Option("", help="'alone': each site also trains a model on its own data alone (equal compute) and the run ends with the benefit table: alone vs global vs personalised (personalize.method), per site"),
    quiet: bool = typer.Option(False, help="No progress display"),
    ray_address: Optional[str] = typer.Option(None, help="Join this Ray cluster (auto | HOST:PORT; default $RAY_ADDRESS) instead of starting a Ray on this machine"),
    site_cpus: float = typer.Option(1, help="CPUs each virtual hospital holds while it trains (whole CPUs)"),
    site_gpus: Optional[float] = typer.Option(None, help="GPU share each virtual hospital holds (0.5: two share a GPU; default: a share of the GPUs when there are any, else 0)"),
    site: List[str] = typer.Option([], "--site", help="NAME=FOLDER: a virtual hospital reading its own described folder (dataset.toml); repeat for each site"),
) -> None:
    """Run a Flower simulation of TASK with virtual hospitals, on this machine or on a
    Ray cluster (--ray-address)."""
    from .flower import ray_setup
    from .launch import resolve_config, site_sets

    sites = len(site) if site else sites
    cfg = resolve_config(task, [*set_, *_baseline_sets(baselines), *site_sets(site)], sites=sites, rounds=rounds, seed=seed,
                         **({"strategy.name": strategy} if strategy else {}))
    ray = ray_setup(ray_address, site_cpus, site_gpus, cfg.sites)
    run_id = run_simulation(cfg, _db(db), ledger_dir, quiet, ray)
    _print_benefit(run_id, _db(db))
    _print_next_steps(_db(db))


def _baseline_sets(baselines: str) -> list[str]:
    names = [b.strip() for b in baselines.split(",") if b.strip()]
    if any(b != "alone" for b in names):
        raise ConfigError(f"--baselines takes 'alone' (the only baseline), got '{baselines}'")
    return ["personalize.alone=true"] if names else []


def _print_benefit(run_id: str, db_url: str) -> None:
    """The benefit of joining per site (report's ``benefit``), when the run measured it."""
    from .server.report import build_report
    from .server.store import Store

    store = Store(db_url)
    benefit = build_report(store, run_id)["benefit"]
    store.close()
    if not benefit:
        return
    typer.echo(f"benefit of joining, round {benefit['round']}: each site's own test split, "
               f"{benefit['level']:.0%} bootstrap intervals")
    fmt = lambda c: "-" if c is None else (f"{c['value']:.3f}" + ("" if c["lo"] is None else f" [{c['lo']:.3f}-{c['hi']:.3f}]"))  # noqa: E731
    models = [m for m in ("alone", "global", "personal") if any(m in s for s in benefit["sites"].values())]
    typer.echo(f"  {'site':<12} {'n':>5}  {'metric':<18} " + " ".join(f"{m:<22}" for m in models) + " prevalence")
    for site, entry in benefit["sites"].items():
        prevalence = " ".join(f"{k}:{v:.2f}" for k, v in entry["prevalence"].items()) or "suppressed"
        for i, metric in enumerate(entry.get("global", {})):
            typer.echo(f"  {site if i == 0 else '':<12} {entry['n'] if i == 0 else '':>5}  {metric:<18} "
                       + " ".join(f"{fmt(entry.get(m, {}).get(metric)):<22}" for m in models)
                       + (f" {prevalence}" if i == 0 else ""))


# The demo's text run: the frozen-encoder head mode (mean-pooled MiniLM embeddings, a
# linear head), on a subset that keeps it to a few minutes on a 2-core CPU (embedding
# the abstracts once is most of it). bench/text_sweep.py (rows tagged demo-size) chose
# Adam lr 0.01 x 20 local steps of 16: accuracy 0.604, macro-F1 0.512 at this size, seed 42
# (the preset's own head settings are for all the abstracts and 30 rounds).
DEMO_SETS = {"medical-abstracts": ["train.mode=head", "train.optimizer=adam", "train.lr=0.01",
                                   "train.local_steps=20", "train.batch_size=16",
                                   "data.max_train_per_site=200", "data.max_test_per_site=60"]}


@app.command()
def audit(
    task: str = typer.Option("heart-disease", help="Task name (fedcare config tasks)"),
    canaries: Optional[int] = typer.Option(None, help="Canaries per audited site (default: the task's own number)"),
    audited: str = typer.Option("", help="Comma-separated sites that audit (default: every site)"),
    sites: Optional[int] = typer.Option(None, help="Number of virtual hospitals (tasks with natural sites fix it)"),
    rounds: Optional[int] = typer.Option(None, help="Federated rounds"),
    db: Optional[str] = typer.Option(None, help=DB_HELP),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    ledger_dir: Optional[Path] = typer.Option(None, help="Keep the virtual sites' privacy ledgers here"),
    quiet: bool = typer.Option(False, help="No progress display"),
) -> None:
    """Simulate TASK with a privacy audit (Steinke et al. 2023) at the sites: canaries join
    each audited site's training data by a secret coin flip; after the run each site bounds
    its epsilon from below. Prints the bound beside the accountant's epsilon; exit 1 when a
    bound exceeds it (a privacy bug)."""
    from .launch import resolve_config
    from .models.registry import get_task
    from .server.report import build_report
    from .server.store import Store

    m = canaries if canaries is not None else get_task(task).audit_canaries
    cfg = resolve_config(task, [f"audit.canaries={m}", f"audit.sites={audited}", *set_], sites=sites, rounds=rounds)
    run_id = run_simulation(cfg, _db(db), ledger_dir, quiet)
    store = Store(_db(db))
    rows = build_report(store, run_id)["privacy_audit"]
    refusals = [e["message"] for e in store.events(run_id) if e["kind"] in ("site_refused", "evaluate_refused")]
    store.close()
    wanted = [s.strip() for s in audited.split(",") if s.strip()] or get_task(task).site_ids(cfg)
    silent = [s for s in wanted if s not in rows]
    if silent:   # a site that refuses its canaries (more than its model can hold...) sends no bound
        typer.echo(f"audit: no bound from {', '.join(silent)}; "
                   + (f"first refusal: {refusals[0]}" if refusals else f"see `fedcare report {run_id}`"), err=True)
    for site, a in rows.items():
        claimed = "none (no DP)" if a["accountant_epsilon"] is None else f"{a['accountant_epsilon']:.3f}"
        flag = "  PRIVACY BUG: bound > accountant" if a["exceeds"] else ""
        typer.echo(f"  audit {site:<14} accountant epsilon {claimed}  lower bound {a['epsilon_lower_bound']:.3f} "
                   f"({a['correct']}/{a['guesses']} guesses right, {a['canaries']} canaries){flag}")
    if silent or any(a["exceeds"] for a in rows.values()):
        raise typer.Exit(1)


@app.command()
def demo(db: Optional[str] = typer.Option(None, help=DB_HELP),
         rounds: int = typer.Option(3, help="Rounds of each simulation")) -> None:
    """The README's first command: four real hospitals (Fed-Heart-Disease), then a text
    model over four virtual hospitals, both stored in SQL; ends with the text model's
    accuracy and macro-F1 before and after federated training."""
    from .launch import resolve_config

    db_url = _db(db)
    runs = {}
    for task in ("heart-disease", "medical-abstracts"):
        cfg = resolve_config(task, DEMO_SETS.get(task, []), rounds=rounds)
        runs[task] = (cfg, run_simulation(cfg, db_url, None, quiet=False))
    _print_next_steps(db_url)
    _print_before_after(*runs["medical-abstracts"], db_url)


def _print_before_after(cfg, run_id: str, db_url: str) -> None:
    """The global model after the run next to the same model before round 1, on the
    sites' held-out examples together."""
    from .models.registry import get_task
    from .models.training import evaluate_global
    from .server.store import Store

    store = Store(db_url)
    final = store.load_global_state(run_id)
    store.close()
    task = get_task(cfg.task)
    before, n = evaluate_global(task, cfg, None)
    after, _ = evaluate_global(task, cfg, final)
    typer.echo(f"{cfg.task} ({cfg.train.mode} mode), {n} held-out examples of its {cfg.sites} sites:")
    for label, m in (("before federated training", before), (f"after {cfg.rounds} rounds", after)):
        typer.echo(f"  {label:<26} accuracy {m['accuracy']:.3f}  macro-F1 {m['macro_f1']:.3f}")


def run_simulation(cfg, db_url: str, ledger_dir: Optional[Path], quiet: bool, ray=None) -> str:
    from .flower import flwr_run, simulation_superlink, stop, workdir_for
    from .launch import default_ledger_dir, follow, register_run

    store, run_id = register_run(cfg, db_url)
    cfg.site.ledger_dir = str(ledger_dir.resolve()) if ledger_dir else (cfg.site.ledger_dir or default_ledger_dir(run_id))
    typer.echo(f"run {run_id}: {cfg.task}, {cfg.sites} sites, {cfg.rounds} rounds, {cfg.strategy.name}, DP {cfg.dp.level}")
    work = workdir_for(run_id)
    try:
        with simulation_superlink(cfg.sites, work, ray) as (_, env):
            proc = flwr_run(cfg, env, "fedcare", work / "flwr-run.log")
            try:
                status = follow(store, run_id, cfg, proc, work / "flwr-run.log", quiet=quiet)
            finally:
                stop(proc)
    except KeyboardInterrupt:
        store.set_status(run_id, "interrupted", "stopped by the user")
        raise
    run = store.get_run(run_id)
    store.close()
    if status != "completed":
        typer.echo(f"run {run_id} {status}: {run.get('message') or ''}\nFlower log: {work / 'flwr-run.log'}", err=True)
        raise typer.Exit(1)
    typer.echo(f"run {run_id} completed: {run.get('rounds_done', cfg.rounds)} rounds stored in {db_url}")
    typer.echo(f"  report:          fedcare report {run_id} --db {db_url} --json")
    typer.echo(f"  privacy ledgers: {cfg.site.ledger_dir}")
    return run_id


def _print_next_steps(db_url: str) -> None:
    typer.echo(f"database:  {db_url}")
    typer.echo(f"dashboard: fedcare dashboard --db {db_url}   then open http://127.0.0.1:8501")


@app.command()
def runs(db: Optional[str] = typer.Option(None, help=DB_HELP),
         as_json: bool = typer.Option(False, "--json", help="JSON list")) -> None:
    """List the runs in the store."""
    from .server.store import Store

    store = Store(_db(db))
    rows = store.list_runs()
    store.close()
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    if not sys.stdout.isatty():   # piped: whole ids, tab-separated, nothing cut
        for r in rows:
            typer.echo("\t".join(str(v) for v in _run_cells(r)))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("task", "strategy", "status", "rounds", "sites", "DP", "started")
    table.add_column("run", no_wrap=True, min_width=len(max((r["run_id"] for r in rows), key=len, default="")))
    table.columns.insert(0, table.columns.pop())   # the run id first, never cut or wrapped
    for r in rows:
        cells = _run_cells(r)
        table.add_row(*cells)
    Console().print(table)


def _run_cells(r: dict) -> list[str]:
    return [r["run_id"], r["task"], r["strategy"], r["status"],
            f"{r.get('rounds_done', '')}/{r.get('rounds_planned', '')}", str(r.get("sites", "")),
            str(r.get("dp", "")), _time(r.get("started_at"))]


@app.command()
def report(run_id: str = typer.Argument(..., help="Run id (fedcare runs)"),
           db: Optional[str] = typer.Option(None, help=DB_HELP),
           as_json: bool = typer.Option(False, "--json", help="The whole run as one JSON document")) -> None:
    """Report one run: configuration, every round, final metrics, privacy, fairness."""
    from .server.report import build_report
    from .server.store import Store

    store = Store(_db(db))
    rep = build_report(store, run_id)
    store.close()
    if as_json:
        typer.echo(json.dumps(rep, indent=2))
        return
    typer.echo(f"{rep['run_id']}  {rep['task']}  {rep['strategy']}  {rep['status']}  rounds={len(rep['rounds'])}")
    final = rep.get("final", {})
    per_site, privacy = final.get("per_site", {}), rep.get("privacy", {})
    if len(per_site) > SITE_LINES:   # hundreds of sites: a summary naming the worst, not a line each
        accs = sorted(m["accuracy"] for m in per_site.values() if isinstance(m.get("accuracy"), float))
        if accs:
            typer.echo(f"  {len(per_site)} sites evaluated in round {final.get('round')}: accuracy min {accs[0]:.4f}  "
                       f"median {accs[len(accs) // 2]:.4f}  max {accs[-1]:.4f}")
        typer.echo("  worst sites: " + ", ".join(f"{w['site']} ({w['value']:.4f})" for w in final.get("worst_sites", [])))
    for site, m in sorted(per_site.items()) if len(per_site) <= SITE_LINES else ():
        typer.echo(f"  {site:<14} " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(m.items()) if isinstance(v, float)))
    if len(privacy) > SITE_LINES:
        top = sorted(privacy.items(), key=lambda kv: -(kv[1].get("run_epsilon") or 0))[:5]
        typer.echo(f"  privacy: {len(privacy)} sites; highest run epsilon: "
                   + ", ".join(f"{site} ({p.get('run_epsilon')})" for site, p in top))
    for site, p in sorted(privacy.items()) if len(privacy) <= SITE_LINES else ():
        typer.echo(f"  privacy {site:<14} epsilon lifetime={p.get('epsilon')} run={p.get('run_epsilon')} budget={p.get('budget') or 'no cap'}")
    for site, a in rep.get("privacy_audit", {}).items():
        typer.echo(f"  audit   {site:<14} lower bound={a['epsilon_lower_bound']:.3f} accountant={a['accountant_epsilon']}"
                   + ("  PRIVACY BUG" if a["exceeds"] else ""))


@app.command()
def export(run_id: str = typer.Argument(..., help="Run id (fedcare runs)"),
           out: Path = typer.Option(..., help="New (or empty) folder for the model, its card and fedcare.json"),
           round_: Optional[int] = typer.Option(None, "--round", help="Export this committed round (default: the last round of a completed run)"),
           db: Optional[str] = typer.Option(None, help=DB_HELP)) -> None:
    """Export a run's global model with its model card (peft adapter or safetensors)."""
    from .server.export import export_run
    from .server.store import Store

    store = Store(_db(db))
    try:
        meta = export_run(store, run_id, out, round_)
    finally:
        store.close()
    typer.echo(f"exported {run_id} round {meta['round']} to {out}: {', '.join(meta['files'])}, README.md, fedcare.json")


@app.command()
def predict(model: Path = typer.Option(..., help="An exported model folder (fedcare export)"),
            data: Path = typer.Option(..., help="The site's data folder (the task's site format)"),
            out: Path = typer.Option(..., help="Predictions file: .csv or .parquet"),
            site: Optional[str] = typer.Option(None, help="Site id within the folder (default: the whole folder as one site)"),
            split: str = typer.Option("all", help="all, train or test rows of the folder")) -> None:
    """Batch predictions at a site: row id, predicted class, class probabilities."""
    from .client.evaluate import predict_to_file

    n = predict_to_file(model, data, out, site=site, split=split)
    typer.echo(f"{n} predictions written to {out}")


@config_app.command("keys")
def config_keys() -> None:
    """Every --set key with its default and type."""
    from .config import RunConfig

    for key, value in RunConfig().to_flat(include_runtime=False).items():
        typer.echo(f"{key:<32} {type(value).__name__:<6} {value!r}")


@config_app.command("show")
def config_show(
    task: str = typer.Option("heart-disease", help="Task name (fedcare config tasks)"),
    strategy: Optional[str] = typer.Option(None, help="Aggregation strategy (default: fedavg)"),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """The settings a run of TASK would use: RunConfig's defaults, the task's for its
    training mode (and under DP-SGD), the strategy's, then yours; marks what differs
    from RunConfig's defaults."""
    from .config import RunConfig
    from .launch import resolve_config

    cfg = resolve_config(task, set_, **({"strategy.name": strategy} if strategy else {}))
    base = RunConfig().to_flat(include_runtime=False)
    for key, value in cfg.to_flat(include_runtime=False).items():
        mark = "*" if base.get(key) != value else " "
        typer.echo(f"{mark} {key:<32} {value!r}")


@config_app.command("flower-toml")
def config_flower_toml() -> None:
    """The defaults as pyproject.toml's [tool.flwr.app.config] (paste after a config change)."""
    from .config import flower_app_config_toml

    typer.echo(flower_app_config_toml(), nl=False)


@config_app.command("tasks")
def config_tasks() -> None:
    """The tasks fedcare can run."""
    from .models.registry import task_names

    typer.echo("\n".join(task_names()))


@config_app.command("strategies")
def config_strategies() -> None:
    """The aggregation strategies by name."""
    from .strategies.registry import strategy_names

    typer.echo("\n".join(strategy_names()))


def _time(ts) -> str:
    if ts is None:
        return ""
    import datetime as dt

    return dt.datetime.fromtimestamp(float(ts), dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if isinstance(ts, (int, float)) else str(ts)


def _mount_subcommands() -> None:
    """Sub-commands owned by the site, coordinator, certificate and dashboard modules."""
    import importlib

    for module, attr, name in (("fedcare.client.cli", "site_app", "site"),
                               ("fedcare.server.cli", "server_app", "server"),
                               ("fedcare.certs", "certs_app", "certs")):
        try:
            app.add_typer(getattr(importlib.import_module(module), attr), name=name)
        except ModuleNotFoundError as err:  # pragma: no cover - only while a part is missing
            if err.name != module:
                raise
    try:
        from .dashboard.cli import dashboard_app  # `fedcare dashboard [...]` and `... hash-password`
        app.add_typer(dashboard_app, name="dashboard")
    except ModuleNotFoundError as err:  # pragma: no cover
        if err.name != "fedcare.dashboard.cli":
            raise


_mount_subcommands()


def main() -> None:
    try:
        app()
    except FedcareError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
