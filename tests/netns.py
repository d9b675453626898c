"""Separate hosts on one machine: a network namespace per host, each with its own
loopback and one veth link (``eth0``, a private 10.231.N.x/24 address) to a bridge
that lives in a switch namespace of its own. Nothing is added to the machine's own
network namespace and the only addresses used are the ones created here.

    with Lan(["coordinator", "cleveland"]) as lan:
        lan.addr("coordinator")                 # 10.231.N.10
        proc = lan.spawn("cleveland", ["fedcare", "site", "start", ...], log_path, env)
        lan.link("cleveland", up=False)         # the hospital's cable is pulled

Needs CAP_NET_ADMIN (root); ``Lan.available()`` says whether this machine allows it.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


def _ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")


class Lan:
    def __init__(self, hosts: list[str]):
        self.tag = f"fc{os.getpid() % 100000}"
        self.subnet = f"10.231.{os.getpid() % 250 + 1}"
        self.hosts = list(hosts)
        self.switch = f"{self.tag}-sw"
        self.created: list[str] = []
        self.procs: list[subprocess.Popen] = []

    @staticmethod
    def available() -> bool:
        name = f"fcprobe{os.getpid()}"
        ok = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
        if ok:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        return ok

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def addr(self, host: str) -> str:
        return f"{self.subnet}.{10 + self.hosts.index(host)}"

    def __enter__(self) -> "Lan":
        try:
            self._add(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, host in enumerate(self.hosts):
                ns = self.ns(host)
                self._add(ns)
                _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{i}", "netns", self.switch)
                _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0", "up")
                _ip("-n", ns, "addr", "add", f"{self.addr(host)}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
        except BaseException:
            self.close()
            raise
        return self

    def _add(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.created.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def __exit__(self, *exc) -> None:
        self.close()

    def prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host)]

    def spawn(self, host: str, cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
        """Start ``cmd`` on ``host`` (its own session, output to ``log``)."""
        with open(log, "ab") as out:
            proc = subprocess.Popen([*self.prefix(host), *cmd], env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, host: str, cmd: list[str], env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run([*self.prefix(host), *cmd], env=env, capture_output=True, text=True, timeout=timeout)

    def link(self, host: str, up: bool) -> None:
        _ip("-n", self.ns(host), "link", "set", "eth0", "up" if up else "down")

    @staticmethod
    def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """``proc`` and every process below it (Flower detaches its helpers into
        sessions of their own), at once: a crash."""
        from fedcare.server.deploy import descendants

        for pid in [proc.pid, *descendants(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)

    def close(self) -> None:
        from fedcare.server.deploy import descendants

        pids = [p for proc in self.procs if proc.poll() is None for p in (proc.pid, *descendants(proc.pid))]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.time() + 15
            while sig == signal.SIGTERM and time.time() < deadline and any(p.poll() is None for p in self.procs):
                time.sleep(0.5)
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.created.clear()
