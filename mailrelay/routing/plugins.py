"""Loading routers by name from the entry-point group ``mailrelay.routers``.

A third-party router is an ordinary distribution that registers a factory (an ``IRouterFactory``:
``factory(options, context) -> IRouter``), e.g. in its setup.cfg::

    [options.entry_points]
    mailrelay.routers =
        mytype = mypackage.router:MyRouter.from_options

``[[routes]] type = "mytype"`` then loads it with the rest of its table as ``options``. Everything
is checked at start-up: an unknown name, a factory that fails or an object that does not provide
``IRouter`` is a ``ConfigError`` naming the route's key in the config file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from mailrelay.config import RouteConfig
from mailrelay.envelope import Route
from mailrelay.errors import ConfigError, config_errors
from mailrelay.interfaces import IRouter
from mailrelay.routing.chain import RouterChain
from mailrelay.routing.context import RouterContext

GROUP = "mailrelay.routers"


def router_types() -> dict[str, EntryPoint]:
    """Every router type installed: name → entry point (the first one wins on duplicates)."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, ep)
    return found


def _describe(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    where = f" from {dist.name} {dist.version}" if dist is not None else ""
    return f"entry point '{ep.name} = {ep.value}'{where}"


def load_factory(type_name: str, source: str, key: str) -> tuple[Callable[..., Any], EntryPoint]:
    """The factory registered for ``type_name``; ``ConfigError`` at ``key.type`` if none."""
    types = router_types()
    ep = types.get(type_name)
    if ep is None:
        known = ", ".join(sorted(types)) or "none installed"
        raise ConfigError(
            source, f"{key}.type", f"unknown router type {type_name!r} (known: {known})"
        )
    try:
        factory = ep.load()
    except Exception as e:  # an ImportError, or anything the plugin module raises at import
        raise ConfigError(
            source,
            f"{key}.type",
            f"router type {type_name!r}: cannot load {_describe(ep)}: {type(e).__name__}: {e}",
        ) from e
    if not callable(factory):
        raise ConfigError(
            source,
            f"{key}.type",
            f"router type {type_name!r}: {_describe(ep)} is not callable (an IRouterFactory)",
        )
    return factory, ep


def build_one(route: RouteConfig, context: RouterContext) -> IRouter:
    """Build and verify the router of one ``[[routes]]`` table."""
    factory, ep = load_factory(route.type, context.source, route.key)
    try:
        router = factory(dict(route.options), context)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(
            context.source,
            route.key,
            f"router type {route.type!r} ({_describe(ep)}) failed: {type(e).__name__}: {e}",
        ) from e
    try:
        verifyObject(IRouter, router)
    except Invalid as e:
        raise ConfigError(
            context.source,
            f"{route.key}.type",
            f"router type {route.type!r}: {_describe(ep)} returned {router!r}, "
            f"which does not provide IRouter: {e}",
        ) from None
    return router


def build_router(
    routes: Sequence[RouteConfig],
    context_factory: Callable[[str], RouterContext],
    default: Route | None = None,
) -> RouterChain:
    """A ``RouterChain`` of the configured routes, in config order.

    ``context_factory(key)`` gives the ``RouterContext`` for the route at ``key`` (``routes[N]``):
    the reactor, thread pool and config file name for its errors. Every route that does not build
    is in the one ``ConfigError`` raised (``ConfigErrors`` for several).
    """
    routers, errors = [], []
    for r in routes:
        try:
            routers.append(build_one(r, context_factory(r.key)))
        except ConfigError as e:
            errors.append(e)
    if errors:
        raise config_errors(errors)
    return RouterChain(routers, default=default)
