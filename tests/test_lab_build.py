"""The committed lab extension build: it matches its sources, installs where JupyterLab looks, and the
TypeScript unit tests pass (run here when labextension/node_modules exists: `cd labextension && npm ci`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "labextension"
BUILT = ROOT / "plexus_mcp_jupyter" / "labextension"
INPUTS = ("package.json", "tsconfig.json", "src", "style", "schema")  # as labextension/scripts/record-hash.mjs


def sources_hash() -> str:
    """The hash record-hash.mjs writes after a build: each input file's path and bytes, in sorted order."""
    digest = hashlib.sha256()
    for name in INPUTS:
        path = SOURCE / name
        files = sorted(path.rglob("*"), key=lambda p: p.relative_to(SOURCE).parts) if path.is_dir() else [path]
        for file in files:
            if file.is_file():
                digest.update(file.relative_to(SOURCE).as_posix().encode() + b"\n")
                digest.update(file.read_bytes())
                digest.update(b"\n")
    return digest.hexdigest()


def test_the_committed_build_matches_the_sources():
    recorded = (BUILT / "sources.sha256").read_text().strip()
    assert recorded == sources_hash(), (
        "labextension/ changed since plexus_mcp_jupyter/labextension/ was built: rebuild with "
        "`cd labextension && npm ci && npm run build` and commit the result (docs/lab.md)"
    )


def test_the_build_is_a_complete_federated_extension():
    meta = json.loads((BUILT / "package.json").read_text())
    source = json.loads((SOURCE / "package.json").read_text())
    assert meta["name"] == source["name"] == "plexus-mcp-jupyter" and meta["version"] == source["version"]
    load = meta["jupyterlab"]["_build"]["load"]
    assert (BUILT / load).is_file() and (BUILT / "static" / "style.js").is_file()
    assert (BUILT / "schemas" / "plexus-mcp-jupyter" / "plugin.json").is_file()
    stale = {p.name for p in (BUILT / "static").glob("remoteEntry.*.js")} - {Path(load).name}
    assert not stale, f"old build outputs left in static/: {stale}"


def test_the_wheel_installs_it_where_jupyterlab_looks():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    shared = config["tool"]["hatch"]["build"]["targets"]["wheel"]["shared-data"]
    target = "share/jupyter/labextensions/plexus-mcp-jupyter"
    assert shared["plexus_mcp_jupyter/labextension"] == target
    assert shared["labextension/install.json"] == f"{target}/install.json"
    assert "hatch-jupyter-builder>=0.9" in config["build-system"]["requires"]


def test_jupyter_labextension_list_shows_it(tmp_path):
    """As installed by the wheel (share/jupyter/labextensions/...), found through JUPYTER_PATH here."""
    installed = tmp_path / "labextensions" / "plexus-mcp-jupyter"
    shutil.copytree(BUILT, installed)
    shutil.copy(SOURCE / "install.json", installed / "install.json")
    env = {**os.environ, "JUPYTER_PATH": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "jupyter", "labextension", "list"], env=env, capture_output=True, text=True, timeout=60
    )
    listing = out.stdout + out.stderr
    line = next((ln for ln in listing.splitlines() if "plexus-mcp-jupyter" in ln), "")
    assert "enabled" in line and "OK" in line and "(python, plexus-mcp-jupyter)" in line, listing


@pytest.mark.skipif(
    not (SOURCE / "node_modules").is_dir() or shutil.which("npx") is None,
    reason="labextension/node_modules is absent (run `cd labextension && npm ci` to include the TypeScript unit tests)",
)
def test_the_typescript_unit_tests_pass():
    out = subprocess.run(["npx", "vitest", "run"], cwd=SOURCE, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
