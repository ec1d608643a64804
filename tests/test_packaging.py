"""The wheel holds every package: each folder with an __init__.py is listed in pyproject.toml (a
missing `prunec.kernels` once made `import prunec.ops` fail from a wheel; CI also installs the wheel)."""
from __future__ import annotations

import tomllib

from conftest import REPO


def test_every_package_folder_is_in_the_wheel():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    dirs = {"prunec": "prunec", **config["package-dir"]}
    found = {"prunec.passes"} | {
        ".".join(("prunec",) + path.parent.relative_to(REPO / "prunec").parts)
        for path in (REPO / "prunec").rglob("__init__.py")}
    assert found == listed, f"not in pyproject packages: {sorted(found - listed)}; stale: {sorted(listed - found)}"
    assert dirs["prunec.passes"] == "passes"


def test_the_zoo_extra_installs_what_gguf_loading_needs():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("accelerate") for req in extras["zoo"])
