"""What users get from ``pip install``: a wheel that twistd finds the plugin in.

Builds the wheel from a copy of the source tree, installs it into a fresh virtualenv (its
dependencies from the package index, nothing from the development venv) and asks that venv's
twistd. Catches the classic packaging mistakes: the plugin file left out, a
``twisted/plugins/__init__.py`` (it would shadow Twisted's own plugins package), a stray
``dropin.cache``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PLUGIN = "twisted/plugins/mailrelay_plugin.py"

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_IGNORE = shutil.ignore_patterns(
    ".venv*",
    ".git",
    "build",
    "dist",
    "var",
    "*.egg-info",
    "__pycache__",
    "_build",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    "dropin.cache",
    "_trial_temp*",
)


def run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the tree (so the build leaves nothing in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_IGNORE)
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "-w",
            str(tmp / "dist"),
            str(src),
        ],
        cwd=tmp,
    )
    (whl,) = (tmp / "dist").glob("mailrelay-*.whl")
    return whl


@pytest.fixture(scope="module")
def fresh_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A new virtualenv (no system site-packages) with only the wheel and its dependencies."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    run([sys.executable, "-m", "venv", str(venv)], cwd=venv.parent)
    run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], cwd=venv.parent, timeout=600)
    yield venv


def test_source_tree_has_no_plugins_init() -> None:
    assert (ROOT / PLUGIN).is_file()
    assert not (ROOT / "twisted" / "plugins" / "__init__.py").exists()
    assert not (ROOT / "twisted" / "__init__.py").exists()


def test_wheel_contents(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert PLUGIN in names
    assert "twisted/plugins/__init__.py" not in names
    assert "twisted/__init__.py" not in names
    assert not [n for n in names if n.endswith("dropin.cache")]
    assert "mailrelay/__init__.py" in names
    assert "mailrelay/tap.py" in names
    assert not [n for n in names if n.startswith("tests/")]
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[mailrelay.routers]" in text


def test_installed_from_wheel_not_from_checkout(fresh_venv: Path) -> None:
    out = run(
        [str(fresh_venv / "bin" / "python"), "-c", "import mailrelay; print(mailrelay.__file__)"],
        cwd=fresh_venv.parent,
    ).stdout
    assert out.strip().startswith(str(fresh_venv)), out


def test_twistd_lists_the_plugin(fresh_venv: Path) -> None:
    out = run([str(fresh_venv / "bin" / "twistd"), "--help"], cwd=fresh_venv.parent).stdout
    assert any(line.split()[:1] == ["mailrelay"] for line in out.splitlines()), out


def test_twistd_mailrelay_help_shows_config(fresh_venv: Path) -> None:
    out = run(
        [str(fresh_venv / "bin" / "twistd"), "mailrelay", "--help"], cwd=fresh_venv.parent
    ).stdout
    assert "--config" in out, out


def make_dry_run(target: str, venv: Path) -> list[str]:
    # Under `make test` the make variables of the outer make would leak in (and print
    # "Entering directory"): start a clean, top-level make.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", target, f"VENV={venv}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def test_make_run_bootstraps_and_runs_the_plugin(tmp_path: Path) -> None:
    """``make run`` on a machine without a venv: create it, install for development in compat
    mode (a default editable install hides the plugin from twistd), run the example config."""
    venv = tmp_path / "venv"
    steps = make_dry_run("run", venv)
    assert steps[0] == f"python3 -m venv {venv}"
    install = next(s for s in steps if "pip install" in s)
    assert install.startswith(f"{venv}/bin/pip install") and "-e ." in install
    assert "editable_mode=compat" in install
    assert (
        steps[-1] == f"{venv}/bin/twistd -n --pidfile= mailrelay --config examples/mailrelay.toml"
    )


def test_make_test_installs_peers_then_lints_then_tests(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    steps = make_dry_run("test", venv)
    assert steps[0] == f"python3 -m venv {venv}"
    assert "'.[test]'" in next(s for s in steps if "pip install" in s)
    order = [
        next(i for i, s in enumerate(steps) if key in s)
        for key in ("pip install", "scripts/install-test-deps.sh", "ruff check", "bin/pytest")
    ]
    assert order == sorted(order), steps


def test_venv_is_not_rebuilt_when_up_to_date(tmp_path: Path) -> None:
    """The venv step is a file target: once made, ``make test`` goes straight to the tests."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    (venv / ".installed-test").touch()
    steps = make_dry_run("test", venv)
    assert not [s for s in steps if "pip install" in s or "-m venv" in s], steps


def test_ci_runs_make_test_and_nothing_else() -> None:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert [x for x in lines[1:] if x.strip() and not x.startswith("#")] == [
        "set -euo pipefail",
        "make test",
    ]
