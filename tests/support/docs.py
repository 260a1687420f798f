"""Where the shipped docs and examples are, and the local recipe they give: shared by the tests
that read them in memory and those that run them."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAKE_RUN_CONFIG = ROOT / "examples" / "mailrelay.toml"


def recipe(doc: Path) -> str:
    """The swaks command of the local end-to-end recipe in ``doc``."""
    commands = re.findall(
        r"^\s*(swaks [^\n#]*--to you@demo\.test[^\n#]*?)\s*(?:#.*)?$", doc.read_text(), re.M
    )
    assert commands, f"{doc.name} lost its local recipe (swaks ... --to you@demo.test)"
    assert "var/mail/new" in doc.read_text(), f"{doc.name} no longer says where the message lands"
    return commands[0]
