"""``fedcare server ...``: the coordinator's commands.

``start`` runs the SuperLink (TLS, SuperNode authentication, persistent state, no
runtime dependency installation) and registers site keys; ``run`` launches a run on it
with the same options as ``fedcare simulate`` and the same SQL store; ``resume``
continues a run whose ServerApp or SuperLink died, from its last committed round.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import List, Optional

import typer

from fedcare.compat import tomllib
from fedcare.errors import FedcareError

server_app = typer.Typer(no_args_is_help=True)

HOME_HELP = "FLWR_HOME holding the SuperLink connection (default: $FEDCARE_FLWR_HOME or ~/.fedcare/flwr-home)"


@server_app.callback()
def server() -> None:
    """Commands for the coordinator: the SuperLink, and runs on it."""


def default_flwr_home() -> Path:
    return Path(os.environ.get("FEDCARE_FLWR_HOME", "~/.fedcare/flwr-home")).expanduser()


@server_app.command("start")
def start(
    tls_dir: Path = typer.Option(..., help="Folder from `fedcare certs init` (ca.pem, server.pem, server.key)"),
    database: Path = typer.Option(Path("~/.fedcare/superlink.db"), help="SuperLink state database (SQLite file)"),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: all interfaces)"),
    port: int = typer.Option(8000, help="HTTPS port of the SuperLink (Fleet, Control and Runtime APIs)"),
    register: List[Path] = typer.Option([], "--register", help="A site's public key (SITE.pub) to register (repeatable)"),
    address: Optional[str] = typer.Option(None, help="Address this machine uses to reach the SuperLink (must match the certificate)"),
    isolation: str = typer.Option("subprocess", help="subprocess: the SuperLink runs ServerApps; process: a separate `flower-superexec` does"),
    flwr_home: Optional[Path] = typer.Option(None, help=HOME_HELP),
    workdir: Path = typer.Option(Path("~/.fedcare/superlink"), help="Folder for the SuperLink's log"),
) -> None:
    """Start the SuperLink and register site keys; runs until Ctrl-C."""
    from .deploy import TlsFiles, run_coordinator

    if isolation not in ("subprocess", "process"):
        raise FedcareError(f"--isolation must be subprocess or process, got '{isolation}'")
    run_coordinator(TlsFiles.from_dir(tls_dir.expanduser()).check(), database.expanduser(), workdir.expanduser(),
                    (flwr_home or default_flwr_home()).expanduser(), host=host, port=port,
                    register=[k.expanduser() for k in register], address=address, isolation=isolation,
                    echo=typer.echo)


@server_app.command("register")
def register_cmd(
    public_key: List[Path] = typer.Argument(..., help="Sites' public keys (SITE.pub)"),
    flwr_home: Optional[Path] = typer.Option(None, help=HOME_HELP),
) -> None:
    """Register site public keys with a running SuperLink."""
    from .deploy import register_site

    home = (flwr_home or default_flwr_home()).expanduser()
    connection(home)
    for key in public_key:
        node = register_site(key, home)
        typer.echo(f"registered {key}: " + (f"node {node}" if node else "already registered"))


def connection(flwr_home: Path) -> dict:
    """The fedcare SuperLink connection in FLWR_HOME, checked reachable over TLS."""
    from .deploy import CONNECTION, check_superlink_reachable

    path = flwr_home / "config.toml"
    try:
        conn = tomllib.loads(path.read_text())["superlink"][CONNECTION]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        raise FedcareError(f"no SuperLink connection '{CONNECTION}' in {path}; start the coordinator with "
                           "`fedcare server start` or pass --flwr-home") from None
    check_superlink_reachable(conn["address"], Path(conn["root-certificates"]))
    return conn


def launch(cfg, store, run_id: str, flwr_home: Path, quiet: bool) -> str:
    """Submit the run to the deployed SuperLink and follow it in the store."""
    from fedcare.flower import flwr_env, flwr_run, stop, stop_flower_run, workdir_for
    from fedcare.launch import follow

    from .deploy import CONNECTION, SITES_FILE

    if (flwr_home / SITES_FILE).exists():   # replies are attributed by registered node
        cfg.runtime.sites_file = str((flwr_home / SITES_FILE).resolve())
    work = workdir_for(run_id)
    log_path = work / f"flwr-run-from-round-{store.last_round(run_id) + 1}.log"
    proc = flwr_run(cfg, flwr_env(flwr_home), CONNECTION, log_path)
    previous = signal.signal(signal.SIGTERM, _interrupt)   # SIGTERM stops the run as Ctrl-C does
    try:
        status = follow(store, run_id, cfg, proc, log_path, quiet=quiet)
    except KeyboardInterrupt:
        stop_flower_run(flwr_env(flwr_home), CONNECTION, log_path)   # its ServerApp too, not only `flwr run`
        stop(proc)
        store.set_status(run_id, "interrupted", "stopped by the user; `fedcare server resume` continues it")
        store.add_event(run_id, "interrupted", "stopped by the user (Ctrl-C or SIGTERM)")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop(proc)
    run = store.get_run(run_id)
    if status != "completed":
        typer.echo(f"run {run_id} {status}: {run.get('message') or ''}\nFlower log: {log_path}\n"
                   f"continue it with: fedcare server resume {run_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"run {run_id} completed: {store.last_round(run_id)} rounds stored in {cfg.runtime.db}")
    typer.echo(f"report:    fedcare report {run_id} --db {cfg.runtime.db} --json")
    return status


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@server_app.command("run")
def run(
    task: str = typer.Option("heart-disease", help="Task name (fedcare config tasks)"),
    sites: Optional[int] = typer.Option(None, help="Number of sites the task expects (tasks with natural sites fix it)"),
    rounds: Optional[int] = typer.Option(None, help="Federated rounds"),
    strategy: Optional[str] = typer.Option(None, help="Aggregation strategy (fedcare config strategies)"),
    seed: Optional[int] = typer.Option(None, help="Seed for initial weights and sampling"),
    db: Optional[str] = typer.Option(None, help="SQLAlchemy URL of the store (default: $FEDCARE_DB or sqlite:///fedcare.db)"),
    set_: List[str] = typer.Option([], "--set", help="key=value run settings (fedcare config keys)"),
    flwr_home: Optional[Path] = typer.Option(None, help=HOME_HELP),
    quiet: bool = typer.Option(False, help="No progress display"),
) -> None:
    """Launch a run on the deployed SuperLink (the sites train on their own data)."""
    from fedcare.launch import register_run, resolve_config

    from .deploy import registered_site_count
    from .store import default_db_url

    home = (flwr_home or default_flwr_home()).expanduser()
    cfg = resolve_config(task, set_, sites=sites, rounds=rounds, seed=seed,
                         **({"strategy.name": strategy} if strategy else {}))
    connection(home)  # before anything lands in the store
    registered = registered_site_count(home)
    if sites is None and registered:   # the sites this coordinator registered, not the task's count
        cfg.sites = registered
        cfg.strategy.min_sites = min(cfg.strategy.min_sites, registered)
        cfg.validate()
    store, run_id = register_run(cfg, db or default_db_url())
    typer.echo(f"run {run_id}: {cfg.task}, {cfg.rounds} rounds, {cfg.strategy.name}, DP {cfg.dp.level}")
    try:
        launch(cfg, store, run_id, home, quiet)
    finally:
        store.close()


@server_app.command("resume")
def resume(
    run_id: str = typer.Argument(..., help="The run to continue (fedcare runs)"),
    db: Optional[str] = typer.Option(None, help="SQLAlchemy URL of the store (default: $FEDCARE_DB or sqlite:///fedcare.db)"),
    flwr_home: Optional[Path] = typer.Option(None, help=HOME_HELP),
    quiet: bool = typer.Option(False, help="No progress display"),
) -> None:
    """Continue a run from its last committed round (a new Flower run, the same fedcare run)."""
    from fedcare.config import RunConfig

    from .store import Store, default_db_url

    home = (flwr_home or default_flwr_home()).expanduser()
    url = db or default_db_url()
    store = Store(url)
    try:
        run = store.get_run(run_id)
        cfg = RunConfig.from_dict(run["config"])
        cfg.runtime.run_id, cfg.runtime.db = run_id, url
        done = store.last_round(run_id)
        if run["status"] == "completed" or done >= cfg.rounds:
            raise FedcareError(f"run {run_id} is already complete ({done} of {cfg.rounds} rounds)")
        connection(home)
        store.set_status(run_id, "pending", f"resuming after round {done}")
        typer.echo(f"run {run_id}: resuming at round {done + 1} of {cfg.rounds}")
        launch(cfg, store, run_id, home, quiet)
    finally:
        store.close()
