"""Routing answers *where*: a chain of routers, each an ``IRouter``."""
