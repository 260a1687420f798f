"""The ESMTP server: a thin Twisted protocol around ``Session``, and its factory.

The protocol only moves bytes, runs the idle/DATA timer on the injected reactor and sets
TCP_NODELAY; every decision is the session's. On a plain TCP connection a reply is sent at once
when nothing is queued before it (as asyncio's transports do) instead of waiting for the next
reactor turn (``_fast``): a non-pipelining client waits for each reply, so that turn (an epoll
change, a wake-up, a dispatch and another epoll change per reply) was most of Twisted's share per
message. The factory counts connections (total and per client address) and turns away the
excess with 421 4.7.0.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer, interfaces
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.envelope import Reply, SessionInfo
from mailrelay.interfaces import IPolicy
from mailrelay.observer import NULL_OBSERVER
from mailrelay.smtp import _fast, _log
from mailrelay.smtp import _states as S
from mailrelay.smtp import replies as R
from mailrelay.smtp.session import Session
from mailrelay.smtp.settings import (
    AuthThrottle,
    DelayedCall,
    MessageSink,
    Observer,
    SessionSettings,
)
from mailrelay.smtp.tls import tls_info

log = Logger()

#: While shutting down, how long a closed session may wait for the client's side of the close.
SHUTDOWN_LINGER = 2.0
#: Seconds a closed connection waits for the client (to hang up, to read our last reply, to answer
#: our TLS close) before it is dropped: no way of ending a session may hold its connection longer.
CLOSE_LINGER = 5.0


def _host_port(address: Any) -> tuple[str, int]:
    host = getattr(address, "host", None)
    port = getattr(address, "port", 0)
    return (str(host) if host is not None else "unknown"), int(port or 0)


@implementer(interfaces.IHandshakeListener, interfaces.IPushProducer)
class SMTPServerProtocol(Protocol):
    """Transport and clock ↔ ``Session``.

    It is its transport's streaming producer: when the replies the client has not read fill the
    transport's buffer, the transport pauses it, and the session takes no command (and reads at
    most ``PAUSE_ABOVE``) until they drain: a client that pipelines and never reads holds a bounded
    amount of our memory. Every close is bounded too (``lose_connection``).
    """

    factory: SMTPServerFactory
    session: Session

    #: The socket replies may be sent on directly (plain TCP, no TLS), else None.
    _socket: Any = None

    def __init__(self, factory: SMTPServerFactory, client_ip: str) -> None:
        self.factory = factory
        self.client_ip = client_ip  # the connecting address, as the factory's per-IP count has it
        self._timer: DelayedCall | None = None
        self._linger: DelayedCall | None = None
        self._handshaking = False  # TLS started, its handshake not completed yet
        self._silent = False  # closing because the client said nothing for the whole timeout
        self._producing = False  # registered as the transport's producer

    def connectionMade(self) -> None:
        transport: Any = self.transport  # TCP, TLS or a test's: its peer, host and flow control
        set_nodelay = getattr(transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            try:
                set_nodelay(True)
            except OSError:
                pass  # not a TCP socket (UNIX socket, memory transport)
        self._socket = _fast.direct_socket(transport)
        # The transport's peer, not buildProtocol's address: behind a ``haproxy:`` listener that
        # was the proxy's (trusted on loopback: every client behind it could relay), while the
        # transport's is the client in the PROXY header.
        peer_host, peer_port = _host_port(transport.getPeer())
        our_host, our_port = _host_port(transport.getHost())
        info = SessionInfo(
            client_address=peer_host,
            client_port=peer_port,
            hostname=self.factory.settings.hostname,
            server_address=our_host,
            server_port=our_port,
        )
        self.session = Session(
            self.factory.settings,
            info,
            self.factory.sink,
            self.factory.policy,
            self.factory.reactor,
            self,
            checker=self.factory.checker,
            auth_failures=self.factory.auth_failures,
        )
        self.session.observer = self.factory.observer
        self.factory.protocols.add(self)
        self.factory.observer.connection_opened(info)
        transport.registerProducer(self, True)
        self._producing = True
        if interfaces.ISSLTransport.providedBy(transport):
            self.session.tls_active = True  # implicit TLS (RFC 8314): no STARTTLS on offer
            self._handshaking = True
        self._arm()
        self.session.start()

    def dataReceived(self, data: bytes) -> None:
        self.session.data_received(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        session = self.session
        _log.disconnected(session.info, session.errors)
        session.connection_lost()
        self.factory.connection_closed(self.client_ip)
        self.factory.observer.connection_closed(session.info)
        self.factory._protocol_gone(self)

    # -- timer ----------------------------------------------------------------------------------

    # The timer is not reset on every read (that costs more than the read): it fires, then checks
    # how long ago the client last made progress (session.last_progress: a whole command or line,
    # not a byte), and sleeps again for the rest of the timeout.

    def _arm(self, delay: float | None = None) -> None:
        self._timer = self.factory.reactor.callLater(
            self.session.timeout if delay is None else delay, self._expired
        )

    def _expired(self) -> None:
        self._timer = None
        if self.session.busy:  # we are the slow one (a policy, the store): not the client's fault
            self._arm()
            return
        quiet = self.factory.reactor.seconds() - self.session.last_progress
        timeout = self.session.timeout  # DATA has its own
        if quiet < timeout:
            self._arm(timeout - quiet)
            return
        log.info(
            "timeout in session {id} from {ip}", id=self.session.info.session_id, ip=self.client_ip
        )
        self._silent = True
        self.session.timed_out()

    @property
    def _transport(self) -> Any:
        """TCP, TLS or a test's: whichever, it can pause, abort and start TLS."""
        return self.transport

    # -- SessionOutput --------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        _fast.write(self.transport, self._socket, data)

    def lose_connection(self) -> None:
        transport: Any = self.transport  # TCP or TLS: either can abort
        if self._producing:  # a TLS close waits for the producer to go
            self._producing = False
            transport.unregisterProducer()
        if self._handshaking and (self._silent or self.factory.draining is not None):
            # TLS begun, never completed (a client that sent STARTTLS and then nothing, or stopped
            # half-way), and now timed out or shut down: our last reply could only go out once the
            # handshake does, and Twisted's TLS close waits for that too. Drop it now. (Any other
            # close in a handshake, such as an implicit-TLS listener's connect-time refusal, may
            # still reach a client that completes it: it lingers below, bounded all the same.)
            transport.abortConnection()
            return
        if self._socket is not None and self.factory.draining is None:
            # Plain TCP: half-close, so our last reply leaves with a FIN. A client that is still
            # sending (a pipelined flood cut short by 421) would otherwise turn our close into
            # a reset, which discards that reply unread in its socket. What it sends meanwhile
            # is dropped (the session is closed); it gets a moment to hang up, then we do.
            if not _fast.half_close(transport, self._socket):
                transport.loseWriteConnection()
            self._linger = self.factory.reactor.callLater(CLOSE_LINGER, self.abort)
            return
        transport.loseConnection()
        # A TLS close waits for the client's close_notify, and any close for the client to read
        # what we sent: a client may do neither. Shutting down, our last reply gets less time.
        linger = CLOSE_LINGER if self.factory.draining is None else SHUTDOWN_LINGER
        self._linger = self.factory.reactor.callLater(linger, self.abort)

    def abort(self) -> None:
        """Drop the connection now if it is still there (nothing more to say on it)."""
        if self in self.factory.protocols:
            self._transport.abortConnection()

    def pause(self) -> None:
        self._transport.pauseProducing()

    def resume(self) -> None:
        self._transport.resumeProducing()

    # -- IPushProducer: the transport's buffer of replies unread by the client ---------------------

    def pauseProducing(self) -> None:
        self.session.output_blocked(True)

    def resumeProducing(self) -> None:
        self.session.output_blocked(False)

    def stopProducing(self) -> None:
        pass  # the connection is going: connectionLost follows

    def start_tls(self) -> None:
        self._socket = None  # every byte from now on goes through the TLS layer
        self._handshaking = True
        self._transport.startTLS(self.factory.tls_options)

    # -- IHandshakeListener ---------------------------------------------------------------------

    def handshakeCompleted(self) -> None:
        self._handshaking = False
        info = tls_info(self.transport)
        log.info("session {id}: TLS {tls}", id=self.session.info.session_id, tls=info)
        self.session.tls_established(info)
        self.factory.observer.tls_established("inbound", info.version if info else "")


class _Refuse(Protocol):
    """Says one reply and hangs up: for connections over the limits.

    The close is bounded like a session's: a client that never reads (or, on an implicit-TLS
    listener, never completes the handshake that would carry the reply) is dropped after
    ``CLOSE_LINGER``, so refused connections cannot pile up either.
    """

    def __init__(self, reply: Reply, observer: Observer, ip: str, clock: Any) -> None:
        self.reply = reply
        self.observer = observer
        self.ip = ip
        self.clock = clock
        self._linger: DelayedCall | None = None

    def connectionMade(self) -> None:
        self.observer.connection_refused(self.ip, self.reply)
        transport: Any = self.transport  # TCP or TLS: either can abort
        transport.write(self.reply.encode())
        transport.loseConnection()
        self._linger = self.clock.callLater(CLOSE_LINGER, transport.abortConnection)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None


@attrs.frozen
class ListenerLimits:
    """What a listener holds to beyond its sessions' settings (``mailrelay.listener`` builds it)."""

    max_connections: int = 1000
    max_connections_per_ip: int = 50
    #: not held to ``max_connections_per_ip`` (Postfix exempts mynetworks the same way)
    is_exempt: Callable[[str], bool] = lambda ip: False
    tls_options: Any = None  # for STARTTLS; needed when the settings offer it
    checker: ICredentialsChecker | None = None  # for AUTH


class SMTPServerFactory(Factory):
    """Builds server sessions sharing one sink, one policy and the limits of one listener.

    ``observer`` (an ``IRelayObserver``, set by whoever counts) hears of connections, TLS, refused
    commands and accepted messages. ``auth_failures`` counts AUTH failures per client address
    across sessions (``policy.limits.RateCounter``); None: not counted.
    """

    observer: Observer = NULL_OBSERVER
    noisy = False  # no "Starting factory" lines: the listener's own line says where it listens

    def __init__(
        self,
        settings: SessionSettings,
        sink: MessageSink,
        policy: IPolicy,
        reactor: Any,
        limits: ListenerLimits = ListenerLimits(),
        *,
        auth_failures: AuthThrottle | None = None,
        observer: Observer | None = None,
    ) -> None:
        if observer is not None:
            self.observer = observer
        self.sink = sink
        self.reactor = reactor
        self.auth_failures = auth_failures
        self.update(settings, limits, policy)
        self.connections = 0
        self.protocols: set[SMTPServerProtocol] = set()
        self.draining: Reply | None = None
        self._drained: list[defer.Deferred[None]] = []
        self.per_ip: Counter[str] = Counter()

    def update(
        self, settings: SessionSettings, limits: ListenerLimits, policy: IPolicy | None = None
    ) -> None:
        """New settings, limits and policy (SIGHUP): sessions running keep theirs."""
        if limits.tls_options is None and settings.starttls:
            raise ValueError("STARTTLS needs tls_options")
        self.settings = settings
        self.max_connections = limits.max_connections
        self.max_connections_per_ip = limits.max_connections_per_ip
        self.is_exempt = limits.is_exempt
        self.tls_options = limits.tls_options
        self.checker = limits.checker
        if policy is not None:
            self.policy = policy

    def buildProtocol(self, addr: Any) -> Protocol:
        ip, _ = _host_port(addr)
        if self.connections >= self.max_connections:
            return _Refuse(R.TOO_MANY_CONNECTIONS, self.observer, ip, self.reactor)
        if self.per_ip[ip] >= self.max_connections_per_ip and not self.is_exempt(ip):
            return _Refuse(R.TOO_MANY_FROM_YOU, self.observer, ip, self.reactor)
        self.connections += 1
        self.per_ip[ip] += 1
        return SMTPServerProtocol(self, ip)

    def connection_closed(self, ip: str) -> None:
        self.connections -= 1
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]

    # -- shutting down (used by MailRelayService.stopService) -----------------------------------

    def drain(self, reply: Reply) -> defer.Deferred[None]:
        """Close idle sessions with ``reply`` now, busy ones once their transaction ends.

        Fires when every session of this factory is gone (cancel it to stop waiting).
        """
        self.draining = reply
        for protocol in list(self.protocols):
            if protocol.session.state is S.CLOSED:
                protocol.abort()  # said goodbye already; only the client's TLS close is missing
            else:
                protocol.session.drain(reply)
        return self.when_closed()

    def when_closed(self) -> defer.Deferred[None]:
        """A Deferred firing once every session of this factory is gone."""
        if not self.protocols:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._drained.append(d)
        return d

    def close_all(self, reply: Reply) -> defer.Deferred[None]:
        """Deadline passed: say ``reply`` and close every session, whatever it was doing.

        Fires once they are all gone, which is bounded: a client that does not take the close is
        dropped after ``SHUTDOWN_LINGER`` (at once if its TLS handshake never completed).
        """
        for protocol in list(self.protocols):
            protocol.session.shutdown(reply)
        return self.when_closed()

    def _protocol_gone(self, protocol: SMTPServerProtocol) -> None:
        self.protocols.discard(protocol)
        if not self.protocols:
            waiting, self._drained = self._drained, []
            for d in waiting:
                if not d.called:
                    d.callback(None)
