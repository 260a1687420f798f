"""Opening a usable session to one next hop: connect, greeting, EHLO, STARTTLS per policy, AUTH.

Every way this can fail is a ``HopFailure`` carrying the reply to record if no later hop does
better; ``retry_plaintext`` asks the caller to try the same hop again without TLS (``may`` policy,
handshake failed), ``soften`` says a 5xx here is about this host, not the message (so it becomes
a 4xx when it is the last word).
"""

from __future__ import annotations

import base64
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay import _ascii
from mailrelay._quiet import connect_protocol
from mailrelay.delivery._connect import connect_error_text, endpoint_for, hop_label
from mailrelay.delivery.pool import Session
from mailrelay.delivery.tls import ClientTLS, tls_info
from mailrelay.envelope import NextHop, Reply, Route, TLSPolicy
from mailrelay.smtp.client import ClientFailure, ClientState, ClientTimeouts, SMTPClientProtocol

log = Logger()


class HopFailure(Exception):
    """This hop cannot take the message now."""

    def __init__(
        self,
        reply: Reply,
        remote: str | None,
        *,
        final: bool = False,
        soften: bool = False,
        retry_plaintext: bool = False,
    ) -> None:
        super().__init__(str(reply))
        self.reply, self.remote = reply, remote
        self.final = final  # no other hop either: the reply stands for every recipient
        self.soften = soften
        self.retry_plaintext = retry_plaintext


def network_reply(f: ClientFailure, remote: str) -> Reply:
    """A 4xx for a session that broke without a reply (timeout, lost connection, garbage)."""
    stage = f.stage.upper()
    if "timeout" in f.reason:
        return Reply(
            451, "4.4.2", f"conversation with {remote} timed out while waiting for {stage}"
        )
    if "protocol error" in f.reason:
        return Reply(451, "4.5.0", f"{remote}: {f.reason} in reply to {stage}")
    return Reply(451, "4.4.2", f"lost connection with {remote} while waiting for {stage}")


class SessionOpener:
    """Builds set-up sessions; holds what every session shares (clock, HELO name, timeouts, TLS)."""

    def __init__(
        self,
        reactor: Any,
        helo_name: str,
        timeouts: ClientTimeouts,
        connect_timeout: float,
        tls: ClientTLS,
    ) -> None:
        self.reactor, self.helo_name, self.timeouts = reactor, helo_name, timeouts
        self.connect_timeout, self.tls = connect_timeout, tls
        self.open_clients: set[SMTPClientProtocol] = set()

    async def open(self, hop: NextHop, route: Route, plaintext: bool = False) -> Session:
        client, remote = await self._connect(hop, route)
        try:
            tls = "" if plaintext else await self._starttls(client, hop, route.tls, remote)
            if route.auth is not None:
                await self._auth(client, route, remote)
        except HopFailure:
            if client.state is not ClientState.CLOSED:
                client.quit()
            raise
        client.set_state(ClientState.READY)
        return Session(client, remote, self.reactor.seconds(), tls)

    async def _connect(self, hop: NextHop, route: Route) -> tuple[SMTPClientProtocol, str]:
        endpoint = endpoint_for(self.reactor, hop, self.connect_timeout, route.source)
        client = SMTPClientProtocol(self.helo_name, self.reactor, self.timeouts, lmtp=route.lmtp)
        try:
            await connect_protocol(endpoint, client)
        except Exception:
            f = Failure()
            where = f"{hop.host.strip('[]')}:{hop.port}"
            raise HopFailure(
                Reply(451, "4.4.1", f"connect to {where} failed: {connect_error_text(f)}"),
                hop_label(hop),
            ) from None
        self.open_clients.add(client)
        client.when_closed().addBoth(lambda _: self.open_clients.discard(client))
        peer = client.transport.getPeer() if client.transport is not None else None
        remote = hop_label(hop, getattr(peer, "host", None))
        try:
            await client.ready
        except ClientFailure as f:
            if f.reply is None:
                client.abort()
            raise HopFailure(f.reply or network_reply(f, remote), remote, soften=True) from None
        return client, remote

    async def _starttls(
        self, client: SMTPClientProtocol, hop: NextHop, policy: TLSPolicy, remote: str
    ) -> str:
        if policy is TLSPolicy.NONE:
            return ""
        required = policy in (TLSPolicy.ENCRYPT, TLSPolicy.VERIFY)
        if "STARTTLS" not in client.extensions:
            if required:
                raise HopFailure(
                    Reply(451, "4.7.4", f"TLS is required, but {remote} did not offer STARTTLS"),
                    remote,
                )
            return ""
        hostname = (hop.name or hop.host).strip("[]").rstrip(".")
        try:
            options = self.tls.options(policy, hostname)
        except Exception as e:  # an unreadable CA bundle: our problem, not the peer's
            raise HopFailure(
                Reply(451, "4.7.5", f"cannot set up TLS for {remote}: {e}"), remote
            ) from None
        client.set_state(ClientState.BUSY)
        r = await client.command(
            b"STARTTLS\r\n",
            "starttls",
            on_reply=lambda reply: client.start_tls(options) if reply.code == 220 else None,
        )
        if isinstance(r, ClientFailure):
            raise HopFailure(network_reply(r, remote), remote, retry_plaintext=not required)
        if r.code != 220:
            if required:
                raise HopFailure(Reply(451, "4.7.5", f"{remote} refused STARTTLS: {r}"), remote)
            client.set_state(ClientState.READY)
            return ""
        try:
            await client.ehlo()
        except ClientFailure as f:
            if f.reply is None:
                client.abort()
                reason = f"TLS handshake with {remote} failed ({f.reason})"
                log.info("{remote}: {reason}", remote=remote, reason=reason)
                raise HopFailure(
                    Reply(451, "4.7.5", reason), remote, retry_plaintext=not required
                ) from None
            raise HopFailure(f.reply, remote, soften=True) from None
        info = tls_info(client.transport)
        log.info(
            "{remote}: TLS established ({policy}): {info}",
            remote=remote,
            policy=policy.value,
            info=info,
        )
        return info or "TLS"

    async def _auth(self, client: SMTPClientProtocol, route: Route, remote: str) -> None:
        assert route.auth is not None
        if not client.tls and not route.allow_plaintext_auth:
            raise HopFailure(
                Reply(
                    451,
                    "4.7.0",
                    f"not sending credentials to {remote} over an unencrypted "
                    "connection (allow_plaintext_auth is off)",
                ),
                remote,
            )
        mechanisms = _ascii.split(_ascii.upper(client.extensions.get("AUTH", "")))
        user, password = route.auth
        client.set_state(ClientState.BUSY)
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
            r = await client.command(b"AUTH PLAIN " + token + b"\r\n", "auth")
        elif "LOGIN" in mechanisms:
            r = await client.command(b"AUTH LOGIN\r\n", "auth")
            for secret in (user, password):
                if isinstance(r, ClientFailure) or r.code != 334:
                    break
                r = await client.command(base64.b64encode(secret.encode()) + b"\r\n", "auth")
        else:
            raise HopFailure(
                Reply(451, "4.7.0", f"{remote} offers no AUTH mechanism we use (PLAIN, LOGIN)"),
                remote,
            )
        if isinstance(r, ClientFailure):
            raise HopFailure(network_reply(r, remote), remote)
        if not 200 <= r.code < 300:  # 235 per RFC 4954; smtp-sink and some others say 250
            raise HopFailure(Reply(451, "4.7.8", f"authentication failed at {remote}: {r}"), remote)
