"""A built wheel works without the source tree: build it, install it into a fresh
virtual environment, and run a heart-disease simulation from a folder that is not the
checkout (bundled data and the Flower app come from the installed package)."""
import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]


def _venv_with_flower_scripts(venv: Path) -> Path:
    """A venv that sees the running interpreter's packages (torch, flwr...) but not
    fedcare's source; flwr's console scripts are re-pointed at the venv's python, as pip
    would write them, so the SuperLink and the apps it spawns import the installed wheel.

    ``--system-site-packages`` sees the *base* interpreter's packages: when the tests
    run inside a virtual environment (the README's install), a .pth file adds that
    environment's site-packages too (as plain paths: its editable fedcare stays unseen)."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    if sys.prefix != sys.base_prefix:
        own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
        outer = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"]])
        (Path(own) / "_running_interpreter.pth").write_text("".join(f"{p}\n" for p in outer))
    system_bin = Path(shutil.which("flower-superlink")).parent
    for script in system_bin.iterdir():
        if script.name.startswith(("flwr", "flower-")) and script.is_file():
            lines = script.read_text().splitlines()
            if lines and lines[0].startswith("#!") and "python" in lines[0]:
                target = venv / "bin" / script.name
                target.write_text("\n".join([f"#!{python}", *lines[1:]]) + "\n")
                target.chmod(0o755)
    return python


def test_a_wheel_installed_into_a_fresh_venv_runs_a_simulation(tmp_path):
    src = tmp_path / "src"   # build from a copy: no build/ folder is left in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__",
                                                             ".pytest_cache", "bench", "tests", "runs"))
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                            "-w", str(dist)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    wheel = next(dist.glob("fedcare-*.whl"))
    venv = tmp_path / "venv"
    python = _venv_with_flower_scripts(venv)
    inst = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
                           str(wheel)], capture_output=True, text=True, timeout=600)
    assert inst.returncode == 0, inst.stdout[-3000:] + inst.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FEDCARE_DATA_DIR", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", FEDCARE_WORKDIR=str(tmp_path / "runs"))
    where = subprocess.run([str(python), "-c", "import fedcare, fedcare.models.data as d, fedcare.flower as f;"
                            "print(fedcare.__file__); print(d.BUNDLED_DATA); print(f.app_dir())"],
                           capture_output=True, text=True, cwd=elsewhere, env=env)
    assert where.returncode == 0, where.stderr
    module, data, app = where.stdout.split()
    site_packages = str(venv / "lib")
    assert module.startswith(site_packages) and data.startswith(site_packages), where.stdout
    assert not app.startswith((str(ROOT), str(src))), app

    db = f"sqlite:///{tmp_path / 'wheel.db'}"
    fedcare = venv / "bin" / "fedcare"
    run = subprocess.run([str(fedcare), "simulate", "--quiet", "--db", db, "--task", "heart-disease",
                          "--rounds", "1", "--set", "train.local_steps=3"],
                         capture_output=True, text=True, timeout=900, cwd=elsewhere, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    run_id = re.search(r"run (run-\S+) completed", run.stdout).group(1)
    rep = subprocess.run([str(fedcare), "report", run_id, "--db", db, "--json"],
                         capture_output=True, text=True, timeout=300, cwd=elsewhere, env=env)
    report = json.loads(rep.stdout)
    assert report["status"] == "completed" and len(report["rounds"]) == 1
    assert {s["site"] for s in report["rounds"][0]["sites"] if s["accepted"]} == {
        "cleveland", "hungary", "switzerland", "va"}


def test_the_venv_sees_the_running_interpreters_packages_even_inside_a_venv(tmp_path):
    """Run the helper from inside a virtual environment holding a package the base
    interpreter lacks: the venv it makes must see that package (it did not: the README's
    venv install then failed with ModuleNotFoundError: tomli_w)."""
    outer = tmp_path / "outer"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(outer)], check=True)
    outer_python = outer / "bin" / "python"
    purelib = subprocess.run([str(outer_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "only_in_the_outer_venv.py").write_text("WHERE = 'outer'\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{outer / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    made = subprocess.run([str(outer_python), "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                           "from test_wheel_e2e import _venv_with_flower_scripts as v; "
                           "print(v(__import__('pathlib').Path(sys.argv[2])))", str(ROOT / "tests"),
                           str(tmp_path / "inner")], capture_output=True, text=True, env=env, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    inner_python = made.stdout.split()[-1]
    seen = subprocess.run([inner_python, "-c", "import only_in_the_outer_venv as m, flwr; print(m.WHERE)"],
                          capture_output=True, text=True, env=env)
    assert seen.returncode == 0 and seen.stdout.strip() == "outer", seen.stderr[-2000:]
