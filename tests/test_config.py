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


def test_task_defaults_follow_the_training_mode_and_dp_and_explicit_settings_win():
    """A task's settings for its mode (and under DP-SGD) apply unless set; the swept head
    settings are breastmnist's defaults, LoRA keeps its own."""
    from fedcare.launch import resolve_config

    head = resolve_config("breastmnist", [])
    assert (head.train.mode, head.rounds, head.train.optimizer, head.train.lr, head.train.local_steps,
            head.train.batch_size, head.dp.delta) == ("head", 10, "sgd", 0.03, 20, 32, 1e-5)
    dp = resolve_config("breastmnist", ["dp.epsilon=8"])
    assert (dp.dp.level, dp.train.lr, dp.train.local_steps, dp.train.batch_size, dp.dp.delta) == \
        ("sample", 1.0, 5, 256, 1e-3)
    mine = resolve_config("breastmnist", ["dp.epsilon=8", "train.lr=0.5", "dp.delta=1e-5"], rounds=4)
    assert (mine.train.lr, mine.dp.delta, mine.rounds, mine.train.batch_size) == (0.5, 1e-5, 4, 256)
    lora = resolve_config("breastmnist", ["train.mode=lora", "dp.epsilon=8"])
    assert (lora.rounds, lora.train.optimizer, lora.train.lr, lora.train.batch_size) == (3, "adam", 1e-3, 16)
    text = resolve_config("medical-abstracts", [])
    assert (text.train.mode, text.rounds, text.train.optimizer, text.train.lr) == ("head", 30, "sgd", 0.5)
    client_dp = resolve_config("breastmnist", ["dp.level=client", "dp.noise_multiplier=1"])
    assert client_dp.train.lr == 0.03   # the DP-SGD settings are for per-example clipping only
    q = resolve_config("heart-disease", [], **{"strategy.name": "qfedavg"})
    assert (q.train.optimizer, q.train.lr) == ("sgd", 0.01)   # the strategy's defaults still apply


def test_config_show_prints_what_a_run_would_use():
    out = subprocess.run([sys.executable, "-c", "from fedcare.cli import main; main()", "config", "show",
                          "--task", "breastmnist", "--set", "dp.epsilon=8"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = {ln[2:].split()[0]: ln for ln in out.stdout.splitlines()}
    assert lines["train.lr"].startswith("*") and lines["train.lr"].split()[-1] == "1.0"
    assert lines["train.mode"].split()[-1] == "'head'" and not lines["seed"].startswith("*")
