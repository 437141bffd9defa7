"""A regular (not editable) install works: what `pip install .` or `pip install loraline-0.1.0.tar.gz` gets.

The checkout's sources (pyproject.toml, README.md, src/, flows/) are copied to a temporary directory (no `build/` or
egg-info left from earlier builds gets in), an sdist is built there and a wheel from the unpacked sdist, both with
setuptools' own PEP 517 backend (what pip and uv call; no network, no installer). The wheel holds the library, the
flows as ``loraline_flows`` (never a top-level ``flows``), the Dockerfile and the MLflow start script as package data;
unpacked into a fresh venv's site-packages (what an installer does), it runs from outside any checkout: the console
script's module, the deployment runner's module, the packaged files, the image build context."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "src", "flows")

BUILD = """
import sys
import setuptools.build_meta as backend
print(getattr(backend, "build_" + sys.argv[1])(sys.argv[2]))
"""

# Run by the installed venv's Python, in a directory outside the checkout: prints what it found as JSON.
CHECK = r"""
import importlib.util, io, json, sys, tarfile, tempfile
from pathlib import Path

from loraline.image import DOCKERFILE, write_context
from loraline.services import MLFLOW_SCRIPT, SERVE_MODULE
from loraline.settings import _CHECKOUT
from loraline_flows.cli import main

out = Path(tempfile.mkdtemp())
merged = out / "merged"
merged.mkdir()
(merged / "config.json").write_text("{}")
ctx = write_context(out / "ctx.tar", mode="merged", name="m", merged_dir=merged, base_dir=merged, adapter_dir=merged,
                    adapter_files=None, lineage={"model_name": "m"})
with tarfile.open(ctx) as t:
    names = t.getnames()
    context_dockerfile = t.extractfile("Dockerfile").read().decode()
print(json.dumps({
    "flows": importlib.util.find_spec("flows") is not None,
    "serve": importlib.util.find_spec(SERVE_MODULE).origin,
    "cli": sys.modules[main.__module__].__file__,
    "dockerfile": str(DOCKERFILE),
    "context_dockerfile_same": context_dockerfile == DOCKERFILE.read_text(),
    "context": names,
    "mlflow_script": str(MLFLOW_SCRIPT),
    "mlflow_script_bash": MLFLOW_SCRIPT.read_text().startswith("#!/usr/bin/env bash"),
    "checkout": None if _CHECKOUT is None else str(_CHECKOUT),
}))
"""


def _backend(what: str, src: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-c", BUILD, what, str(out)], cwd=src, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out / r.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src-copy"
    src.mkdir()
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        p = REPO / name
        (shutil.copytree(p, src / name, ignore=junk) if p.is_dir() else shutil.copy2(p, src / name))
    sdist = _backend("sdist", src, tmp / "dist")
    with tarfile.open(sdist) as t:
        names = t.getnames()
        t.extractall(tmp / "unpacked", filter="data")
    root = f"{sdist.name.removesuffix('.tar.gz')}/"
    assert root + "src/loraline/data/docker/Dockerfile" in names and root + "flows/serve.py" in names
    return _backend("wheel", tmp / "unpacked" / root, tmp / "dist")


def test_wheel_ships_the_packages_and_the_package_data(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        infos = {i.filename: i for i in z.infolist()}
        entry_points = z.read(next(n for n in infos if n.endswith(".dist-info/entry_points.txt"))).decode()
    names = set(infos)
    assert {"loraline/data/docker/Dockerfile", "loraline/data/mlflow/server.sh",
            "loraline/data/text2sql/pairs.jsonl", "loraline/data/text2sql/schema.sql"} <= names
    assert infos["loraline/data/mlflow/server.sh"].external_attr >> 16 & 0o111  # still executable
    # Every module of the library (and of each of its packages) and of the flows is in the wheel.
    for src, pkg in ((REPO / "src" / "loraline", "loraline"), (REPO / "flows", "loraline_flows")):
        for py in src.rglob("*.py"):
            assert f"{pkg}/{py.relative_to(src).as_posix()}" in names, py
    assert {"loraline_flows/__init__.py", "loraline_flows/serve.py", "loraline_flows/cli.py"} <= names
    # Only loraline's own top-level names: nothing that could shadow another distribution's `flows`.
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"loraline", "loraline_flows"}
    assert "loraline = loraline_flows.cli:main" in entry_points


def test_installed_wheel_runs_outside_a_checkout(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    with zipfile.ZipFile(wheel) as z:  # what an installer does with a pure-Python wheel (scripts aside)
        z.extractall(site)
    # The dependencies: this interpreter's site-packages, after the venv's own (the .pth files there are not run, so
    # an editable loraline of this environment stays out of it).
    (site / "deps.pth").write_text("\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    work = tmp_path / "elsewhere"
    work.mkdir()
    r = subprocess.run([str(python), "-c", CHECK], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["flows"] is False  # `import flows` finds nothing: the flows are loraline_flows
    assert got["serve"] == str(site / "loraline_flows" / "serve.py")  # what `services up` runs: python -m ...
    assert got["cli"] == str(site / "loraline_flows" / "cli.py")
    assert got["dockerfile"] == str(site / "loraline" / "data" / "docker" / "Dockerfile")
    assert got["mlflow_script"] == str(site / "loraline" / "data" / "mlflow" / "server.sh") and got["mlflow_script_bash"]
    assert got["context_dockerfile_same"] and {"Dockerfile", "lineage.json", "model/config.json"} <= set(got["context"])
    assert got["checkout"] is None  # no .venv-vllm looked for in site-packages' parents
    help_ = subprocess.run([str(python), "-c", "import sys; from loraline_flows.cli import main; sys.argv[0] = 'loraline'; "
                            "main()", "--help"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert help_.returncode == 0 and "release" in help_.stdout and "services" in help_.stdout, help_.stderr[-2000:]


def test_checkout_links_to_the_packaged_files() -> None:
    """The documented places in the checkout (docker/Dockerfile, mlflow/server.sh) are links to the package data."""
    for link, target in (("docker/Dockerfile", "src/loraline/data/docker/Dockerfile"),
                         ("mlflow/server.sh", "src/loraline/data/mlflow/server.sh")):
        assert (REPO / link).is_symlink(), link
        assert (REPO / link).resolve() == (REPO / target).resolve(), link
