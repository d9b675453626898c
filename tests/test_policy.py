"""Site policy: each rule refuses with a reason, and only when it should."""
import hashlib

import pytest

from fedcare import __version__
from fedcare.client.policy import SitePolicy, load_policy, planned_sample_dp
from fedcare.config import RunConfig
from fedcare.errors import ConfigError, PolicyRefusal

ME = {"fedcare_version": __version__, "fab_hash": "ab" * 32}


def write(tmp_path, text):
    p = tmp_path / "policy.toml"
    p.write_text(text)
    return p


def cfg(**flat):
    return RunConfig.from_flat({"task": "heart-disease", "rounds": 3, "train.local_steps": 10, **flat}).validate()


def test_load_fingerprint_and_no_policy(tmp_path):
    p = write(tmp_path, '[code]\nallowed_tasks = ["heart-disease"]\n')
    pol = load_policy(str(p))
    assert pol.fingerprint == hashlib.sha256(p.read_bytes()).hexdigest()
    assert pol.allowed_tasks == ("heart-disease",)
    assert load_policy(None) is None and load_policy("") is None
    pol.check(cfg(), ME, 100)  # allowed
    p.write_text('[code]\nallowed_tasks = ["heart-disease"] # edited\n')
    assert SitePolicy.load(p).fingerprint != pol.fingerprint


def test_empty_policy_allows_everything(tmp_path):
    SitePolicy.load(write(tmp_path, "")).check(cfg(), {}, 1)


@pytest.mark.parametrize("text, run, identity, n, reason", [
    ('[code]\nallowed_tasks = ["medical-abstracts"]', {}, ME, 100, "task 'heart-disease'"),
    ('[code]\nallowed_fedcare_versions = ["9.9.9"]', {}, ME, 100, "fedcare version"),
    ('[code]\nallowed_fab_hashes = ["cd"]', {}, ME, 100, "app bundle hash"),
    ('[code]\nallowed_fab_hashes = ["cd"]', {}, {"fedcare_version": __version__}, 100, "'unknown'"),
    ("[data]\nmin_local_examples = 50", {}, ME, 49, "49 training examples"),
    ("[privacy]\nrequire_dp = true", {}, ME, 100, "differential privacy is required"),
    ("[privacy]\nrequire_client_level_dp = true", {"dp.noise_multiplier": 1.0}, ME, 100, "client-level DP"),
    ("[privacy]\nmin_noise_multiplier = 1.5", {"dp.noise_multiplier": 1.0}, ME, 100, "below min_noise"),
    ("[privacy]\nmax_epsilon_per_run = 0.5", {"dp.noise_multiplier": 0.8, "dp.accountant": "rdp"}, ME, 100, "planned to spend"),
    ("[privacy]\nepsilon_cap = 0.5", {"dp.epsilon": 2.0, "dp.delta": 1e-3, "dp.accountant": "rdp"}, ME, 100, "epsilon_cap"),
])
def test_each_rule_refuses_with_reason(tmp_path, text, run, identity, n, reason):
    pol = SitePolicy.load(write(tmp_path, text))
    with pytest.raises(PolicyRefusal, match=reason) as err:
        pol.check(cfg(**run), identity, n)
    assert str(err.value).startswith("site policy refuses the run:")


def test_rules_pass_when_met(tmp_path):
    pol = SitePolicy.load(write(tmp_path, f"""
[privacy]
epsilon_cap = 50.0
max_epsilon_per_run = 20.0
min_noise_multiplier = 0.5
require_dp = true
[data]
min_local_examples = 50
[code]
allowed_tasks = ["heart-disease"]
allowed_base_models = ["sentence-transformers/all-MiniLM-L6-v2"]
allowed_fedcare_versions = ["{__version__}"]
allowed_fab_hashes = ["{'ab' * 32}"]
"""))
    pol.check(cfg(**{"dp.noise_multiplier": 1.0, "dp.delta": 1e-3, "dp.accountant": "rdp"}), ME, 100)
    pol.check(cfg(**{"dp.epsilon": 5.0, "dp.delta": 1e-3, "dp.accountant": "rdp"}), ME, 100)


def test_planned_epsilon_matches_target_and_noise_is_monotone():
    c = cfg(**{"dp.epsilon": 3.0, "dp.delta": 1e-3, "dp.accountant": "rdp"})
    noise, eps = planned_sample_dp(c, 200)
    assert eps <= 3.0 + 1e-6 and noise > 0.3
    # the given-noise path: the calibrated noise spends (about) the target
    _, eps2 = planned_sample_dp(cfg(**{"dp.noise_multiplier": noise, "dp.delta": 1e-3, "dp.accountant": "rdp"}), 200)
    assert eps2 == pytest.approx(3.0, rel=0.05)
    _, eps_more_noise = planned_sample_dp(cfg(**{"dp.noise_multiplier": noise * 2, "dp.delta": 1e-3,
                                                 "dp.accountant": "rdp"}), 200)
    assert eps_more_noise < eps2


@pytest.mark.parametrize("text, msg", [
    ("[privacy\n", "not valid TOML"),
    ("[secrets]\nx = 1", "unknown section"),
    ("[privacy]\nepsilon = 3", "unknown key 'epsilon'"),
    ("[privacy]\nrequire_dp = 'yes'", "expects bool"),
    ("[data]\nmin_local_examples = 2.5", "expects int"),
    ("[code]\nallowed_tasks = 'heart-disease'", "list of strings"),
    ("[privacy]\nepsilon_cap = -1", "must be >= 0"),
    ("[privacy]\ndelta = 1.5", "privacy.delta must be in"),
    ('[privacy]\naccountant = "gdp"', "privacy.accountant must be prv or rdp"),
    ("[limits]\nmax_task_seconds = -1", "limits.max_task_seconds must be >= 0"),
    ("[limits]\nmax_steps = 10", "unknown key 'max_steps' in \\[limits\\]"),
])
def test_bad_policy_files_name_the_file(tmp_path, text, msg):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError, match=msg) as err:
        SitePolicy.load(p)
    assert str(p) in str(err.value)


def test_missing_policy_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_policy(str(tmp_path / "nope.toml"))


def test_base_model_allow_list(tmp_path):
    from fedcare.client.policy import base_model_of

    assert base_model_of(RunConfig(task="medical-abstracts")) == "sentence-transformers/all-MiniLM-L6-v2"
    assert base_model_of(RunConfig(task="heart-disease")) == ""  # trained from scratch: nothing to allow
    other = RunConfig(task="medical-llm")
    other.lora.base_model = "/models/some-7b"
    assert base_model_of(other) == "/models/some-7b"  # the run's override is what gets loaded
    pol = SitePolicy.load(write(tmp_path, '[code]\nallowed_base_models = ["some/other-model"]\n'))
    with pytest.raises(PolicyRefusal, match="base model 'sentence-transformers/all-MiniLM-L6-v2'"):
        pol.check(RunConfig(task="medical-abstracts").validate(), ME, 100)
    pol.check(cfg(), ME, 100)
