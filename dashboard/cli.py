"""``fedcare dashboard``: serve the Streamlit dashboard on a store.

``fedcare dashboard [--db URL] [--port P] [--host H]`` starts ``streamlit run
dashboard/app.py`` bound to 127.0.0.1 by default; any other address needs a login
(see ``fedcare.dashboard.auth``). ``fedcare dashboard hash-password`` makes the hash.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

from fedcare.errors import ConfigError

APP = Path(__file__).with_name("app.py")
DB_ENV = "FEDCARE_DB"

dashboard_app = typer.Typer(help="The coordinator's dashboard (Streamlit).", add_completion=False)


def streamlit_command(app: Path, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(app),
            "--server.address", host, "--server.port", str(port), "--server.headless", "true",
            "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
            "--server.runOnSave", "false", "--client.toolbarMode", "viewer",
            "--server.enableStaticServing", "false", "--theme.base", "light",
            # Streamlit's gc.collect() after every script run: ~0.15 s of CPU per page load with a
            # large store's cached results, holding the GIL while the page's last messages wait
            "--runner.postScriptGC", "false"]


def prepare(db: str | None, port: int, host: str) -> tuple[list[str], dict[str, str]]:
    """Check everything a start needs; (command, environment). Raises FedcareError."""
    from fedcare.server.queries import connect
    from fedcare.server.store import Store, default_db_url

    from .auth import require_login_for

    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a TCP port (1-65535)")
    require_login_for(host)
    url = db or default_db_url()
    connect(url).dispose()        # says plainly when the database is missing or unreachable
    Store(url).close()            # upgrades an older schema (the app itself only reads)
    _check_port_free(host, port)
    return streamlit_command(APP, host, port), {**os.environ, DB_ENV: url}


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ConfigError(f"cannot listen on {host}:{port} ({err.strerror}); pass another --port") from None


def dashboard_command(
    db: Optional[str] = typer.Option(None, help="SQLAlchemy URL of the store (default: $FEDCARE_DB or sqlite:///fedcare.db)"),
    port: int = typer.Option(8501, help="TCP port"),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; anything but loopback needs a login"),
) -> None:
    """Serve the dashboard (Ctrl-C stops it)."""
    command, env = prepare(db, port, host)
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"dashboard on http://{shown}:{port}  (store: {env[DB_ENV].split('@')[-1]}; Ctrl-C stops it)")
    proc = subprocess.Popen(command, env=env)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        code = proc.wait(timeout=10)
    if code not in (0, -15):
        raise typer.Exit(code)


@dashboard_app.callback(invoke_without_command=True)
def _dashboard(ctx: typer.Context,
               db: Optional[str] = typer.Option(None, help="SQLAlchemy URL of the store (default: $FEDCARE_DB or sqlite:///fedcare.db)"),
               port: int = typer.Option(8501, help="TCP port"),
               host: str = typer.Option("127.0.0.1", help="Address to listen on; anything but loopback needs a login")) -> None:
    """Serve the dashboard on a store (Ctrl-C stops it)."""
    if ctx.invoked_subcommand is None:
        dashboard_command(db=db, port=port, host=host)


@dashboard_app.command("hash-password")
def hash_password_command(
    stdin: bool = typer.Option(False, "--stdin", help="Read the password from standard input"),
) -> None:
    """Print a scrypt hash of a password for FEDCARE_DASHBOARD_PASSWORD_HASH."""
    from .auth import HASH_ENV, hash_password

    if stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("Dashboard password", hide_input=True, confirmation_prompt=True)
    stored = hash_password(password)
    typer.echo(stored)
    typer.echo(f"# then: export {HASH_ENV}='{stored}'", err=True)
