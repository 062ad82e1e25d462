"""The packaging hook's build step for the lab extension (pyproject.toml, [tool.hatch.build.hooks.jupyter-builder]).

The built extension is committed (plexus_mcp_jupyter/labextension/), so installing the package never needs
Node: the JavaScript build runs only when those assets are missing, or when PLEXUS_LAB_REBUILD=1 asks for it
(a developer with Node). hatch-jupyter-builder's own `skip-if-exists` does not apply to editable installs,
hence this function.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BUILT = ROOT / "plexus_mcp_jupyter" / "labextension" / "static" / "style.js"


def build(target_name: str, version: str, **kwargs: Any) -> None:
    if BUILT.exists() and os.environ.get("PLEXUS_LAB_REBUILD") != "1":
        logging.getLogger(__name__).info("the lab extension is built already: %s", BUILT.parent)
        return
    from hatch_jupyter_builder import npm_builder

    npm_builder(target_name, version, path=str(ROOT / "labextension"), build_cmd="build", npm=["npm"], **kwargs)
