"""fedcare's site executor (fedcare.client.executor) speaks flwr 1.41's Runtime API the
way flower-superexec and flwr-clientapp do, through flwr internals. This test fails
loudly, naming what moved, when a flwr release changes them; the version is pinned
exactly in pyproject.toml for the same reason."""
import importlib
import inspect
from importlib.metadata import version

import pytest

from fedcare.client import executor


def test_flwr_is_the_pinned_release():
    import tomllib
    from pathlib import Path

    deps = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(d for d in deps if d.startswith("flwr["))
    assert pin.endswith("==" + version("flwr")), f"installed flwr {version('flwr')} is not the pinned {pin}"


@pytest.mark.parametrize("module", sorted(executor.FLWR_INTERNALS))
def test_internal_names_exist(module):
    mod = importlib.import_module(module)
    missing = [n for n in executor.FLWR_INTERNALS[module] if not hasattr(mod, n)]
    assert not missing, f"flwr {version('flwr')} moved {missing} out of {module}"


def test_runtime_rpcs_and_signatures():
    from flwr.proto.runtime_pb2 import AcquireTaskRequest, AcquireTaskResponse
    from flwr.supercore.constant import TaskType
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.superexec import run_superexec
    from flwr.supernode.runtime import run_clientapp

    missing = [r for r in executor.RPCS if not callable(getattr(RuntimeHttpClient, r, None))]
    assert not missing, f"Runtime API client lost {missing}"
    assert {"supported_task_types"} <= set(AcquireTaskRequest.DESCRIPTOR.fields_by_name)
    assert {"task", "token"} <= set(AcquireTaskResponse.DESCRIPTOR.fields_by_name)
    assert TaskType.CLIENT_APP.value == executor.FLWR_CLIENTAPP_TASK
    # the SuperExec signs exactly the AcquireTask RPC; the executor must sign the same one
    assert run_superexec._SUPEREXEC_AUTH_METHODS == frozenset({executor.ACQUIRE_RPC})
    assert list(inspect.signature(run_clientapp.pull_task_input).parameters) == ["client"]
    assert list(inspect.signature(run_clientapp.push_message).parameters) == ["client", "message", "context"]
    assert list(inspect.signature(run_clientapp.push_task_output).parameters) == [
        "client", "context", "sub_status", "details"]


def test_supernode_accepts_process_isolation_and_a_superexec_secret():
    import subprocess
    import shutil

    out = subprocess.run([shutil.which("flower-supernode"), "--help"], capture_output=True, text=True, timeout=120)
    assert "--isolation" in out.stdout and "process" in out.stdout
    assert "--superexec-auth-secret-file" in out.stdout


def test_supernode_idle_sleeps_are_where_fedcare_shortens_them():
    import time

    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from fedcare.client.supernode import ShortSleeps

    assert callable(flower_supernode)
    assert start_client_internal.time is time, "flwr no longer calls time.sleep in start_client_internal"
    source = inspect.getsource(start_client_internal)
    assert "time.sleep(3)" in source and "time.sleep(0.5)" in source, "flwr changed the SuperNode's poll sleeps"
    t0 = time.perf_counter()
    ShortSleeps(0.05).sleep(3)
    assert time.perf_counter() - t0 < 1.0 and ShortSleeps(0.05).monotonic() > 0


def test_a_task_whose_message_never_arrives_gives_up_within_the_bound(monkeypatch):
    """flwr retries a missing message object for 2 hours; the executor bounds it, so a
    task of a run that ended cannot keep it from the next run's tasks."""
    import time

    from flwr.proto.message_pb2 import ObjectTree
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectUnavailableError
    from flwr.supernode.runtime import run_clientapp

    monkeypatch.setattr(run_clientapp, "pull_and_inflate_object_from_tree",
                        run_clientapp.pull_and_inflate_object_from_tree)   # restored after the test
    assert "max_time" in inspect.signature(run_clientapp.pull_and_inflate_object_from_tree).parameters
    executor.bound_task_input_wait(1.0)
    executor.bound_task_input_wait(1.0)   # idempotent

    def never(object_id):
        raise ObjectUnavailableError(object_id)

    t0 = time.perf_counter()
    with pytest.raises(ObjectPullError):
        run_clientapp.pull_and_inflate_object_from_tree(ObjectTree(object_id="ab" * 32), never, lambda _: None)
    assert time.perf_counter() - t0 < 30
