"""Resource limits: huge headers, millions of tiny lines, a 1 GB declared SIZE, an oversize stream,
10,000 RCPTs, deeply nested MIME in bounces — each with a clear reply and bounded memory.

Memory is the relay process's own: VmHWM (peak RSS) from /proc, against its figure after start-up.
"""

from __future__ import annotations

import email
import email.policy
import io
import threading
import tracemalloc

import pytest

from mailrelay.envelope import Envelope, Recipient, RecipientState, RecipientStatus, Reply
from mailrelay.queue.bounce import RETURN_SIZE_LIMIT, Action, build_report
from mailrelay.queue.store import new_message
from tests.support.peers import flood_unread
from tests.support.reliability.helpers import Raw, route_to, rss_kib, wait_for_ids

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
LIMIT = '[server]\nmax_message_size = "16M"\n'


def send_text(c: Raw, text_chunks, rcpts: tuple[str, ...] = ("b@example.test",)) -> bytes:
    """One transaction whose (already CRLF, never dot-starting) text comes from an iterator."""
    assert c.cmd("MAIL FROM:<a@example.org>").startswith(b"250")
    for r in rcpts:
        assert c.cmd(f"RCPT TO:<{r}>").startswith(b"250")
    assert c.cmd("DATA").startswith(b"354")
    for chunk in text_chunks:
        c.send(chunk)
    c.send(b".\r\n")
    return c.reply()


def repeat(block: bytes, total: int, head: bytes = b""):
    yield head
    n = max(1, (1 << 20) // len(block))
    chunk = block * n
    sent = 0
    while sent < total:
        yield chunk
        sent += len(chunk)


@pytest.mark.parametrize(
    "scale", [pytest.param(1, id="make-test"), pytest.param(10, marks=pytest.mark.soak, id="soak")]
)
def test_huge_headers_tiny_lines_and_oversize_streams_stay_bounded(relays, sinks, scale):
    sink = sinks()
    relay = relays(LIMIT.replace('"16M"', f'"{16 * scale}M"') + route_to(sink.port))
    assert relay.proc is not None
    base, _ = rss_kib(relay.proc.pid)
    out = {}
    with Raw(relay.port) as c:
        c.greet()
        # 1. a 12 MiB header section: 6 MiB of header lines, then one header folded over 6 MiB
        header_lines = repeat(
            b"X-Filler: " + b"h" * 88 + b"\r\n",
            6 * MIB * scale,
            head=b"Message-ID: <headers@limits.test>\r\n",
        )
        folded = repeat(b"\t" + b"f" * 97 + b"\r\n", 6 * MIB * scale, head=b"Subject: folded\r\n")
        out["huge headers"] = send_text(c, [*header_lines, *folded, b"\r\nbody\r\n"])
        # 2. a million tiny lines (ten million in the soak)
        out["tiny lines"] = send_text(
            c,
            repeat(b"a\r\n", 1_000_000 * 3 * scale, head=b"Message-ID: <tiny@limits.test>\r\n\r\n"),
        )
        # 3. a 1 GB declared SIZE: refused at MAIL, the session goes on
        out["SIZE=1GB"] = c.cmd("MAIL FROM:<a@example.org> SIZE=1073741824")
        assert c.cmd("NOOP").startswith(b"250")
        # 4. and a stream that really is bigger than the limit: read and thrown away, 552 after the
        # dot
        out["oversize stream"] = send_text(
            c,
            repeat(
                b"o" * 98 + b"\r\n",
                40 * MIB * scale,
                head=b"Message-ID: <over@limits.test>\r\n\r\n",
            ),
        )
        assert c.cmd("NOOP").startswith(b"250")
    rss, peak = rss_kib(relay.proc.pid)
    got = wait_for_ids(sink, ["<headers@limits.test>", "<tiny@limits.test>"], timeout=60)
    print(
        f"\nlimits (scale {scale}): "
        + "; ".join(f"{k} → {v.decode().strip()[:40]}" for k, v in out.items())
        + f"; relay RSS {base} KiB at start, {rss} KiB after, peak {peak} KiB "
        f"(+{(peak - base) // 1024} MiB)"
    )
    assert out["huge headers"].startswith(b"250 2.0.0")
    assert out["tiny lines"].startswith(b"250 2.0.0")
    assert out["SIZE=1GB"].startswith(b"552 5.3.4")
    assert out["oversize stream"].startswith(b"552 5.3.4")
    assert got == {"<headers@limits.test>": 1, "<tiny@limits.test>": 1}
    assert peak - base < 48 * 1024, f"peak RSS grew by {(peak - base) // 1024} MiB"


def _recipients_send(c: Raw, n: int, errors: list[BaseException]) -> None:
    try:
        c.send(b"".join(b"RCPT TO:<r%d@example.test>\r\n" % i for i in range(n)))
    except OSError as e:  # the server may close while we are still writing
        errors.append(e)


def test_ten_thousand_recipients_get_clear_replies(relays, sinks):
    sink = sinks()
    relay = relays("[server]\nmax_errors = 100000\n" + route_to(sink.port))
    assert relay.proc is not None
    base, _ = rss_kib(relay.proc.pid)
    with Raw(relay.port) as c:
        c.greet()
        assert c.cmd("MAIL FROM:<a@example.org>").startswith(b"250")
        errors: list[BaseException] = []
        writer = threading.Thread(target=_recipients_send, args=(c, 10_000, errors))
        writer.start()
        replies = [c.reply() for _ in range(10_000)]
        writer.join()
        assert c.cmd("DATA").startswith(b"354")
        c.send(b"Message-ID: <many@limits.test>\r\n\r\nhi\r\n.\r\n")
        final = c.reply()
    codes = [r[:9] for r in replies]
    _, peak = rss_kib(relay.proc.pid)
    # and with the default limits, the flood ends in 421 and a closed connection once 1,000 RCPTs
    # past max_recipients were answered 452 (recipient_overshoot_limit) and max_errors more
    strict = relays(route_to(sink.port))
    with Raw(strict.port) as c2:
        c2.greet()
        assert c2.cmd("MAIL FROM:<a@example.org>").startswith(b"250")
        errors2: list[BaseException] = []
        writer = threading.Thread(target=_recipients_send, args=(c2, 10_000, errors2))
        writer.start()
        flood = []
        while (r := c2.reply()) != b"":
            flood.extend(ln for ln in r.split(b"\r\n") if ln)
        writer.join()
    got = wait_for_ids(sink, ["<many@limits.test>"], timeout=30)
    [t] = sink.transactions()
    print(
        f"\n10,000 RCPTs: {codes.count(b'250 2.1.5')} × 250 2.1.5, {codes.count(b'452 4.5.3')} × "
        f"452 4.5.3, DATA → {final.decode().strip()[:30]}, delivered to {len(t.recipients)}; peak "
        f"RSS +{(peak - base)} KiB; with the default limits: {len(flood)} replies, last "
        f"{flood[-1].decode()}, then closed"
    )
    assert codes == [b"250 2.1.5"] * 100 + [b"452 4.5.3"] * 9_900
    assert final.startswith(b"250 2.0.0") and got == {"<many@limits.test>": 1}
    assert len(t.recipients) == 100
    assert flood[:100] == [b"250 2.1.5 Ok"] * 100 and flood[-1].startswith(b"421 4.7.0")
    assert (
        all(r.startswith(b"452 4.5.3") for r in flood[100:-1]) and len(flood) == 100 + 1000 + 20 + 1
    )
    assert peak - base < 16 * 1024


def _nested_mime(depth: int) -> bytes:
    head = b"Message-ID: <nested@limits.test>\r\nMIME-Version: 1.0\r\n"
    opening = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
        for i in range(depth)
    )
    closing = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
    return head + opening + b"Content-Type: text/plain\r\n\r\ninnermost\r\n" + closing


def _failed(body: bytes, ret: str | None = None, diagnostic: str = "no such user"):
    env = Envelope("s@example.org", (Recipient("b@example.test"),), ret=ret, received_at=1.7e9)
    msg = new_message("01M8TESTQUEUEID0001", env)
    statuses = (
        RecipientStatus(
            Recipient("b@example.test"),
            RecipientState.FAILED,
            1,
            Reply(550, "5.1.1", diagnostic),
            "mx[127.0.0.1]:25",
        ),
    )
    return b"".join(
        build_report(
            msg,
            statuses,
            Action.FAILED,
            to="s@example.org",
            hostname="relay.test",
            now=1.7e9 + 60,
            body=io.BytesIO(body),
        )
    )


@pytest.mark.parametrize("depth", [50, 5_000, 200_000])
def test_deeply_nested_mime_in_a_bounce_is_bounded(depth: int) -> None:
    original = _nested_mime(depth)
    tracemalloc.start()
    try:
        report = _failed(original)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    parsed = email.message_from_bytes(
        report[: report.index(b"Content-Type: message/rfc822")]
        if len(original) <= RETURN_SIZE_LIMIT
        else report,
        policy=email.policy.compat32,
    )
    print(
        f"\nnested MIME depth {depth}: original {len(original)} octets, report {len(report)} "
        f"octets, build peak {peak // 1024} KiB"
    )
    assert parsed.get_content_type() == "multipart/report"
    assert (
        len(report) < RETURN_SIZE_LIMIT + 10_000
    )  # never more than the return limit of the original
    assert peak < 4 * RETURN_SIZE_LIMIT + 2 * MIB
    if len(original) > RETURN_SIZE_LIMIT:
        parts = parsed.get_payload()
        assert [p.get_content_type() for p in parts] == [
            "text/plain",
            "message/delivery-status",
            "text/rfc822-headers",
        ]


def test_original_holding_the_report_boundary_cannot_end_the_report_early() -> None:
    """RFC 2046 5.1.1: the boundary must not occur in the encapsulated text. The queue id is told to
    the client ("queued as ...") so a sender can predict the boundary and try to close the
    report."""
    plain = _failed(b"Subject: x\r\n\r\nhello\r\n")
    boundary = email.message_from_bytes(plain).get_boundary()
    assert boundary
    evil = (
        b"Subject: x\r\n\r\nhello\r\n--"
        + boundary.encode()
        + b"--\r\n\r\n--"
        + boundary.encode()
        + b"\r\nContent-Type: text/plain\r\n\r\nforged part\r\n"
    )
    report = email.message_from_bytes(_failed(evil), policy=email.policy.compat32)
    parts = report.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "message/rfc822",
    ]
    assert b"forged part" in parts[2].as_bytes()
    # the next hop's reply text (it saw the queue id in our Received header) cannot do it either
    report = email.message_from_bytes(
        _failed(b"Subject: x\r\n\r\nhi\r\n", diagnostic=f"--{boundary}--"),
        policy=email.policy.compat32,
    )
    assert [p.get_content_type() for p in report.get_payload()] == [
        "text/plain",
        "message/delivery-status",
        "message/rfc822",
    ]


def test_a_client_that_pipelines_and_never_reads_costs_no_memory(relays):
    """Issue 19, 8b: 32 MiB of pipelined NOOPs and no reply read. The relay stops reading once the
    replies it holds fill its send buffer, so the flood waits in the kernel, not in our memory (it
    read the lot before, and grew with it)."""
    import socket

    relay = relays(route_to(9))
    base, _ = rss_kib(relay.proc.pid)
    flood = b"NOOP\r\n" * (32 * MIB // 6)
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
        sent = flood_unread(s, flood)  # until the relay reads no more
        _, peak = rss_kib(relay.proc.pid)
    print(
        f"\nnever-reading client: sent {sent // MIB} of {len(flood) // MIB} MiB; relay RSS {base} "
        f"KiB at start, peak {peak} KiB (+{(peak - base) // 1024} MiB)"
    )
    assert sent < len(flood), "the relay read all of it from a client that reads nothing"
    assert peak - base < 8 * 1024
