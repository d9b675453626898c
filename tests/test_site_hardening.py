"""Site-side defects of the trust issue: each test here failed on the code before it."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from torch.utils.data import DataLoader, TensorDataset

from fedcare import schemas as S
from fedcare.config import RunConfig
from fedcare.errors import DataError
from fedcare.models.registry import get_task
from fedcare.models.state import get_trainable_state
from fedcare.models.training import train_steps
from fedcare.records import to_array_record
from fedcare.server.federation import initial_state

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_an_empty_training_split_is_a_data_error_not_an_endless_loop():
    cfg = RunConfig.from_flat({"task": "heart-disease"}).validate()
    task = get_task("heart-disease")
    model = task.build_model(cfg)
    empty = DataLoader(TensorDataset(torch.zeros(0, 13), torch.zeros(0)), batch_size=4)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(DataError, match="training split is empty"):
        train_steps(task, model, opt, empty, steps=3, device=torch.device("cpu"))


# ------------------------------------------------------------------------------- worker
# ------------------------------------------------------------------------------- packaging
def test_fedcare_imports_without_tomllib_and_declares_its_toml_packages():
    """Python 3.10 has no tomllib: block it and import every module that parses TOML."""
    code = ("import sys; sys.modules['tomllib'] = None\n"
            "import fedcare.client.policy, fedcare.server.cli, fedcare.server.deploy, fedcare.dashboard.auth\n"
            "from fedcare.compat import tomllib; assert tomllib.__name__ == 'tomli'\n"
            "from fedcare.client.policy import SitePolicy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from fedcare.compat import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.replace(" ", "").startswith("tomli>=") and "python_version<'3.11'" in d.replace(" ", "")
               for d in deps)
    assert any(d.startswith(("tomli-w", "tomli_w")) for d in deps)


# ------------------------------------------------------------------------------- personalisation
@pytest.mark.timeout(600)
def test_virtual_sites_in_one_process_do_not_share_a_personal_head(identity):
    from fedcare.client import app as client_app
    from fedcare.client import site as site_mod
    from fedcare.records import from_array_record

    cfg = RunConfig.from_flat({"task": "medical-abstracts", "sites": 2, "lora.personalize": "head",
                               "data.max_train_per_site": 16, "data.max_test_per_site": 16,
                               "train.local_steps": 3, "train.lr": 0.05, "train.batch_size": 8}).validate()
    site_mod._model.cache_clear()
    glob = initial_state(cfg)
    shared = {k: v for k, v in glob.items() if "lora_" in k}
    ctxs = [Context(run_id=1, node_id=1000 + i, state=RecordDict(), run_config=cfg.to_flat(),
                    node_config={"partition-id": i, "num-partitions": 2}) for i in range(2)]

    def message(kind):
        return Message(RecordDict({S.ARRAYS: to_array_record(shared), S.CONFIG: ConfigRecord({"server-round": 1})}),
                       dst_node_id=1000, message_type=kind)

    def evaluate_site0():
        reply = client_app.evaluate(message("evaluate"), ctxs[0])
        return dict(reply.content[S.METRICS])

    before = evaluate_site0()
    reply = client_app.train(message("train"), ctxs[1])   # site 1 trains its own head
    assert reply.content[S.SITE][S.STATUS] == "ok"
    assert "personal" in ctxs[1].state and "personal" not in ctxs[0].state
    site1_head = from_array_record(ctxs[1].state["personal"])
    model0 = site_mod.Site.from_context(ctxs[0]).model()
    model0_state = {k: v for k, v in get_trainable_state(model0).items() if k in site1_head}
    assert model0_state and not any(np.allclose(model0_state[k], site1_head[k]) for k in site1_head)
    assert evaluate_site0() == before   # site 0's evaluation does not see site 1's head


# ------------------------------------------------------------------------------- telemetry
def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.decode(errors="replace").split("=", 1) for item in raw.split(b"\0") if b"=" in item)


def test_flower_processes_fedcare_starts_run_with_telemetry_off(tmp_path):
    from fedcare.flower import simulation_superlink
    from fedcare.server.deploy import _env

    assert _env(tmp_path)["FLWR_TELEMETRY_ENABLED"] == "0"   # SuperLink, SuperNodes, flwr commands, workers
    with simulation_superlink(2, tmp_path) as (flwr_home, env):
        ours = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                if _environ(pid).get("FLWR_HOME") == str(flwr_home)]
        assert ours, "the SuperLink process was not found"
        assert all(_environ(pid).get("FLWR_TELEMETRY_ENABLED") == "0" for pid in ours)
