"""A seeded fuzz engine for the sans-I/O SMTP input parser and the path parsers.

One *case* is a random SMTP byte stream (commands, message text, fake and real ends of data, bare
CR/LF, NULs, overlong lines, bad UTF-8, BDAT chunks) fed to a ``Parser`` in random cuts, the way
the session drives it (DATA → ``begin_data``, BDAT → ``begin_bdat``, STARTTLS → ``discard_buffer``).
Every MAIL/RCPT argument goes through the path and parameter parsers and the relay-access check.

Besides "no exception": no event without progress (no hang), the buffer bounded, no end of data
without a real CRLF "." CRLF in the input (no smuggling), no bare CR/LF in accepted text, sizes
that add up, and no address that relay access would let an untrusted client send elsewhere.
Used by tests/unit/reliability/test_fuzz.py (10^5 cases) and bench/soak.py (10^6 and more).
"""

from __future__ import annotations

import random
import tracemalloc
from collections import Counter

import attrs

from mailrelay.policy.access import RelayAccess
from mailrelay.smtp import _parser as p

LOCAL = "example.test"
_ACCESS = RelayAccess((), (LOCAL,))
_ROUTING = set("%!@:")

_ADDRESSES = [
    "a@example.test",
    "A@EXAMPLE.TEST",
    "postmaster",
    "",
    "x%y@example.test",
    "y!x@example.test",
    '"a@b"@example.test',
    '"a\\"b"@example.test',
    "@a,@b:c@example.test",
    "@a:c@d",
    "u@[127.0.0.1]",
    "u@[IPv6:::1]",
    "u@[bad]",
    "u@example.test.",
    "u@elsewhere.example",
    "ü@example.test",
    "u@ex\u00e4mple.test",
    "a" * 70 + "@example.test",
    "u@" + "d" * 70 + ".test",
    "<nested@x>",
    "u@@x",
    '"unterminated@x',
    "u@-x.test",
]
_PARAMS = [
    "",
    " SIZE=100",
    " SIZE=99999999999999999999999",
    " BODY=8BITMIME",
    " BODY=BINARYMIME",
    " SMTPUTF8",
    " RET=HDRS ENVID=a+2Bb",
    " NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a+40b",
    " X=\x00",
    " SIZE=1 SIZE=2",
    " =x",
    " NOTIFY=",
    " AUTH=<>",
]
_TEXT = [
    b".",
    b"..",
    b"\r\n",
    b"\r",
    b"\n",
    b"\x00",
    b".\r\n",
    b"\r\n.\r\n",
    b"\n.\n",
    b"\r.\r",
    b"\r\n.\r",
    b"\n.\r\n",
    b"\r\n..\r\n",
    b"Received: x\r\n",
    b"Subject: s\r\n",
    b"body line\r\n",
    b"\xff\xfe",
    b"x" * 600,
    b"y" * 999 + b"\r\n",
    b"z" * 1100,
    b"\r\n\r\n",
    b"QUIT\r\n",
    b"MAIL FROM:<e@x>\r\n",
]
_VERBS = [
    b"EHLO c.example",
    b"HELO c",
    b"RSET",
    b"NOOP",
    b"QUIT",
    b"VRFY u",
    b"HELP",
    b"STARTTLS",
    b"AUTH PLAIN AGFsaWNlAHB3",
    b"GET / HTTP/1.0",
    b"ehlo",
    b"DATA",
    b"DATA x",
    b"BDAT",
    b"BDAT x",
]


@attrs.define
class FuzzStats:
    cases: int = 0
    octets: int = 0
    events: Counter[str] = attrs.field(factory=Counter)
    messages: int = 0  # DataEnd without error
    rejected: int = 0  # DataEnd with an error
    paths_ok: int = 0
    paths_refused: int = 0
    peak_kib: float = 0.0


class FuzzFailure(AssertionError):
    """An invariant broke; the message holds the seed and case number to replay it."""


def random_stream(rng: random.Random) -> bytes:
    """One SMTP-ish byte stream, mostly well-formed enough to reach every parser mode."""
    out = []
    for _ in range(rng.randint(1, 14)):
        r = rng.random()
        if r < 0.25:
            verb = rng.choice([b"MAIL FROM:", b"RCPT TO:", b"mail from:", b"RCPT TO: "])
            addr = rng.choice(_ADDRESSES).encode()
            if rng.random() < 0.9:
                addr = b"<" + addr + b">"
            out.append(verb + addr + rng.choice(_PARAMS).encode() + b"\r\n")
        elif r < 0.35:
            out.append(b"DATA\r\n")
        elif r < 0.42:
            n = rng.choice([0, 1, 5, 17, 100, 2000])
            out.append(b"BDAT %d%s\r\n" % (n, rng.choice([b"", b" LAST", b" last"])))
        elif r < 0.55:
            out.append(rng.choice(_VERBS) + b"\r\n")
        elif r < 0.9:
            out.append(rng.choice(_TEXT))
        else:
            out.append(rng.randbytes(rng.randint(1, 40)))
    return b"".join(out)


def _cuts(rng: random.Random, n: int) -> list[int]:
    k = rng.choice([1, 1, 2, 3, 8])
    return sorted({0, n, *(rng.randint(0, n) for _ in range(k - 1))})


def _overlapping(data: bytes, needle: bytes) -> int:
    count, i = 0, data.find(needle)
    while i >= 0:
        count += 1
        i = data.find(needle, i + 1)
    return count


def check_path(arg: str, prefix: str, stats: FuzzStats) -> None:
    """The MAIL/RCPT argument parsers raise only PathError, and access never lets a trick
    through."""
    try:
        inner, rest = p.split_path(arg, prefix)
        path = p.parse_path(inner, allow_null=prefix == "FROM", allow_postmaster=prefix == "TO")
        p.parse_params(rest)
    except p.PathError:
        stats.paths_refused += 1
        return
    stats.paths_ok += 1
    if prefix == "TO" and _ACCESS.may_receive(path.address):
        if path.address.lower() != "postmaster":
            local, _, domain = path.address.rpartition("@")
            if domain.lower() != LOCAL or _ROUTING & set(path.local_part):
                raise FuzzFailure(f"relay access let {path.address!r} through (from {arg!r})")


def run_case(data: bytes, rng: random.Random, stats: FuzzStats) -> None:
    parser = p.Parser()
    mode = "command"  # what we last told the parser: "command", "data" or "bdat"
    data_ends = 0  # ends of DATA text the parser reported
    text = 0  # octets of DATA text passed on for the current message
    bdat_total = 0
    cuts = _cuts(rng, len(data))
    for a, b in zip(cuts, cuts[1:], strict=False):
        parser.feed(data[a:b])
        budget = (b - a) + 64
        while True:
            event = parser.next_event()
            if event is None:
                break
            budget -= 1
            if budget < 0:
                raise FuzzFailure(f"no progress: more events than octets fed (last {event!r})")
            stats.events[type(event).__name__] += 1
            if isinstance(event, p.Command):
                if mode != "command":
                    raise FuzzFailure(f"a command while reading message text: {event!r}")
                if "\r" in event.line or "\n" in event.line:
                    raise FuzzFailure(f"a command holds a line break: {event.line!r}")
                if event.verb == "DATA" and not event.argument:
                    parser.begin_data(rng.choice([50, 2000, 100000]))
                    mode, text = "data", 0
                elif event.verb == "BDAT":
                    parts = event.argument.split()
                    if parts and parts[0].isdigit():
                        last = len(parts) > 1 and parts[1].upper() == "LAST"
                        parser.begin_bdat(
                            int(parts[0]),
                            last,
                            rng.choice([50, 5000]),
                            bdat_total,
                            binary=rng.random() < 0.3,
                        )
                        mode = "bdat"
                elif event.verb == "STARTTLS":
                    parser.discard_buffer()
                elif event.verb in ("MAIL", "RCPT"):
                    check_path(event.argument, "FROM" if event.verb == "MAIL" else "TO", stats)
            elif isinstance(event, p.DataChunk):
                if mode == "data":
                    crlf = event.data.count(b"\r\n")
                    if event.data.count(b"\r") != crlf or event.data.count(b"\n") != crlf:
                        raise FuzzFailure(f"bare CR/LF passed on as message text: {event.data!r}")
                    text += len(event.data)
            elif isinstance(event, p.DataEnd):
                if mode == "data":
                    data_ends += 1
                    if event.error is None and event.size != text:
                        raise FuzzFailure(f"DataEnd size {event.size} but {text} octets passed on")
                if event.last and event.error is None:
                    stats.messages += 1
                elif event.error is not None:
                    stats.rejected += 1
                bdat_total = 0 if event.last else event.size
                mode = "command"
            elif mode != "command":
                raise FuzzFailure(f"a bad command line while reading message text: {event!r}")
            if parser.buffered > max(1100, (b - a) + 1100):
                raise FuzzFailure(f"buffer grew to {parser.buffered} octets")
    # every end of DATA text needs a real CRLF "." CRLF in what was sent (the DATA line's own CRLF
    # may be the first one): no fake end of data ever ends a message
    real_ends = _overlapping(data, b"\r\n.\r\n")
    if data_ends > real_ends:
        raise FuzzFailure(f"{data_ends} ends of data from {real_ends} real CRLF . CRLF")
    stats.cases += 1
    stats.octets += len(data)


def fuzz(cases: int, seed: int, measure_memory: int = 500) -> FuzzStats:
    """Run ``cases`` seeded cases; the first ``measure_memory`` under tracemalloc (peak
    recorded)."""
    rng = random.Random(seed)
    stats = FuzzStats()
    for i in range(cases):
        data = random_stream(rng)
        tracing = i < measure_memory
        if tracing and i == 0:
            tracemalloc.start()
        try:
            run_case(data, rng, stats)
        except FuzzFailure as e:
            raise FuzzFailure(f"seed {seed}, case {i}: {e}\ninput: {data!r}") from None
        except Exception as e:
            raise FuzzFailure(
                f"seed {seed}, case {i}: {type(e).__name__}: {e}\ninput: {data!r}"
            ) from e
        if tracing and i == measure_memory - 1 or (i == cases - 1 and tracemalloc.is_tracing()):
            stats.peak_kib = tracemalloc.get_traced_memory()[1] / 1024
            tracemalloc.stop()
    return stats
