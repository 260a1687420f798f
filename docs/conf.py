"""Sphinx configuration for mailrelay's docs (built offline: no intersphinx, no network)."""

project = "mailrelay"
author = "the mailrelay authors"
copyright = "2026, the mailrelay authors"
release = "0.1.0"

extensions: list[str] = []
templates_path: list[str] = []
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []
highlight_language = "none"
nitpicky = True
