"""Shared fixtures: real peers (tests/peers.py)."""

from tests.peers import smtp_sink  # noqa: F401  (fixture)
