"""Running fedcare as a real Flower app: a SuperLink process we own, then `flwr run`.

``fedcare simulate`` starts its own simulation-mode SuperLink on free loopback ports
(runtime dependency installation off, so nothing is downloaded), submits the app with
``flwr run``, waits for it, and always stops the SuperLink again: nothing is left
running after the command returns.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Iterator

import tomli_w
import tomllib

from .config import RunConfig
from .errors import FedcareError

APP_DIR = Path(__file__).resolve().parent.parent   # the source checkout (editable install)
FAB_NOTE = ("# fedcare Flower app bundle\nThe FAB carries pyproject.toml only; the code is the fedcare "
            "package installed at each site.\n")


def app_dir() -> Path:
    """The Flower app folder `flwr run` submits: the checkout's pyproject.toml, or, in an
    installed wheel (no checkout), the same app written from the installed package."""
    if (APP_DIR / "pyproject.toml").exists() and (APP_DIR / "docs" / "FAB.md").exists():
        return APP_DIR
    return packaged_app_dir()


def packaged_app_dir() -> Path:
    from . import __version__
    from .config import flower_app_config_toml

    head = tomli_w.dumps({
        "project": {"name": "fedcare", "version": __version__, "license": "Apache-2.0",
                    "description": "Federated LoRA fine-tuning for hospitals under differential privacy"},
        "tool": {"flwr": {"app": {"publisher": "fedcare", "fab-include": ["docs/FAB.md"],
                                  "components": {"serverapp": "fedcare.server.app:app",
                                                 "clientapp": "fedcare.client.app:app"}}}},
    })
    text = head + "\n" + flower_app_config_toml()
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"fedcare-app-{__version__}-{digest}"
    (folder / "docs").mkdir(parents=True, exist_ok=True)
    (folder / "docs" / "FAB.md").write_text(FAB_NOTE)
    (folder / "pyproject.toml").write_text(text)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flwr_env(flwr_home: Path) -> dict[str, str]:
    """The environment of every Flower process fedcare starts (SuperLink, SuperNodes,
    `flwr` commands, site workers, and the apps they spawn): nothing calls out."""
    env = os.environ.copy()
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "RAY_DEDUP_LOGS": "0",
        "PYTHONUNBUFFERED": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
    })
    return env


def run_config_args(cfg: RunConfig) -> list[str]:
    """The resolved configuration as `flwr run --run-config` TOML pairs."""
    pairs = []
    for key, value in cfg.to_flat().items():
        pairs.append(f"{key}={tomli_w.dumps({'v': value}).split('=', 1)[1].strip()}")
    return ["--run-config", " ".join(pairs)]


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass
class RaySetup:
    """Where a simulation's virtual sites run and what each one holds: ``address`` None
    is a Ray started for the run on this machine with ``cpus`` and ``gpus``; otherwise
    an existing cluster (``ray start``), which keeps its own counts."""

    address: str | None
    site_cpus: int
    site_gpus: float
    cpus: int
    gpus: int

    def backend(self) -> dict:
        """The SuperLink's ``backend`` options: no local counts for a cluster (Ray refuses
        them when joining one)."""
        out: dict = {"client-resources": {"num-cpus": self.site_cpus, "num-gpus": float(self.site_gpus)}}
        if self.address is None:
            out["init-args"] = {"num-cpus": self.cpus, "num-gpus": self.gpus}
        return out


def ray_setup(address: str | None = None, site_cpus: float = 1, site_gpus: float | None = None,
              num_sites: int = 1) -> RaySetup:
    """Check and complete the Ray options of ``fedcare simulate``: the cluster at
    ``address`` (or $RAY_ADDRESS; "auto" finds one started on this machine) is asked
    what it has; without one, this machine's CPUs and GPUs. ``site_gpus`` None: a
    share of the GPUs when there are any (every concurrently running site gets one
    share), else 0. Raises FedcareError for what cannot run."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address == "local":
        address = None
    if site_cpus < 1 or not float(site_cpus).is_integer():
        raise FedcareError(f"--site-cpus {site_cpus:g}: Flower's simulation takes whole CPUs per virtual site "
                           "(its resource field is an integer); share a GPU with --site-gpus 0.5 instead")
    if site_gpus is not None and site_gpus < 0:
        raise FedcareError(f"--site-gpus must be >= 0, got {site_gpus:g}")
    site_cpus = int(site_cpus)
    address, cpus, gpus = _cluster_capacity(address) if address else (None, os.cpu_count() or 1, _local_gpus())
    where = f"the Ray cluster at {address}" if address else "this machine"
    if site_cpus > cpus:
        raise FedcareError(f"--site-cpus {site_cpus} exceeds the {cpus} CPUs of {where}")
    if site_gpus is None:
        site_gpus = min(1.0, gpus / min(num_sites, cpus // site_cpus)) if gpus else 0.0
    elif site_gpus > 0 and not gpus:
        raise FedcareError(f"--site-gpus {site_gpus:g}: {where} has no GPU (Ray sees none); "
                           "drop --site-gpus or run on a machine or cluster with one")
    elif site_gpus > 1 and not float(site_gpus).is_integer():
        raise FedcareError(f"--site-gpus {site_gpus:g}: above 1, a site takes whole GPUs")
    return RaySetup(address, site_cpus, float(site_gpus), int(cpus), int(gpus))


def _local_gpus() -> int:
    import torch  # noqa: PLC0415 - heavy; already loaded by the task in `fedcare simulate`

    return torch.cuda.device_count()


def _cluster_capacity(address: str) -> tuple[str, int, int]:
    """(the cluster's bootstrap address, its CPUs, its GPUs), asked of the cluster by a
    short-lived Ray driver; FedcareError when there is none to join."""
    import ray  # noqa: PLC0415 - only a run that joins a cluster pays for importing Ray

    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False, include_dashboard=False)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise FedcareError(f"cannot join the Ray cluster at {address}: {err}; start one with "
                           "`ray start --head` or name it with --ray-address HOST:PORT") from None
    try:
        total = ray.cluster_resources()
        gcs = ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
    return gcs, int(math.floor(total.get("CPU", 0))), int(math.floor(total.get("GPU", 0)))


@contextlib.contextmanager
def simulation_superlink(num_sites: int, workdir: Path,
                         ray: RaySetup | None = None) -> Iterator[tuple[Path, dict[str, str]]]:
    """A simulation-mode SuperLink for one run; yields (FLWR_HOME, env). Its simulation
    joins ``ray.address`` or starts a Ray of its own ("local": never one it happens to
    find on this machine, such as another run's cluster)."""
    ray = ray or ray_setup(num_sites=num_sites, site_gpus=0.0)
    flwr_home = workdir / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    http, health = free_port(), free_port()  # one HTTP port serves runtime, control and fleet
    env = flwr_env(flwr_home)
    env["RAY_ADDRESS"] = ray.address or "local"
    (flwr_home / "config.toml").write_text(tomli_w.dumps({"superlink": {
        "default": "fedcare",
        "fedcare": {
            "address": f"127.0.0.1:{http}",
            "insecure": True,
            "options": {"num-supernodes": num_sites, "backend": ray.backend()},
        },
    }}))
    proc, log = _start_superlink(http, health, env, workdir / "superlink.log")
    try:
        yield flwr_home, env
    finally:
        _stop(proc)
        log.close()


def _start_superlink(http: int, health: int, env: dict[str, str], log_path: Path, tries: int = 5):
    """Start the simulation SuperLink on ``http``; when another process took that port
    between ``free_port`` and the bind (the SuperLink then exits with "address already in
    use"), start it again on fresh ports and rewrite the connection. Returns (proc, log)."""
    for attempt in range(tries):
        log = open(log_path, "w")
        cmd = [shutil.which("flower-superlink") or "flower-superlink", "--insecure", "--simulation",
               "--isolation", "subprocess", "--disable-runtime-dependency-installation",
               "--host", "127.0.0.1", "--port", str(http), "--health-server-address", f"127.0.0.1:{health}",
               "--database", ":flwr-in-memory:"]
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if _serving(http, proc, log_path):
            return proc, log
        _stop(proc)
        log.close()
        http, health = free_port(), free_port()
        config = Path(env["FLWR_HOME"]) / "config.toml"
        doc = tomllib.loads(config.read_text())
        doc["superlink"]["fedcare"]["address"] = f"127.0.0.1:{http}"
        config.write_text(tomli_w.dumps(doc))
    raise FedcareError(f"flower-superlink could not bind a free port in {tries} tries; see {log_path}")


def _serving(port: int, proc: subprocess.Popen, log_path: Path, timeout: float = 60.0) -> bool:
    """True once the SuperLink reports it serves on ``port``; False when it lost the port
    to another process; raises when it fails otherwise or does not start in time."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = log_path.read_text(errors="replace")
        if "address already in use" in text:
            return False
        if f"running on http://127.0.0.1:{port}" in text and proc.poll() is None:
            return True
        if proc.poll() is not None:
            raise FedcareError(f"flower-superlink exited with code {proc.returncode}; see {log_path}")
        time.sleep(0.2)
    raise FedcareError(f"flower-superlink did not serve on port {port} within {timeout:.0f} s; see {log_path}")


def flwr_run(cfg: RunConfig, env: dict[str, str], connection: str, log_path: Path,
             echo: bool = False) -> subprocess.Popen:
    """Submit the app and stream its logs to ``log_path`` (and stdout with ``echo``)."""
    cmd = [shutil.which("flwr") or "flwr", "run", str(app_dir()), connection, "--stream",
           *run_config_args(cfg)]
    out = open(log_path, "w")
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=str(app_dir()))


def workdir_for(run_id: str) -> Path:
    base = Path(os.environ.get("FEDCARE_WORKDIR", tempfile.gettempdir())) / "fedcare-runs" / run_id
    base.mkdir(parents=True, exist_ok=True)
    return base


def stop(proc: subprocess.Popen) -> None:
    _stop(proc)


def stop_flower_run(env: dict[str, str], connection: str, log_path: Path, timeout: float = 30.0) -> bool:
    """Ask the SuperLink to stop the Flower run that ``flwr run`` (logging to
    ``log_path``) started, so its ServerApp does not go on without the coordinator's
    command; False when the log names no run or ``flwr stop`` fails."""
    try:
        found = re.search(r"Successfully started run (\d+)", Path(log_path).read_text(errors="replace"))
    except OSError:
        return False
    if not found:
        return False
    try:
        done = subprocess.run([shutil.which("flwr") or "flwr", "stop", found.group(1), connection], env=env,
                              cwd=str(app_dir()), capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0



