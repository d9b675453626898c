"""compose.yaml: valid for docker-compose and the Compose spec, and wired the way the
deployment needs (TLS as secrets, one key/ledger/data volume per hospital)."""
import json
import shutil
import subprocess
from pathlib import Path

import click
import pytest
import typer
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")
SPEC_SCHEMA = Path("/usr/lib/python3/dist-packages/compose/config/compose_spec.json")


@pytest.fixture(scope="module")
def doc():
    return yaml.safe_load(COMPOSE.read_text())


def test_docker_compose_config_accepts_it():
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed here (Debian package docker-compose)")
    out = subprocess.run([exe, "-f", str(COMPOSE), "config"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert set(HOSPITALS) <= set(resolved["services"])


def test_valid_against_compose_spec_schema(doc):
    if not SPEC_SCHEMA.exists():
        pytest.skip(f"{SPEC_SCHEMA} (shipped with docker-compose) is not here")
    import jsonschema

    errors = list(jsonschema.Draft7Validator(json.loads(SPEC_SCHEMA.read_text())).iter_errors(doc))
    assert not errors, [e.message for e in errors]
    assert "version" not in doc  # obsolete in Compose v2, which warns about it


def test_services_and_secrets(doc):
    services = doc["services"]
    assert {"superlink", "serverapp", "postgres", "dashboard", *HOSPITALS} <= set(services)
    declared = set(doc["secrets"])
    for name, svc in services.items():
        for s in svc.get("secrets", []):
            assert (s["source"] if isinstance(s, dict) else s) in declared, name
    for name, spec in doc["secrets"].items():
        assert spec["file"].startswith("./deploy/secrets/"), name
    ignore = (ROOT / "deploy" / "secrets" / ".gitignore").read_text()
    assert "*" in ignore.split()  # keys and passwords never reach git
    link = services["superlink"]
    targets = {s["target"] for s in link["secrets"] if isinstance(s, dict)}
    assert {"ca.pem", "server.pem", "server.key"} <= targets
    assert "--tls-dir" in link["command"] and "/run/secrets" in link["command"]
    assert all(f"/run/secrets/{h}.pub" in link["command"] for h in HOSPITALS)
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"].startswith("/run/secrets/")
    assert "ports" not in services["postgres"]
    assert all(p.startswith("127.0.0.1:") for p in services["dashboard"]["ports"])


def test_each_hospital_has_its_own_key_data_and_ledger(doc):
    keys, data, state = set(), set(), set()
    for h in HOSPITALS:
        svc = doc["services"][h]
        cmd = svc["command"]
        assert cmd[cmd.index("--site-id") + 1] == h
        key = [s["source"] for s in svc["secrets"] if isinstance(s, dict) and s["target"] == "node.key"]
        assert len(key) == 1
        keys.add(key[0])
        vols = svc["volumes"]
        data.add(next(v.split(":")[0] for v in vols if ":/data" in v))
        state.add(next(v.split(":")[0] for v in vols if v.split(":")[1] == "/site"))
        assert (ROOT / "deploy" / h / "policy.toml").exists()
        assert "ports" not in svc  # sites only dial out
    assert len(keys) == len(data) == len(state) == 3


def _parse(args: list[str]) -> None:
    """Parse args with fedcare's real CLI (no command runs); raises on a bad option."""
    from fedcare.cli import app

    cmd: click.Command = typer.main.get_command(app)
    rest = list(args)
    while isinstance(cmd, click.Group) and rest and not rest[0].startswith("-"):
        cmd = cmd.get_command(click.Context(cmd), rest.pop(0))
        assert cmd is not None, args
    cmd.make_context(cmd.name, rest)


def test_commands_parse_with_the_real_cli(doc):
    services = doc["services"]
    for name in ("superlink", "dashboard", *HOSPITALS):
        _parse(services[name]["command"])
    with pytest.raises(click.UsageError):
        _parse(["site", "start", "--no-such-flag"])
    superexec = subprocess.run(["flower-superexec", "--help"], capture_output=True, text=True).stdout
    for flag in services["serverapp"]["command"][::2]:
        assert flag in superexec


def test_policies_load(doc):
    from fedcare.client.policy import SitePolicy

    for h in HOSPITALS:
        SitePolicy.load(ROOT / "deploy" / h / "policy.toml")
    conn = (ROOT / "deploy" / "coordinator-flwr-home" / "config.toml").read_text()
    assert 'address = "superlink:8000"' in conn
