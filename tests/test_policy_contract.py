"""A site's policy carries its data contract ([contract]): ``fedcare site start`` checks the
folder against it without ``--set`` (``--set`` may only narrow it), and the ClientApp
refuses a run whose ``data.*`` contract differs, before it reads the folder: a
coordinator in bad faith cannot swap the labels or read another column."""
import re
import subprocess
import sys

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedcare import schemas as S
from fedcare.certs import create_site_keys, init_server
from fedcare.client.app import app as client_app
from fedcare.client.audit import AuditLog
from fedcare.client.policy import SitePolicy
from fedcare.config import RunConfig
from fedcare.errors import ConfigError, PolicyRefusal
from fedcare.flower import free_port
from fedcare.launch import resolve_config

from sitefolders import heart_parquet

POLICY = """
[code]
allowed_tasks = ["tabular"]

[contract]
labels = ["no disease", "disease"]
features = "age,sex,thalach"
"""
GOOD = ["data.labels=no disease,disease", "data.features=age,sex,thalach"]


def policy(tmp_path, text=POLICY):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def run(**sets):
    return RunConfig(task="tabular").apply_sets(GOOD + [f"data.{k}={v}" for k, v in sets.items()])


# ------------------------------------------------------------------------ the policy file
def test_contract_is_read_as_list_or_string_and_strictly(tmp_path):
    pol = SitePolicy.load(policy(tmp_path))
    assert pol.contract == (("labels", "no disease,disease"), ("features", "age,sex,thalach"))
    for text, words in [("[contract]\nlabel = ['a', 'b']", "unknown key 'label' in [contract]"),
                        ("[contract]\nimage_size = '64'", "contract.image_size expects int"),
                        ("[contract]\nimage_size = 0", "contract.image_size must be at least 1"),
                        ("[contract]\nfeatures = ['age', 'sex=f']", "needs at least two levels"),
                        ("[contract]\nlabels = 'a,b,a'", "names a label twice"),
                        ("[contract]\nprompt_template = 'Q:'", "must contain {prompt}")]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            SitePolicy.load(policy(tmp_path, text))


def test_a_run_must_carry_the_sites_contract_and_may_only_use_fewer_features(tmp_path):
    pol = SitePolicy.load(policy(tmp_path, POLICY + "image_size = 64\n"))
    pol.check(run(), {}, 100)
    pol.check(run(features="thalach,age"), {}, 100)   # fewer columns, any order: allowed
    pol.check(run(image_size=64), {}, 100)           # 0 above means the family's 64
    for change, words in [({"labels": "disease,no disease"}, "data.labels is 'disease,no disease'"),
                          ({"labels": "no disease,disease,unsure"}, "data.labels"),
                          ({"features": "age,sex,thalach,chol"}, "data.features is 'age,sex,thalach,chol'"),
                          ({"features": "age,sex=0|1"}, "data.features"),
                          ({"features": ""}, "data.features"),
                          ({"image_size": 32}, "data.image_size is '32'")]:
        with pytest.raises(PolicyRefusal, match="differs from the site's \\[contract\\]: " + words):
            pol.check(run(**change), {}, 100)
    SitePolicy.load(policy(tmp_path, "")).check(run(labels="x,y"), {}, 100)   # no [contract]: any


def test_set_may_narrow_the_policys_contract_but_not_change_it(tmp_path):
    pol = SitePolicy.load(policy(tmp_path))
    assert RunConfig().apply_sets(list(pol.contract_sets(()))).data.features == "age,sex,thalach"
    narrowed = RunConfig().apply_sets(list(pol.contract_sets(["data.features=age"])))
    assert narrowed.data.features == "age" and narrowed.data.labels == "no disease,disease"
    with pytest.raises(ConfigError, match="--set disagrees with the site policy .* data.labels is 'a,b'"):
        pol.contract_sets(["data.labels=a,b"])


# --------------------------------------------------------------------------- the ClientApp
@pytest.mark.parametrize("change, refused", [({"labels": "disease,no disease"}, True),
                                             ({"features": "age,sex,thalach,chol"}, True),
                                             ({"features": "age,sex"}, False)])
def test_the_client_app_refuses_a_relabelled_run_before_reading_the_folder(tmp_path, identity, change, refused):
    folder = tmp_path / "empty"   # no dataset.toml: reading it would be a data refusal, not the policy's
    folder.mkdir()
    cfg = resolve_config("tabular", GOOD + [f"data.{k}={v}" for k, v in change.items()], rounds=1, seed=3)
    ctx = Context(run_id=1, node_id=5, state=RecordDict(), run_config=cfg.to_flat(),
                  node_config={"site-id": "h", "data-path": str(folder), "policy": str(policy(tmp_path)),
                               "audit": str(tmp_path / "a.jsonl")})
    for kind in ("train", "evaluate"):
        msg = Message(RecordDict({S.CONFIG: ConfigRecord({"server-round": 1})}), dst_node_id=5, message_type=kind)
        msg.metadata.__dict__["_message_id"] = f"m-{kind}"
        info = client_app(msg, ctx).content[S.SITE]
        assert info[S.STATUS] == "refused"
        assert ("its data contract differs from the site's [contract]" in info[S.REASON]) is refused, info[S.REASON]
    assert [e["decision"] for e in AuditLog(tmp_path / "a.jsonl").entries()] == ["refused", "refused"]


# ---------------------------------------------------------------------- fedcare site start
@pytest.fixture(scope="module")
def material(tmp_path_factory):
    root = tmp_path_factory.mktemp("start")
    tls = init_server(root / "tls", ["localhost"], ["127.0.0.1"])
    keys = create_site_keys("cleveland", root / "keys")
    return root, tls.ca_cert, keys.private_key, heart_parquet(root / "cleveland")


def site_start(material, policy_path, *sets):
    root, ca, key, folder = material
    args = ["site", "start", "--site-id", "cleveland", "--data", str(folder), "--task", "tabular",
            "--superlink", f"127.0.0.1:{free_port()}", "--root-cert", str(ca), "--node-key", str(key),
            "--ledger", str(root / "ledger.sqlite"), "--policy", str(policy_path),
            "--workdir", str(root / "work"), *(x for s in sets for x in ("--set", s))]
    return subprocess.run([sys.executable, "-c", "from fedcare.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120)


def test_site_start_checks_the_folder_against_the_policys_contract(material, tmp_path):
    out = site_start(material, policy(tmp_path))   # no --set: the policy's contract
    assert "199 training examples for task tabular" in out.stdout, out.stdout + out.stderr
    assert out.returncode == 2 and "SuperLink" in out.stderr   # then stops: nothing listens there

    out = site_start(material, policy(tmp_path), "data.labels=disease,no disease")
    assert out.returncode == 2 and "training examples" not in out.stdout
    assert out.stderr.strip().splitlines() == [
        f"error: --set disagrees with the site policy {tmp_path / 'policy.toml'} [contract]: data.labels is "
        "'disease,no disease', the site's contract says 'no disease,disease'"]

    out = site_start(material, policy(tmp_path, POLICY.replace("thalach", "thalach,smoker")))
    assert out.returncode == 2 and "training examples" not in out.stdout
    assert len(out.stderr.strip().splitlines()) == 1 and "smoker" in out.stderr, out.stderr
