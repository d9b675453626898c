"""A Ray cluster of several nodes on this machine, for the multi-node test and
bench/scale.py: a head and worker raylets started as separate ``ray start`` processes,
each offering its own CPUs and a custom resource ``node_a``, ``node_b``...

Each ``ray start`` runs in a session of its own, and its daemons (GCS, raylet, workers)
stay in that process group after it returns, so stopping the cluster ends exactly its
processes: never ``ray stop``, which ends every Ray on the machine, other runs' too.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import FedcareError
from .flower import free_port

RAY = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())"]
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""}


@dataclass
class LocalCluster:
    address: str
    groups: list[int] = field(default_factory=list)   # one process group per `ray start`

    def nodes(self) -> dict[str, str]:
        """Alive node id -> its custom resource (node_a, node_b...), asked of the cluster."""
        code = ("import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
                "print(json.dumps({n['NodeID']: [r for r in n['Resources'] if r.startswith('node_')] "
                "for n in ray.nodes() if n['Alive']}))" % self.address)
        out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise FedcareError(f"cannot list the nodes of the Ray cluster at {self.address}: {out.stderr[-500:]}")
        return {node: res[0] for node, res in json.loads(out.stdout.strip().splitlines()[-1]).items() if res}

    def pids(self) -> list[int]:
        """Every live process of the cluster (zombies not counted; for memory accounting)."""
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                    if fields[0] != "Z" and int(fields[2]) in self.groups:   # state, ppid, pgrp
                        found.append(int(entry))
        return found

    def stop(self, grace: float = 3.0, timeout: float = 15.0) -> None:
        """SIGTERM to every process of the cluster, SIGKILL to what is left after
        ``grace`` seconds, then wait (up to ``timeout``) until none is left."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, timeout)):
            for pgid in self.groups:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, sig)
            deadline = time.time() + wait
            while self.pids() and time.time() < deadline:
                time.sleep(0.2)


def _ray_start(*args: str) -> int:
    proc = subprocess.Popen([*RAY, "start", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
                             "--dashboard-agent-listen-port", str(free_port()), *args],
                            env=ENV, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=180)
    if proc.returncode != 0:
        raise FedcareError(f"ray start {' '.join(args)} failed:\n{out[-2000:]}")
    return proc.pid


@contextlib.contextmanager
def local_cluster(nodes: int = 2, cpus_per_node: int = 1) -> Iterator[LocalCluster]:
    """``nodes`` Ray nodes on this machine (the first is the head), stopped on exit."""
    port = free_port()
    cluster = LocalCluster(f"127.0.0.1:{port}")
    try:
        cluster.groups.append(_ray_start("--head", "--port", str(port), "--num-cpus", str(cpus_per_node),
                                         "--resources", json.dumps({"node_a": 1}), "--include-dashboard", "false",
                                         "--dashboard-port", str(free_port()),
                                         "--ray-client-server-port", str(free_port())))
        for i in range(1, nodes):
            cluster.groups.append(_ray_start("--address", cluster.address, "--num-cpus", str(cpus_per_node),
                                             "--resources", json.dumps({f"node_{chr(ord('a') + i)}": 1})))
        yield cluster
    finally:
        cluster.stop()
