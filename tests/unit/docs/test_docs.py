"""The docs build cleanly (warnings are errors) and the configuration reference stays complete."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from mailrelay import config

DOCS = Path(__file__).resolve().parents[3] / "docs"
CONFIG_RST = DOCS / "configuration.rst"


def test_sphinx_build_without_warnings(tmp_path: Path) -> None:
    """``sphinx-build -W``, as ``make docs`` runs it: any warning (broken reference, page missing
    from the toctree, bad markup) fails."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-d",
            str(tmp_path / "doctrees"),
            str(DOCS),
            str(tmp_path / "html"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "html" / "index.html").exists()
    assert (tmp_path / "html" / "configuration.html").exists()


def config_keys() -> set[str]:
    """Every key ``mailrelay.config`` reads, as ``section.key``, derived from the typed config.

    Sections are the attrs-typed fields of ``Config`` (``server`` → ``ServerConfig``); a plain
    field named ``<section>_<key>`` (``metrics_listen``) is a key of that section. A field that
    fits neither rule fails here, so that whoever adds it decides how it is documented.
    """
    keys: set[str] = set()
    attrs.resolve_types(config.Config)  # config.py uses postponed annotations
    for field in attrs.fields(config.Config):
        if field.name in ("source", "routes"):
            continue
        if isinstance(field.type, type) and attrs.has(field.type):
            keys |= {f"{field.name}.{f.name}" for f in attrs.fields(field.type)}
            continue
        section, _, key = field.name.partition("_")
        assert section in config._SECTIONS and key, f"Config.{field.name}: which TOML key is it?"
        keys.add(f"{section}.{key}")
    return keys


def documented_keys() -> set[str]:
    return set(re.findall(r"^\.\. describe:: ([a-z_]+\.[a-z_]+)\s*$", CONFIG_RST.read_text(), re.M))


def test_config_keys_are_found() -> None:
    """Guard for the derivation itself: the contract keys must be among them."""
    keys = config_keys()
    assert {
        "server.listen",
        "server.hostname",
        "server.trusted_networks",
        "server.local_domains",
        "server.max_message_size",
        "spool.path",
        "queue.retry_schedule",
        "metrics.listen",
    } <= keys


def test_every_config_key_is_documented() -> None:
    """Nobody adds a key to mailrelay/config.py without a ``.. describe::`` entry in
    docs/configuration.rst, and no entry documents a key that does not exist."""
    keys = config_keys()
    documented = documented_keys() - {"routes.type"}
    assert sorted(keys - documented) == [], "add these to docs/configuration.rst"
    assert sorted(documented - keys) == [], "docs/configuration.rst documents keys config.py lacks"


def _toml_blocks(text: str) -> list[str]:
    blocks = []
    for m in re.finditer(r"^\.\. code-block:: toml\n\n((?:(?:   .*)?\n)+)", text, re.M):
        blocks.append("\n".join(line[3:] for line in m.group(1).splitlines()))
    return blocks


@pytest.mark.parametrize("page", ["configuration.rst", "quickstart.rst"])
def test_toml_examples_in_docs_load(page: str) -> None:
    """Every TOML example in the docs is a valid config, so the docs cannot drift from the
    loader."""
    blocks = _toml_blocks((DOCS / page).read_text())
    if page == "configuration.rst":
        assert blocks, "configuration.rst lost its complete example"
    for block in blocks:
        config.loads(block, f"docs/{page}")


def test_documented_defaults_match_config() -> None:
    """The defaults the reference states for plain numbers are the loader's defaults."""
    text = CONFIG_RST.read_text()
    defaults = config.from_dict({"server": {"hostname": "x.test"}})
    checked = 0
    for key, body in re.findall(r"^\.\. describe:: (\w+\.\w+)\n((?:(?:   .*)?\n)+)", text, re.M):
        m = re.search(r"Default: ``(\d+)``", body)
        if not m:
            continue
        section, name = key.split(".")
        actual = getattr(getattr(defaults, section), name)
        assert actual == int(m.group(1)), f"{key}: docs say {m.group(1)}, config.py says {actual}"
        checked += 1
    assert checked >= 10


def test_readme_lists_every_docs_page():
    """README.md is where a new user starts: it links every page of docs/ (and no page that is
    gone)."""
    readme = (DOCS.parent / "README.md").read_text()
    linked = set(re.findall(r"\]\(docs/([\w-]+)\.rst\)", readme))
    pages = {p.stem for p in DOCS.glob("*.rst")} - {"index"}
    assert sorted(pages - linked) == [], "add these pages to the README's Documentation list"
    assert sorted(linked - pages) == [], "the README links pages docs/ does not have"


def test_every_page_the_docs_promise_exists():
    """A page that says another page has something ("have their own page") links it with :doc:,
    and every :doc: target exists (sphinx -W checks that too, slowly)."""
    pages = {p.stem for p in DOCS.glob("*.rst")}
    for page in DOCS.glob("*.rst"):
        text = page.read_text()
        for target in re.findall(r":doc:`(?:[^`<]*<)?([\w-]+)>?`", text):
            assert target in pages, f"{page.name} links :doc:`{target}`, which does not exist"
        for m in re.finditer(r"(?:their|its) own page", text):
            assert ":doc:" in text[m.end() : m.end() + 20], (
                f"{page.name}: '{m.group()}' names no page"
            )
