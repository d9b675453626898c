"""The site executor: runs fedcare's ClientApp for its SuperNode in one long-lived
process, answers a message its handlers cannot take with an error reply and keeps
going, and picks up again after it is killed and restarted."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from e2e import tls_superlink
from fedcare import schemas as S
from fedcare.certs import create_site_keys
from fedcare.client.audit import AuditLog
from fedcare.client.executor import handle
from fedcare.config import RunConfig
from fedcare.flower import free_port
from fedcare.records import from_array_record, to_array_record
from fedcare.server.deploy import SiteSpec, register_site, start_executor, start_site, wait_joined
from fedcare.server.federation import initial_state

ROOT = Path(__file__).resolve().parent.parent
FEDCARE = shutil.which("fedcare") or "fedcare"


def _site_folder(root: Path, site: str, data_file: str) -> Path:
    data = root / site / "data"
    data.mkdir(parents=True)
    shutil.copy(ROOT / "data" / "heart-disease" / data_file, data)
    return data


def test_a_malformed_message_gets_an_error_reply_and_the_next_one_trains(tmp_path, identity):
    data = _site_folder(tmp_path, "cleveland", "processed.cleveland.data")
    cfg = RunConfig.from_flat({"task": "heart-disease", "rounds": 2, "train.local_steps": 3}).validate()
    cfg.runtime.run_id = "run-executor-test"
    ctx = Context(run_id=7, node_id=11, state=RecordDict(), run_config=cfg.to_flat(),
                  node_config={"site-id": "cleveland", "data-path": str(data),
                               "ledger": str(tmp_path / "ledger.db"), "audit": str(tmp_path / "audit.jsonl")})
    bad = Message(RecordDict({S.CONFIG: ConfigRecord({"server-round": 1})}), dst_node_id=11, message_type="train")
    reply, reason = handle(bad, ctx)       # no global model in it: refused with a fixed sentence (errors.py)
    assert not reply.has_error() and reply.metadata.reply_to_message_id == bad.metadata.message_id
    assert reply.content[S.SITE][S.STATUS] == "refused" and "unexpected error" in reply.content[S.SITE][S.REASON]

    state = initial_state(cfg)
    good = Message(RecordDict({S.ARRAYS: to_array_record(state), S.CONFIG: ConfigRecord({"server-round": 1})}),
                   dst_node_id=11, message_type="train")
    reply, reason = handle(good, ctx)
    assert not reply.has_error() and reason == ""
    assert reply.content[S.METRICS][S.NUM_EXAMPLES] == 199
    new = from_array_record(reply.content[S.ARRAYS])
    assert any(not np.allclose(new[k], state[k]) for k in state)
    entries = [e for e in AuditLog(tmp_path / "audit.jsonl").entries() if e["run_id"] == "run-executor-test"]
    assert [(e["kind"], e["decision"]) for e in entries] == [("train", "refused"), ("train", "sent")]


@pytest.mark.e2e
def test_executor_answers_refusals_and_restarts_cleanly(tmp_path):
    tls, link, flwr_home, port = tls_superlink(tmp_path)
    db = f"sqlite:///{tmp_path / 'store.db'}"
    env = {**os.environ, "FEDCARE_FLWR_HOME": str(flwr_home), "FEDCARE_WORKDIR": str(tmp_path / "runs"),
           "FEDCARE_DB": db, "FLWR_TELEMETRY_ENABLED": "0"}
    started = [link]
    try:
        specs = {}
        for site, data_file in (("cleveland", "processed.cleveland.data"), ("va", "processed.va.data")):
            keys = create_site_keys(site, tmp_path / site / "keys")
            assert register_site(Path(f"{keys.private_key}.pub"), flwr_home) > 0
            specs[site] = SiteSpec(site, keys.private_key, data_path=_site_folder(tmp_path, site, data_file),
                                   ledger=tmp_path / site / "ledger.db", audit=tmp_path / site / "audit.jsonl",
                                   port=free_port())
        executors = {}
        for site, spec in specs.items():
            node, executors[site] = start_site(spec, f"127.0.0.1:{port}", tls.ca_cert, tmp_path / "logs",
                                               flwr_home=flwr_home)
            started += [node, executors[site]]
            wait_joined(node, 120)
            assert not node.find("flower-superexec")   # no per-message ClientApp processes at this site

        def run(*extra, trained=True):
            out = subprocess.run([FEDCARE, "server", "run", "--task", "heart-disease", "--rounds", "1", "--quiet",
                                  "--set", "train.local_steps=3", "--set", "strategy.min_sites=1",
                                  "--set", "strategy.round_timeout=60", *extra],
                                 env=env, capture_output=True, text=True, timeout=600)
            # a run in which every site refused is stored as failed, and `server run` exits 1
            assert (out.returncode == 0) == trained, out.stdout + out.stderr
            run_id = out.stdout.split()[1].rstrip(":")
            rep = subprocess.run([FEDCARE, "report", run_id, "--db", db, "--json"], env=env,
                                 capture_output=True, text=True, timeout=120)
            return {s["site"]: s for s in json.loads(rep.stdout)["rounds"][0]["sites"]}

        # A coordinator asking for fault injection: every deployed site refuses (the site
        # decides), the executors answer and keep claiming. (A handler that raises is
        # test_a_malformed_message_gets_an_error_reply_and_the_next_one_trains.)
        sites = run("--set", "faults.site=va", "--set", "faults.kind=crash", trained=False)
        assert all(not s["accepted"] and "runs only in simulation" in s["reason"] for s in sites.values()), sites
        assert "handled train" in executors["va"].log() and executors["va"].alive()

        executors["va"].kill()                    # the executor dies; the SuperNode stays
        same_secret = dataclasses.replace(specs["va"], executor_secret=tmp_path / "logs" / "va.superexec.secret")
        executors["va"] = start_executor(same_secret, tmp_path / "logs", flwr_home)
        started.append(executors["va"])
        sites = run()
        assert sites["cleveland"]["accepted"] and sites["va"]["accepted"], sites
        restarted = executors["va"].log()          # what the restarted process wrote (the file is appended)
        assert "claiming tasks" in restarted and restarted.count("handled train") == 1, restarted
        assert executors["va"].log_path.read_text().count("claiming tasks") == 2
        assert executors["cleveland"].log().count("handled train") == 2

        # An executor started with the wrong SuperExec secret is refused and says why (exit 2).
        wrong = tmp_path / "wrong.secret"
        wrong.write_bytes(os.urandom(32))
        out = subprocess.run([sys.executable, "-m", "fedcare.client.executor", "--runtime-api",
                              f"{specs['va'].host}:{specs['va'].port}", "--secret-file", str(wrong)],
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stdout + out.stderr
        assert "refused this executor's SuperExec authentication (HTTP 401)" in out.stdout

        # SIGTERM in the middle of a task: the executor finishes that task, delivers the
        # reply and stops (rc 0); restarted, it serves the rest of the run.
        log = executors["cleveland"].log_path
        before = log.read_text().count("running task")
        third = subprocess.Popen([FEDCARE, "server", "run", "--task", "heart-disease", "--rounds", "1", "--quiet",
                                  "--set", "train.local_steps=400", "--set", "strategy.min_sites=2",
                                  "--set", "strategy.round_timeout=120"],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started.append(third)
        deadline = time.time() + 300
        while log.read_text().count("running task") == before:
            assert time.time() < deadline and third.poll() is None, "cleveland never started a task"
            time.sleep(0.05)
        os.kill(executors["cleveland"].pid, signal.SIGTERM)
        assert executors["cleveland"].proc.wait(120) == 0
        tail = log.read_text().split("running task")[-1]
        assert "handled train" in tail and tail.rstrip().endswith("fedcare site executor stopped"), tail
        secret = tmp_path / "logs" / "cleveland.superexec.secret"
        executors["cleveland"] = start_executor(dataclasses.replace(specs["cleveland"], executor_secret=secret),
                                                tmp_path / "logs", flwr_home)
        started.append(executors["cleveland"])
        stdout, _ = third.communicate(timeout=600)
        assert third.returncode == 0, stdout
        run_id = stdout.split()[1].rstrip(":")
        rep = json.loads(subprocess.run([FEDCARE, "report", run_id, "--db", db, "--json"], env=env,
                                        capture_output=True, text=True, timeout=120).stdout)
        assert all(s["accepted"] for s in rep["rounds"][0]["sites"]), rep["rounds"][0]["sites"]
        assert {e["scope"] for e in rep["rounds"][0]["evaluations"]} >= {"cleveland", "va"}
    finally:
        for proc in reversed(started):
            if isinstance(proc, subprocess.Popen):
                proc.kill()
            else:
                proc.stop()


def test_warm_up_loads_what_the_first_round_with_default_settings_uses(tmp_path, identity):
    from fedcare.client import site as site_mod
    from fedcare.client.executor import warm_up
    from fedcare.launch import resolve_config

    data = _site_folder(tmp_path, "va", "processed.va.data")
    warm_up("heart-disease", "va", str(data))
    splits, models = site_mod._split.cache_info(), site_mod._model.cache_info()
    cfg = resolve_config("heart-disease", [])
    ctx = Context(run_id=7, node_id=11, state=RecordDict(), run_config=cfg.to_flat(),
                  node_config={"site-id": "va", "data-path": str(data)})
    msg = Message(RecordDict({S.ARRAYS: to_array_record(initial_state(cfg)),
                              S.CONFIG: ConfigRecord({"server-round": 1})}), dst_node_id=11, message_type="train")
    reply, reason = handle(msg, ctx)
    assert reason == "" and not reply.has_error()
    assert site_mod._split.cache_info().hits > splits.hits and site_mod._split.cache_info().misses == splits.misses
    assert site_mod._model.cache_info().hits > models.hits and site_mod._model.cache_info().misses == models.misses
