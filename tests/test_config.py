"""The run configuration: one tree, dotted keys, the Flower app's defaults in step."""
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedcare.config import RunConfig, flower_app_config_toml
from fedcare.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_flower_app_defaults_mirror_run_config():
    """pyproject's Flower defaults are RunConfig's (regenerate: fedcare config flower-toml)."""
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert _flatten(py["tool"]["flwr"]["app"]["config"]) == RunConfig().to_flat()
    assert flower_app_config_toml() in (ROOT / "pyproject.toml").read_text()


def test_set_parses_types_and_rejects_unknown_keys():
    cfg = RunConfig().apply_sets(["lora.r=16", "train.local_steps=50", "dp.epsilon=3", "strategy.name=fedprox"])
    assert (cfg.lora.r, cfg.train.local_steps, cfg.dp.epsilon, cfg.strategy.name) == (16, 50, 3.0, "fedprox")
    with pytest.raises(ConfigError, match="unknown setting 'lora.rank'"):
        RunConfig().apply_sets(["lora.rank=4"])
    with pytest.raises(ConfigError, match="expects int"):
        RunConfig().apply_sets(["lora.r=big"])


def test_validation_messages():
    with pytest.raises(ConfigError, match="clipping norm"):
        RunConfig().apply_sets(["dp.epsilon=1", "dp.max_grad_norm=0"]).validate()
    cfg = RunConfig().apply_sets(["dp.noise_multiplier=1.0"]).validate()
    assert cfg.dp.level == "sample"


def test_round_trip_through_stored_dict():
    cfg = RunConfig().apply_sets(["lora.r=4", "data.dirichlet_alpha=0.3"])
    assert RunConfig.from_dict(cfg.to_dict()).to_flat(include_runtime=False) == cfg.to_flat(include_runtime=False)


@pytest.mark.parametrize("args, message", [
    (["simulate", "--task", "no-such-task"], "unknown task 'no-such-task'"),
    (["simulate", "--set", "nope.key=1"], "unknown setting 'nope.key'"),
    (["simulate", "--strategy", "fedbogus"], "unknown strategy 'fedbogus'"),
    (["simulate", "--db", "postgresql+psycopg://postgres@127.0.0.1:1/none"], "cannot connect"),
])
def test_cli_user_errors_are_one_line_exit_2(args, message):
    res = subprocess.run([sys.executable, "-c", "from fedcare.cli import main; main()", *args],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
