"""Routing answers *where*: a chain of routers, each an ``IRouter``.

The built-in routers and the pieces a plugin author may reuse, re-exported::

    from mailrelay.routing import MXRouter, RouterChain, RouterContext, build_router
"""

from mailrelay.routing.chain import RouterChain
from mailrelay.routing.context import RouterContext
from mailrelay.routing.ldap import LDAPRouter
from mailrelay.routing.mx import MXRouter
from mailrelay.routing.plugins import build_router, router_types
from mailrelay.routing.static import StaticRouter

__all__ = [
    "LDAPRouter",
    "MXRouter",
    "RouterChain",
    "RouterContext",
    "StaticRouter",
    "build_router",
    "router_types",
]
