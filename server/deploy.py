"""Deployment processes: the coordinator's SuperLink and the sites' SuperNodes.

The SuperLink runs with TLS, SuperNode authentication, a persistent state database and
runtime dependency installation off (``flower-superlink --ssl-ca-certfile
--ssl-certfile --ssl-keyfile --enable-supernode-auth --database PATH
--disable-runtime-dependency-installation``); flwr 1.41 serves the Fleet, Control and
Runtime APIs over HTTPS on one port. Site public keys are registered with ``flwr
supernode register KEY.pub CONNECTION`` through a ``config.toml`` connection in a
FLWR_HOME that trusts the federation's CA. A SuperNode starts with
``--root-certificates``, ``--auth-supernode-private-key``, its own runtime ``--port``
and a node-config TOML file (site-id, data-path, ledger, policy, audit, lora-rank).

Every process is started in its own session, with its log in a file; ``stop``
ends it and the helper processes Flower spawns under it (SuperExec, ServerApp,
ClientApp), which Flower detaches into sessions of their own.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from fedcare.certs import (CA_CERT, SERVER_CERT, SERVER_KEY, check_root_certificate,
                           check_server_material, load_node_private_key, load_node_public_key)
from fedcare.errors import FedcareError

CONNECTION = "fedcare"   # name of the SuperLink connection fedcare writes into FLWR_HOME


class DeploymentError(FedcareError):
    """A SuperLink or SuperNode could not start, connect or register."""


# ------------------------------------------------------------------------ processes
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def descendants(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


@dataclass
class Managed:
    """A process this module started, with its log file."""

    name: str
    proc: subprocess.Popen
    log_path: Path
    info: dict = field(default_factory=dict)
    log_offset: int = 0   # where this process's output starts in the (appended) log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        """What this process wrote to its log (not an earlier process's lines)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def find(self, needle: str) -> list[int]:
        """Descendant processes whose command line contains ``needle`` (e.g. flwr-serverapp)."""
        return [p for p in descendants(self.pid) if needle in _cmdline(p) and _alive(p)]

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process and everything below it; SIGKILL what is left after ``grace``."""
        tree = descendants(self.pid)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
        _signal(tree, signal.SIGTERM)
        deadline = time.time() + grace
        while time.time() < deadline and (self.proc.poll() is None or any(_alive(p) for p in tree)):
            time.sleep(0.1)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        _signal([p for p in tree if _alive(p)], signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def kill(self) -> None:
        """Kill at once (a crash), leaving no time to clean up."""
        tree = descendants(self.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        _signal(tree, signal.SIGKILL)
        self.proc.wait(10)


def _env(flwr_home: Path | None = None) -> dict[str, str]:
    from fedcare.flower import flwr_env

    env = flwr_env(Path(flwr_home) if flwr_home else Path(os.environ.get("FLWR_HOME", "~/.flwr")).expanduser())
    return env


def _spawn(name: str, cmd: list[str], log_path: Path, env: dict[str, str]) -> Managed:
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        offset = log.tell()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    return Managed(name, proc, log_path, log_offset=offset)


def _exe(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise DeploymentError(f"'{name}' is not on PATH; install fedcare (it brings flwr 1.41) in this environment")
    return path


# ------------------------------------------------------------------------- TLS checks
@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def from_dir(cls, folder: Path) -> "TlsFiles":
        folder = Path(folder)
        return cls(folder / CA_CERT, folder / SERVER_CERT, folder / SERVER_KEY)

    def check(self) -> "TlsFiles":
        check_server_material(self.ca_cert, self.server_cert, self.server_key)
        return self


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise DeploymentError(f"SuperLink address '{address}' must be HOST:PORT")
    return host.strip("[]"), int(port)


def check_superlink_reachable(address: str, root_cert: Path, timeout: float = 10.0) -> None:
    """Open a TLS connection to ``address`` trusting only ``root_cert``; raise a
    one-line ``DeploymentError`` saying which side is wrong."""
    host, port = split_address(address)
    ctx = ssl.create_default_context(cafile=str(root_cert))
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=host):
                return
    except ssl.SSLCertVerificationError as err:
        raise DeploymentError(f"the SuperLink at {address} presented a certificate that {root_cert} does not "
                              f"verify ({err.verify_message}); ask the coordinator for the federation's CA") from None
    except ssl.SSLError as err:
        raise DeploymentError(f"TLS with the SuperLink at {address} failed: {err.reason or err}") from None
    except OSError as err:
        raise DeploymentError(f"cannot reach the SuperLink at {address}: {err.strerror or err}") from None


def wait_for_port(host: str, port: int, proc: Managed, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not proc.alive():
            raise DeploymentError(f"{proc.name} exited with code {proc.proc.returncode}: "
                                  f"{last_error(proc.log())}; log: {proc.log_path}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.2)
    raise DeploymentError(f"{proc.name} did not open {host}:{port} within {timeout:.0f} s; log: {proc.log_path}")


def last_error(log: str) -> str:
    """The most telling line of a Flower process log."""
    lines = [l.strip() for l in log.splitlines() if l.strip()]
    for key in ("CERTIFICATE_VERIFY_FAILED", "Failed to activate", "Address already in use",
                "Unable to parse", "does not point to a file", "ERROR", "Error"):
        hits = [l for l in lines if key in l]
        if hits:
            return hits[-1][:300]
    return lines[-1][:300] if lines else "no output"


# ---------------------------------------------------------------------------- SuperLink
def superlink_command(tls: TlsFiles, database: Path, host: str, port: int,
                      isolation: str = "subprocess") -> list[str]:
    return [_exe("flower-superlink"),
            "--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
            "--ssl-keyfile", str(tls.server_key),
            "--enable-supernode-auth", "--database", str(database),
            "--disable-runtime-dependency-installation",
            "--isolation", isolation, "--host", host, "--port", str(port)]


def start_superlink(tls: TlsFiles, database: Path, workdir: Path, *, host: str = "127.0.0.1",
                    port: int = 8000, isolation: str = "subprocess", flwr_home: Path | None = None,
                    timeout: float = 60.0) -> Managed:
    """Start the SuperLink and wait until it accepts TLS connections."""
    tls.check()
    database = Path(database)
    database.parent.mkdir(parents=True, exist_ok=True)
    proc = _spawn("flower-superlink", superlink_command(tls, database, host, port, isolation),
                  Path(workdir) / "superlink.log", _env(flwr_home))
    try:
        probe = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
        wait_for_port(probe, port, proc, timeout)
    except BaseException:
        proc.stop()
        raise
    proc.info.update(host=host, port=port, database=str(database))
    return proc


def write_connection(flwr_home: Path, address: str, root_cert: Path, name: str = CONNECTION) -> Path:
    """Add (or replace) the SuperLink connection ``name`` in ``FLWR_HOME/config.toml``
    and make it the default; other connections in the file are kept."""
    from fedcare.compat import tomllib

    flwr_home = Path(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    doc: dict = {}
    if path.exists():
        try:
            doc = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise DeploymentError(f"{path} is not valid TOML ({err}); fix or remove it") from None
    links = doc.setdefault("superlink", {})
    links[name] = {"address": address, "root-certificates": str(Path(root_cert).resolve())}
    links["default"] = name
    path.write_text(tomli_w.dumps(doc))
    return path


def register_site(public_key: Path, flwr_home: Path, name: str = CONNECTION) -> int | None:
    """Register a site's public key with the SuperLink; return its node id (None if the
    key was registered before: registration is idempotent)."""
    load_node_public_key(public_key)  # one-line error naming the file if it is unusable
    proc = subprocess.run([_exe("flwr"), "supernode", "register", str(public_key), name, "--format", "json"],
                          env=_env(flwr_home), capture_output=True, text=True, timeout=120)
    try:
        reply = json.loads(proc.stdout[proc.stdout.index("{"):])
    except ValueError:
        raise DeploymentError(f"`flwr supernode register {public_key}` failed: "
                              f"{last_error(proc.stdout + proc.stderr)}") from None
    if reply.get("success"):
        record_site(flwr_home, int(reply["node-id"]), Path(public_key).stem)
        return int(reply["node-id"])
    message = str(reply.get("error-message", "")).strip().splitlines()
    if any("already in use" in m for m in message):
        return None
    raise DeploymentError(f"registering {public_key} failed: {message[-1] if message else proc.stderr.strip()}")


SITES_FILE = "fedcare-sites.json"   # in FLWR_HOME: node id -> site id, read by the ServerApp


def record_site(flwr_home: Path, node_id: int, site_id: str) -> Path:
    """Bind a registered node to the site whose key it holds (``<site_id>.pub``): the
    server attributes that node's replies to this site id, whatever they claim."""
    path = Path(flwr_home) / SITES_FILE
    sites = json.loads(path.read_text()) if path.exists() else {}
    sites[str(node_id)] = site_id
    path.write_text(json.dumps(sites, indent=1, sort_keys=True))
    return path


def registered_site_count(flwr_home: Path) -> int:
    """How many sites the coordinator registered with fedcare (0: none recorded)."""
    path = Path(flwr_home) / SITES_FILE
    try:
        return len(set(json.loads(path.read_text()).values())) if path.exists() else 0
    except (OSError, ValueError, AttributeError):
        return 0


def registered_nodes(flwr_home: Path, name: str = CONNECTION) -> list[dict]:
    proc = subprocess.run([_exe("flwr"), "supernode", "ls", name, "--format", "json"],
                          env=_env(flwr_home), capture_output=True, text=True, timeout=120)
    try:
        return list(json.loads(proc.stdout[proc.stdout.index("{"):]).get("nodes", []))
    except ValueError:
        raise DeploymentError(f"`flwr supernode ls` failed: {last_error(proc.stdout + proc.stderr)}") from None


# ---------------------------------------------------------------------------- SuperNode
@dataclass(frozen=True)
class SiteSpec:
    site_id: str
    node_key: Path
    data_path: Path | None = None
    ledger: Path | None = None
    policy: Path | None = None
    audit: Path | None = None
    lora_rank: int | None = None
    port: int = 9094                 # the SuperNode's own runtime (ClientApp IO) API port
    host: str = "127.0.0.1"
    executor_secret: Path | None = None  # set: `--isolation process`, tasks run by fedcare's executor
    threads: int = 0                     # the executor's torch threads (0: torch's default)

    def node_config(self) -> dict[str, str | int]:
        cfg: dict[str, str | int] = {"site-id": self.site_id}
        for key, value in (("data-path", self.data_path), ("ledger", self.ledger),
                           ("policy", self.policy), ("audit", self.audit)):
            if value:
                cfg[key] = str(Path(value).resolve())
        if self.lora_rank:
            cfg["lora-rank"] = int(self.lora_rank)
        return cfg


def check_site(spec: SiteSpec, root_cert: Path) -> None:
    """Everything a site can get wrong before it connects, as one-line errors."""
    check_root_certificate(root_cert)
    load_node_private_key(spec.node_key)
    if spec.data_path is not None and not Path(spec.data_path).exists():
        raise DeploymentError(f"site data folder {spec.data_path} does not exist")
    if spec.policy is not None:
        from fedcare.client.policy import SitePolicy

        SitePolicy.load(spec.policy)
    if spec.ledger is not None and not Path(spec.ledger).parent.is_dir():
        raise DeploymentError(f"the ledger's folder {Path(spec.ledger).parent} does not exist")


def write_secret(path: Path) -> Path:
    """A fresh SuperExec auth secret (raw bytes, 0600) shared by the SuperNode and the
    site's executor: only a holder can claim the SuperNode's tasks."""
    import secrets

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_bytes(32))
    return path


def start_executor(spec: "SiteSpec", workdir: Path, flwr_home: Path | None = None,
                   timeout: float = 300.0, warm_task: str | None = None) -> Managed:
    """Start the site's executor (``fedcare.client.executor``) for the SuperNode of
    ``spec`` and wait until torch, fedcare and the app are loaded (and, with
    ``warm_task``, the site's data and that task's model)."""
    import sys

    cmd = [sys.executable, "-m", "fedcare.client.executor", "--runtime-api", f"{spec.host}:{spec.port}",
           "--secret-file", str(spec.executor_secret)]
    if spec.threads:
        cmd += ["--threads", str(spec.threads)]
    if warm_task and spec.data_path:
        cmd += ["--warm-task", warm_task, "--site-id", spec.site_id, "--data-path", str(Path(spec.data_path).resolve())]
        if spec.lora_rank:
            cmd += ["--lora-rank", str(spec.lora_rank)]
    proc = _spawn(f"site executor {spec.site_id}", cmd, Path(workdir) / f"{spec.site_id}.executor.log",
                  _env(flwr_home))
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not proc.alive():
            raise DeploymentError(f"the site executor exited ({proc.proc.returncode}): {last_error(proc.log())}; "
                                  f"log: {proc.log_path}")
        if "claiming tasks" in proc.log():
            return proc
        time.sleep(0.2)
    proc.stop()
    raise DeploymentError(f"the site executor did not start within {timeout:.0f} s; log: {proc.log_path}")


def supernode_command(spec: SiteSpec, superlink: str, root_cert: Path, node_config: Path,
                      max_retries: int | None = None, max_wait: float | None = None) -> list[str]:
    import sys

    # with fedcare's executor: flwr's SuperNode with its idle sleeps shortened (fedcare.client.supernode)
    launcher = [sys.executable, "-m", "fedcare.client.supernode"] if spec.executor_secret else [_exe("flower-supernode")]
    cmd = [*launcher, "--superlink", superlink,
           "--root-certificates", str(Path(root_cert).resolve()),
           "--auth-supernode-private-key", str(Path(spec.node_key).resolve()),
           "--host", spec.host, "--port", str(spec.port),
           "--node-config", str(node_config)]
    if spec.executor_secret is not None:  # fedcare's executor claims the tasks (no process per message)
        cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(Path(spec.executor_secret).resolve())]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    if max_wait is not None:
        cmd += ["--max-wait-time", str(max_wait)]
    return cmd


def start_supernode(spec: SiteSpec, superlink: str, root_cert: Path, workdir: Path, *,
                    max_retries: int | None = None, max_wait: float | None = None,
                    flwr_home: Path | None = None, precheck: bool = True) -> Managed:
    """Start a site's SuperNode (returns at once; ``wait_joined`` waits for its node id)."""
    check_site(spec, root_cert)
    if precheck:
        check_superlink_reachable(superlink, root_cert)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    node_config = workdir / f"{spec.site_id}.node-config.toml"
    node_config.write_text(tomli_w.dumps(spec.node_config()))
    cmd = supernode_command(spec, superlink, root_cert, node_config, max_retries, max_wait)
    proc = _spawn(f"flower-supernode {spec.site_id}", cmd, workdir / f"{spec.site_id}.supernode.log",
                  _env(flwr_home))
    proc.info.update(site_id=spec.site_id, port=spec.port)
    return proc


# flwr 1.41 keeps a node online HEARTBEAT_PATIENCE (2) x its 30 s heartbeat interval after
# its last heartbeat, and refuses to activate it again until then: a site restarted right
# after its process was killed is refused for up to a minute.
ACTIVATION_PATIENCE_S = 75


def join(node: Managed, timeout: float, echo=print) -> tuple[int, Managed]:
    """Wait until ``node`` joins; while the SuperLink refuses to activate it, start it
    again every 5 s (up to ``ACTIVATION_PATIENCE_S``): an earlier process of this site
    that was killed still counts as online until its heartbeat expires.
    Returns (node id, the SuperNode process that joined)."""
    deadline = time.time() + max(timeout, ACTIVATION_PATIENCE_S)
    respawn = node.info.get("respawn")
    while True:
        try:
            return wait_joined(node, timeout), node
        except DeploymentError:
            if respawn is None or "Failed to activate SuperNode" not in node.log() or time.time() > deadline:
                raise
        echo("the coordinator still counts an earlier process of this site as online (it stopped without "
             "leaving) or does not know this key yet; trying again in 5 s")
        node.stop()
        time.sleep(5)
        node = respawn()


def wait_joined(proc: Managed, timeout: float = 60.0) -> int:
    """Wait until the SuperNode reports its node id; explain a refusal in one line."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        log = proc.log()
        for line in log.splitlines():
            if "SuperNode ID:" in line:
                node = int(line.rsplit("SuperNode ID:", 1)[1].split()[0])
                proc.info["node_id"] = node
                return node
        if not proc.alive():
            raise DeploymentError(explain_supernode_exit(proc))
        time.sleep(0.2)
    raise DeploymentError(f"{proc.name} did not join within {timeout:.0f} s; log: {proc.log_path}")


def explain_supernode_exit(proc: Managed) -> str:
    log = proc.log()
    if "CERTIFICATE_VERIFY_FAILED" in log:
        why = "the SuperLink's TLS certificate is not signed by the given root certificate"
    elif "Failed to activate SuperNode" in log:
        why = ("the SuperLink refused to activate this node: its public key is not registered with the "
               "coordinator, or an earlier process with this key still counts as online (for up to "
               f"{ACTIVATION_PATIENCE_S} s after it stopped without leaving)")
    elif "Unable to parse the private key" in log:
        why = "the node key is not an OpenSSH EC private key"
    else:
        why = last_error(log)
    return f"{proc.name} stopped (exit {proc.proc.returncode}): {why}; log: {proc.log_path}"


# ------------------------------------------------------------------- foreground commands
@contextlib.contextmanager
def _terminate_on_sigterm():
    """Turn SIGTERM into KeyboardInterrupt so a stopped command cleans up like Ctrl-C."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _hold(proc: Managed, explain) -> None:
    """Block while ``proc`` lives; raise a one-line error if it stops by itself."""
    while proc.alive():
        time.sleep(0.5)
    raise DeploymentError(explain(proc))


#: seconds before each try to restart a dead site executor; when every try fails, the
#: SuperNode is stopped so that the coordinator sees the site leave
RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0)
STABLE_S = 60.0   # an executor that lived this long starts the backoff afresh when it dies


def supervise(node: Managed, helper: Managed | None, echo=print,
              backoff: tuple[float, ...] = RESTART_BACKOFF_S) -> None:
    """Block while the SuperNode lives, restarting its executor when it dies (with
    ``backoff``, each restart logged through ``echo``). The executor in service is kept
    in ``node.info["executor"]``. When no try brings it back, or the executor keeps
    dying within ``STABLE_S`` of a restart until the tries are spent, stop the SuperNode
    (a SuperNode without an executor would accept tasks it never answers) and raise."""
    node.info["executor"] = helper
    tries, since = 0, time.time()
    while node.alive():
        helper = node.info["executor"]
        if helper is None or helper.alive():
            time.sleep(0.5)
            continue
        if time.time() - since > STABLE_S:
            tries = 0
        echo(f"site executor stopped (exit {helper.proc.returncode}): {last_error(helper.log())}; "
             f"restarting it (log {helper.log_path})")
        while True:
            if tries >= len(backoff):
                node.stop()
                raise DeploymentError(f"the site executor could not be kept running ({len(backoff)} restarts "
                                      f"failed or died at once); the SuperNode was stopped so the coordinator "
                                      f"sees this site leave; log: {helper.log_path}")
            time.sleep(backoff[tries])
            tries += 1
            respawn = helper.info["respawn"]
            try:
                helper = respawn()
            except DeploymentError as err:
                echo(f"site executor restart {tries}/{len(backoff)} failed: {err}")
                continue
            helper.info["respawn"] = respawn
            break
        node.info["executor"], since = helper, time.time()
        echo(f"site executor restarted (try {tries}/{len(backoff)}), pid {helper.pid}")
    raise DeploymentError(explain_supernode_exit(node))


def connect_address(host: str, port: int) -> str:
    """How this machine reaches a SuperLink bound to ``host``."""
    return f"127.0.0.1:{port}" if host in ("0.0.0.0", "", "127.0.0.1") else f"{host}:{port}"


def run_coordinator(tls: TlsFiles, database: Path, workdir: Path, flwr_home: Path, *, host: str,
                    port: int, register: list[Path], address: str | None = None,
                    isolation: str = "subprocess", echo=print) -> None:
    """``fedcare server start``: SuperLink up, connection written, site keys registered,
    then hold until interrupted; the SuperLink is stopped on the way out."""
    for key in register:
        load_node_public_key(key)
    with _terminate_on_sigterm():
        link = start_superlink(tls, database, workdir, host=host, port=port, isolation=isolation,
                               flwr_home=flwr_home)
        try:
            address = address or connect_address(host, port)
            conf = write_connection(flwr_home, address, tls.ca_cert)
            echo(f"SuperLink listening on {host}:{port} (TLS, SuperNode authentication on); "
                 f"state {database}; log {link.log_path}")
            echo(f"connection '{CONNECTION}' -> {address} written to {conf}")
            for key in register:
                node = register_site(key, flwr_home)
                echo(f"registered {key}: " + (f"node {node}" if node else "already registered"))
            echo("ready; Ctrl-C stops the SuperLink")
            _hold(link, lambda p: f"flower-superlink stopped (exit {p.proc.returncode}): "
                                  f"{last_error(p.log())}; log: {p.log_path}")
        except KeyboardInterrupt:
            echo("stopping the SuperLink")
        finally:
            link.stop()


def check_site_data(task: str, data_path: Path, site_id: str = "site", contract: tuple[str, ...] = ()) -> int:
    """Load the site's data the way the ClientApp will; return its training examples.
    ``contract``: the run's data contract as --set items (data.labels=..., data.features=...)."""
    from fedcare.config import RunConfig
    from fedcare.models.registry import get_task

    from fedcare.models.sitedata import has_description

    cfg = RunConfig(task=task).apply_sets(list(contract))
    if has_description(data_path):   # before any run: the description's labels stand in for the contract
        from fedcare.client.check import check_folder

        return check_folder(str(data_path), task, cfg, cfg.site.min_group_size)["rows"]["train"]
    cfg.data.path = str(Path(data_path).resolve())
    split = get_task(task).load_site(site_id, cfg)
    return len(split.train)


def start_site(spec: SiteSpec, superlink: str, root_cert: Path, workdir: Path, *, executor: bool = True,
               flwr_home: Path | None = None, warm_task: str | None = None,
               **supernode_args) -> tuple[Managed, Managed | None]:
    """A site's SuperNode and, with ``executor`` (the default), the long-lived executor
    that runs its ClientApp tasks; without it flwr starts a ``flwr-clientapp`` process
    per message. Returns (supernode, executor or None)."""
    import dataclasses

    if executor:
        secret = write_secret(Path(workdir) / f"{spec.site_id}.superexec.secret")
        spec = dataclasses.replace(spec, executor_secret=secret)
    def respawn() -> Managed:
        return start_supernode(spec, superlink, root_cert, workdir, flwr_home=flwr_home, **supernode_args)

    node = respawn()
    node.info["respawn"] = respawn
    if not executor:
        return node, None
    try:
        helper = start_executor(spec, workdir, flwr_home, warm_task=warm_task)
    except BaseException:
        node.stop()
        raise
    # the same secret: the SuperNode trusts a restarted executor as it trusted this one
    helper.info["respawn"] = lambda: start_executor(spec, workdir, flwr_home, warm_task=warm_task)
    return node, helper


def run_site(spec: SiteSpec, superlink: str, root_cert: Path, workdir: Path, *,
             flwr_home: Path | None = None, task: str | None = None, echo=print,
             join_timeout: float = 120.0, per_message: bool = False, contract: tuple[str, ...] = ()) -> None:
    """``fedcare site start``: check everything, start the SuperNode and the site's
    executor, report the node id, hold until interrupted; explain in one line if it is
    refused or stops."""
    check_site(spec, root_cert)
    if task and spec.data_path:
        if spec.policy is not None:   # the policy's [contract], which --set may only narrow
            from fedcare.client.policy import SitePolicy

            contract = SitePolicy.load(spec.policy).contract_sets(contract)
        n = check_site_data(task, spec.data_path, spec.site_id, contract)
        echo(f"{spec.data_path}: {n} training examples for task {task}")
    check_superlink_reachable(superlink, root_cert)
    with _terminate_on_sigterm():
        node, helper = start_site(spec, superlink, root_cert, workdir, executor=not per_message,
                                  flwr_home=flwr_home, warm_task=task, precheck=False, max_retries=None)
        try:
            if helper is not None:
                echo(f"site executor ready (model and data stay loaded between rounds); log {helper.log_path}")
            node_id, node = join(node, join_timeout, echo)
            echo(f"site {spec.site_id} joined the federation at {superlink} as node {node_id}; "
                 f"log {node.log_path}")
            echo("ready; Ctrl-C stops the SuperNode")
            supervise(node, helper, echo)
        except KeyboardInterrupt:
            echo(f"stopping site {spec.site_id}")
        finally:
            node.stop()
            helper = node.info.get("executor", helper)
            if helper is not None:
                helper.stop()
