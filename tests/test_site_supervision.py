"""A site's supervision with real processes (a TLS SuperLink, one SuperNode, fedcare's
executor): `fedcare site start` restarts a dead executor and says so; when it cannot,
it stops the SuperNode, so that the coordinator sees the site leave instead of sending
it tasks nobody answers."""
import shutil
import threading
import time
from pathlib import Path

import pytest

from e2e import tls_superlink
from fedcare.certs import create_site_keys
from fedcare.flower import free_port
from fedcare.server.deploy import DeploymentError, SiteSpec, register_site, start_site, supervise, wait_joined

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


def _wait(check, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_dead_executor_is_restarted_and_when_it_cannot_be_the_site_leaves(tmp_path):
    tls, link, flwr_home, port = tls_superlink(tmp_path)
    started = [link]
    try:
        keys = create_site_keys("va", tmp_path / "va" / "keys")
        register_site(Path(f"{keys.private_key}.pub"), flwr_home)
        data = tmp_path / "va" / "data"
        data.mkdir(parents=True)
        shutil.copy(ROOT / "data" / "heart-disease" / "processed.va.data", data)
        spec = SiteSpec("va", keys.private_key, data_path=data, ledger=tmp_path / "va" / "ledger.db",
                        audit=tmp_path / "va" / "audit.jsonl", port=free_port())
        node, executor = start_site(spec, f"127.0.0.1:{port}", tls.ca_cert, tmp_path / "logs", flwr_home=flwr_home)
        started += [node, executor]
        wait_joined(node, 120)

        said, ended = [], []

        def hold():
            try:
                supervise(node, executor, said.append, backoff=(0.2, 0.2))
            except DeploymentError as err:
                ended.append(str(err))

        watcher = threading.Thread(target=hold, daemon=True)
        watcher.start()
        executor.kill()                                   # the executor dies; the SuperNode lives on
        _wait(lambda: node.info["executor"] is not executor, 120, "the executor to be restarted")
        restarted = node.info["executor"]
        started.append(restarted)
        assert restarted.alive() and "claiming tasks" in restarted.log()
        assert any(s.startswith("site executor stopped (exit") for s in said), said
        assert any(s.startswith("site executor restarted (try 1/2)") for s in said), said
        assert node.alive()

        # now it cannot come back (its SuperExec secret is gone): the SuperNode is stopped
        (tmp_path / "logs" / "va.superexec.secret").unlink()
        restarted.kill()
        watcher.join(180)
        assert ended and "the SuperNode was stopped so the coordinator sees this site leave" in ended[0], (said, ended)
        assert any("restart 2/2 failed" in s for s in said), said
        assert not node.alive()
    finally:
        for proc in reversed(started):
            proc.stop()
