"""pyproject.toml ships every package of the source tree (an editable install would hide a
missing one: it maps the whole fastgen folder)."""

import pathlib

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {"fastgen." + init.parent.name for init in (ROOT / "fastgen").glob("*/__init__.py")}
    mapped = {name for name, folder in config["package-dir"].items()
              if (ROOT / folder / "__init__.py").exists()}
    assert listed == {"fastgen"} | on_disk | mapped


def test_package_data_matches_files():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package, patterns in config.get("package-data", {}).items():
        folder = ROOT / package.replace(".", "/")
        for pattern in patterns:
            assert list(folder.glob(pattern)), f"{package}: {pattern} matches no file"
