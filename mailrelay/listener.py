"""``[server]`` config -> an SMTP listener: session settings, listener limits, intake, factory.

The wire (``mailrelay.smtp``) knows no config file; this is where the config's words become its
values. Everything that can fail (certificate, key, password file) is loaded here, before any
factory changes, so a bad new config at SIGHUP raises and changes nothing.
"""

from __future__ import annotations

from typing import Any

from twisted.cred.checkers import ICredentialsChecker

from mailrelay.config import ServerConfig
from mailrelay.intake import Intake
from mailrelay.interfaces import IPolicy
from mailrelay.policy.access import is_trusted
from mailrelay.policy.limits import RateCounter
from mailrelay.smtp.server import ListenerLimits, SMTPServerFactory
from mailrelay.smtp.settings import MessageSink, SessionSettings
from mailrelay.smtp.tls import server_tls_options


def session_settings(
    server: ServerConfig,
    *,
    starttls: bool = False,
    auth: bool = False,
    submission: bool = False,
    binarymime: bool = False,
) -> SessionSettings:
    """The settings of every session of one listener of ``server``."""
    return SessionSettings(
        hostname=server.hostname,
        intake=Intake(hopcount_limit=server.hopcount_limit),
        binarymime=binarymime,
        max_message_size=server.max_message_size,
        max_recipients=server.max_recipients,
        max_errors=server.max_errors,
        recipient_overshoot_limit=server.recipient_overshoot_limit,
        command_line_limit=server.command_line_limit,
        text_line_limit=server.text_line_limit,
        idle_timeout=server.idle_timeout,
        data_timeout=server.data_timeout,
        starttls=starttls,
        auth_mechanisms=("PLAIN", "LOGIN") if auth else (),
        allow_plaintext_auth=server.allow_plaintext_auth,
        require_auth=submission,
        greet_delay=server.greet_delay,
        limit_trusted=server.limit_trusted_clients,
    )


def listener_limits(
    server: ServerConfig,
    reactor: Any,
    tls_options: Any = None,
    checker: Any = None,  # an ICredentialsChecker provider
) -> ListenerLimits:
    """Limits, TLS options (``tls_certificate``/``tls_key`` unless given) and AUTH checker
    (``auth_password_file`` unless given)."""
    if tls_options is None and server.tls_certificate and server.tls_key:
        tls_options = server_tls_options(server.tls_certificate, server.tls_key)
    if checker is None and server.auth_password_file:
        from mailrelay.smtp.auth import HashedPasswordFile

        pool = getattr(reactor, "getThreadPool", None)
        checker = HashedPasswordFile(
            server.auth_password_file, reactor if pool else None, pool() if pool else None
        )
    # Postfix exempts mynetworks from its per-client limits (smtpd_client_event_limit_exceptions)
    exempt = () if server.limit_trusted_clients else tuple(server.trusted_networks)
    return ListenerLimits(
        max_connections=server.max_connections,
        max_connections_per_ip=server.max_connections_per_ip,
        is_exempt=lambda ip: is_trusted(ip, exempt),
        tls_options=tls_options,
        checker=checker,
    )


def server_factory(
    server: ServerConfig,
    sink: MessageSink,
    policy: IPolicy,
    reactor: Any,
    *,
    submission: bool = False,
    tls_options: Any = None,
    checker: ICredentialsChecker | None = None,
    binarymime: bool = False,
    **extras: Any,
) -> SMTPServerFactory:
    """The factory for one listener of ``server`` (it was ``SMTPServerFactory.from_config``).

    ``submission=True`` makes a listener that requires AUTH before MAIL (port 587 style).
    ``binarymime``: offer BINARYMIME, for every route onward carries it (``Config.binarymime``).
    ``checker``: any ``ICredentialsChecker`` for ``IUsernamePassword``. ``extras`` go to the
    factory (``observer``, ``auth_failures``); AUTH failures are counted per client address
    across sessions, 10 in 10 minutes and AUTH is refused, unless ``auth_failures`` is given.
    """
    limits = listener_limits(server, reactor, tls_options, checker)
    settings = _settings(server, limits, submission, binarymime)
    extras.setdefault("auth_failures", RateCounter(reactor, 10, 600.0))
    return SMTPServerFactory(settings, sink, policy, reactor, limits, **extras)


def reconfigure(
    factory: SMTPServerFactory,
    server: ServerConfig,
    policy: IPolicy | None = None,
    binarymime: bool | None = None,
) -> None:
    """Take a new config (SIGHUP): limits, certificate, password file and policy.

    Everything is loaded first, so a bad new certificate raises and changes nothing. Sessions
    already running keep their limits; a STARTTLS after this uses the new certificate.
    """
    if binarymime is None:
        binarymime = factory.settings.binarymime
    limits = listener_limits(server, factory.reactor)
    settings = _settings(server, limits, factory.settings.require_auth, binarymime)
    factory.update(settings, limits, policy)


def _settings(
    server: ServerConfig, limits: ListenerLimits, submission: bool, binarymime: bool
) -> SessionSettings:
    return session_settings(
        server,
        starttls=limits.tls_options is not None,
        auth=limits.checker is not None,
        submission=submission,
        binarymime=binarymime,
    )
