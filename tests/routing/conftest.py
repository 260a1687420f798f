"""Fixtures of the routing tests: a real NSD and a real slapd on loopback."""

from tests.routing.nsd import nsd  # noqa: F401  (fixture)
from tests.routing.slapd import slapd  # noqa: F401  (fixture)
