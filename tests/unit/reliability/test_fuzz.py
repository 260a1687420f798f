"""Fuzzing: the sans-I/O parser (10^5 seeded cases here, 10^6 in make soak) and whole sessions as a
hypothesis state machine that predicts every reply code.

The state machine is an untrusted client on an in-memory connection (real protocol, real session,
real relay-access policy; a recording sink). Each rule sends bytes — cut at random points, some
rules pipelined — and checks the exact codes against a small model of RFC 5321: sequence errors,
relay refusals, recipient limits, message verdicts. Invariants: what was stored is exactly what the
model accepted, no stored message has a non-local recipient, the input buffer stays bounded, and no
failure is ever logged.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from twisted.logger import globalLogPublisher

from mailrelay.config import ServerConfig
from tests.support.reliability.fuzzing import fuzz
from tests.support.smtp.fakes import Conn

SEED = 20261125


def test_parser_fuzz_hundred_thousand_cases() -> None:
    stats = fuzz(100_000, SEED)
    print(
        f"\nparser fuzz: {stats.cases} cases, {stats.octets / 1e6:.1f} MB, events "
        f"{dict(stats.events)}, "
        f"{stats.messages} messages ended cleanly, {stats.rejected} rejected, "
        f"{stats.paths_ok}/{stats.paths_refused} paths parsed/refused, tracemalloc peak "
        f"{stats.peak_kib:.0f} KiB"
    )
    assert stats.cases == 100_000
    assert (
        stats.messages > 1000 and stats.rejected > 1000 and stats.paths_ok > 1000
    )  # every mode reached
    assert stats.peak_kib < 4096


@pytest.mark.soak
@pytest.mark.parametrize("seed", [SEED + 1, SEED + 2])
def test_parser_fuzz_a_million_cases(seed: int) -> None:
    stats = fuzz(1_000_000, seed, measure_memory=20_000)
    print(
        f"\nparser fuzz (soak, seed {seed}): {stats.cases} cases, {stats.octets / 1e6:.0f} MB, "
        f"{stats.messages} messages, {stats.rejected} rejected, peak {stats.peak_kib:.0f} KiB"
    )
    assert stats.cases == 1_000_000 and stats.peak_kib < 4096


MAX_RCPT = 3
MAX_SIZE = 2000
CONFIG = ServerConfig(
    hostname="mx.example.test",
    local_domains=("example.test",),
    max_message_size=MAX_SIZE,
    max_recipients=MAX_RCPT,
    max_errors=100_000,
    trusted_networks=(ipaddress.ip_network("198.51.100.0/24"),),
)
LOCAL_RCPTS = ["u@example.test", "U@Example.Test", "postmaster", "@x.example:v@example.test"]
FOREIGN_RCPTS = [
    "v@elsewhere.example",
    "u%elsewhere.example@example.test",
    '"u@elsewhere.example"@example.test',
    "u@[127.0.0.1]",
    "elsewhere.example!u@example.test",
]
BAD_RCPTS = ["u@example.test.", "u", "u@@example.test", "<u@example.test"]
BODIES = st.one_of(
    st.lists(
        st.sampled_from([b"Subject: x", b"", b".", b"..dots", b"text line", b"Received: a"]),
        max_size=12,
    ).map(lambda lines: (b"".join(ln + b"\r\n" for ln in lines), "ok")),
    st.sampled_from([b"a\nb\r\n", b"a\rb\r\n", b"x\n.\nMAIL FROM:<e@x>\r\n"]).map(
        lambda b: (b, "bare")
    ),
    st.integers(3, 6).map(lambda n: ((b"y" * 700 + b"\r\n") * n, "big")),
    st.just((b"z" * 1200 + b"\r\n", "long")),
)


def stuff(body: bytes) -> bytes:
    lines = body.split(b"\r\n")
    return b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in lines) + b".\r\n"


class SessionMachine(RuleBasedStateMachine):
    """An untrusted client; the model predicts every reply code."""

    @initialize()
    def connect(self) -> None:
        self.errors: list[dict] = []
        self.observer = lambda e: (
            self.errors.append(e) if e.get("log_failure") is not None else None
        )
        globalLogPublisher.addObserver(self.observer)
        self.conn = Conn(config=CONFIG, client="192.0.2.99")
        assert self.conn.codes() == [220]
        self.greeted = False
        self.in_mail = False
        self.rcpts = 0
        self.rcpt_attempts = 0
        self.stored = 0

    def teardown(self) -> None:
        if hasattr(self, "observer"):
            globalLogPublisher.removeObserver(self.observer)

    def send(self, data: bytes, cuts: list[int]) -> list[int]:
        points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
        for a, b in zip(points, points[1:], strict=False):
            self.conn.send(data[a:b])
        return self.conn.codes()

    def reset(self) -> None:
        self.in_mail, self.rcpts, self.rcpt_attempts = False, 0, 0

    @rule(esmtp=st.booleans(), cuts=st.lists(st.integers(0, 40), max_size=3))
    def hello(self, esmtp: bool, cuts: list[int]) -> None:
        assert self.send(b"EHLO c.example\r\n" if esmtp else b"HELO c.example\r\n", cuts) == [250]
        self.greeted = True
        self.reset()

    @rule(cuts=st.lists(st.integers(0, 40), max_size=3))
    def mail(self, cuts: list[int]) -> None:
        codes = self.send(b"MAIL FROM:<s@example.org>\r\n", cuts)
        if not self.greeted or self.in_mail:
            assert codes == [503]
        else:
            assert codes == [250]
            self.in_mail = True

    @rule(
        kind=st.sampled_from(["local", "foreign", "bad"]),
        i=st.integers(0, 10),
        cuts=st.lists(st.integers(0, 60), max_size=3),
    )
    def rcpt(self, kind: str, i: int, cuts: list[int]) -> None:
        pool = {"local": LOCAL_RCPTS, "foreign": FOREIGN_RCPTS, "bad": BAD_RCPTS}[kind]
        codes = self.send(f"RCPT TO:<{pool[i % len(pool)]}>\r\n".encode(), cuts)
        if not self.greeted or not self.in_mail:
            assert codes == [503]
            return
        self.rcpt_attempts += 1
        if kind == "bad":
            assert codes == [501]
        elif self.rcpts >= MAX_RCPT:  # the limit is checked before the policy is asked
            assert codes == [452]
        elif kind == "foreign":
            assert codes == [554]
        else:
            assert codes == [250]
            self.rcpts += 1

    @rule(k=st.integers(1, 6), cuts=st.lists(st.integers(0, 200), max_size=3))
    def many_rcpts_pipelined(self, k: int, cuts: list[int]) -> None:
        codes = self.send(b"RCPT TO:<u@example.test>\r\n" * k, cuts)
        if not self.greeted or not self.in_mail:
            assert codes == [503] * k
            return
        room = max(0, MAX_RCPT - self.rcpts)
        assert codes == [250] * min(k, room) + [452] * max(0, k - room)
        self.rcpts += min(k, room)
        self.rcpt_attempts += k

    def _data_codes(self) -> list[int]:
        """The reply to DATA if the model says no message text will be read."""
        if not self.greeted or not self.in_mail:
            return [503]
        if not self.rcpts:
            return [554] if self.rcpt_attempts else [503]
        return []

    @rule(body=BODIES, cuts=st.lists(st.integers(0, 5000), max_size=4))
    def data(self, body: tuple[bytes, str], cuts: list[int]) -> None:
        text, kind = body
        early = self._data_codes()
        if early:
            assert self.send(b"DATA\r\n", cuts) == early
            return
        codes = self.send(b"DATA\r\n" + stuff(text), cuts)
        verdict = {"ok": 250, "bare": 550, "big": 552, "long": 550}[kind]
        if kind == "big" and len(text) <= MAX_SIZE:
            verdict = 250
        assert codes == [354, verdict], (kind, codes)
        self.stored += verdict == 250
        self.reset()

    @precondition(lambda self: self.greeted and not self.in_mail)
    @rule(n=st.integers(1, 3), body=BODIES, cuts=st.lists(st.integers(0, 5000), max_size=4))
    def pipelined_transaction(self, n: int, body: tuple[bytes, str], cuts: list[int]) -> None:
        text, kind = body
        wire = b"MAIL FROM:<s@example.org>\r\n" + b"RCPT TO:<u@example.test>\r\n" * n + b"DATA\r\n"
        codes = self.send(wire + stuff(text), cuts)
        verdict = {"ok": 250, "bare": 550, "big": 552, "long": 550}[kind]
        if kind == "big" and len(text) <= MAX_SIZE:
            verdict = 250
        assert codes == [250] + [250] * n + [354, verdict], (kind, codes)
        self.stored += verdict == 250

    @rule(
        verb=st.sampled_from(
            [
                b"RSET",
                b"NOOP",
                b"VRFY u",
                b"FROB",
                b"x" * 600,
                b"MAIL\rFROM:<a@b>",
                b"\xff\xfe",
                b"DATA x",
            ]
        ),
        cuts=st.lists(st.integers(0, 700), max_size=3),
    )
    def other(self, verb: bytes, cuts: list[int]) -> None:
        codes = self.send(verb + b"\r\n", cuts)
        if verb == b"RSET":
            assert codes == [250]
            self.reset()
        elif verb in (b"NOOP", b"VRFY u"):
            assert codes == [250] if verb == b"NOOP" else [252]
        elif verb == b"DATA x":
            assert codes == (self._data_codes() or [501])
        else:
            assert codes == [500]

    @invariant()
    def stored_what_the_model_accepted(self) -> None:
        committed = self.conn.sink.committed
        assert len(committed) == self.stored
        for w in committed:
            assert all(
                r.address.lower().endswith("@example.test")
                or r.address == "postmaster@mx.example.test"
                for r in w.envelope.recipients
            ), w.envelope.recipients
        assert not self.conn.closed
        assert self.conn.server.session.parser.buffered <= 1100
        assert self.errors == []


SessionMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestSessionMachine = SessionMachine.TestCase
