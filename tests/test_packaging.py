"""pyproject.toml ships every package: a wheel built from it holds what the commands import.

(.ci/run also builds the wheel, installs it into a fresh environment and runs
`tinyddpm train` and `sample` from it.)
"""
import pathlib
import tomllib

import setuptools

ROOT = pathlib.Path(__file__).resolve().parents[1]


def packages_on_disk():
    """Every folder of autograd/ and tinyddpm/ with an __init__.py, as a dotted name."""
    found = set()
    for top in ("autograd", "tinyddpm"):
        for init in (ROOT / top).rglob("__init__.py"):
            found.add(".".join(init.parent.relative_to(ROOT).parts))
    return found


def test_every_package_and_subpackage_goes_into_the_wheel():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert not isinstance(config["packages"], list), "a fixed list leaves out subpackages added later"
    include = config["packages"]["find"]["include"]
    shipped = set(setuptools.find_packages(where=str(ROOT), include=include))
    on_disk = packages_on_disk()
    assert {"autograd.kernels", "autograd.fast"} <= on_disk
    assert on_disk <= shipped, f"left out of the wheel: {sorted(on_disk - shipped)}"
    assert all(name.split(".")[0] in ("autograd", "tinyddpm") for name in shipped), sorted(shipped)


def test_the_package_data_the_commands_read_is_shipped():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = config["package-data"]["tinyddpm"]
    assets = [p for p in (ROOT / "tinyddpm" / "assets").iterdir() if p.is_file()]
    assert assets, "tinyddpm/assets holds the classifier that eval needs"
    for asset in assets:
        assert any(asset.match(pattern) for pattern in patterns), f"{asset.name} is not in package-data"
