"""Latency from DATA's final dot to the server's reply, measured by a small asyncio SMTP client.

``sessions`` workers each open one SMTP session per message (as smtp-source does): greeting,
EHLO, MAIL, RCPT, DATA, 1 KiB of body, then the final ``.`` — the clock starts when that line is
written and stops when the reply's last line is read. QUIT follows. A reply other than 250 is
counted as an error, not as a latency.
"""

from __future__ import annotations

import asyncio
import time

import attrs


@attrs.frozen
class LatencyResult:
    samples_ms: tuple[float, ...]
    errors: int
    seconds: float

    def percentile(self, p: float) -> float:
        """Nearest-rank percentile (p in 0..100) of the samples, in milliseconds."""
        if not self.samples_ms:
            return float("nan")
        ordered = sorted(self.samples_ms)
        rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
        return ordered[rank - 1]


def body(size: int = 1024) -> bytes:
    head = b"From: sender@example.org\r\nTo: rcpt@example.test\r\nSubject: latency probe\r\n\r\n"
    line = b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\r\n"
    out = bytearray(head)
    while len(out) < size:
        out += line
    return bytes(out)


async def _reply(reader: asyncio.StreamReader) -> int:
    """Read one (possibly multiline) reply; return its code."""
    while True:
        line = await reader.readline()
        if len(line) < 4:
            raise ConnectionError(f"bad reply line {line!r}")
        if line[3:4] != b"-":
            return int(line[:3])


async def _one(host: str, port: int, payload: bytes) -> float | None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        if await _reply(reader) != 220:
            return None
        for command, expect in (
            (b"EHLO client.example.org", 250),
            (b"MAIL FROM:<sender@example.org>", 250),
            (b"RCPT TO:<rcpt@example.test>", 250),
            (b"DATA", 354),
        ):
            writer.write(command + b"\r\n")
            if await _reply(reader) != expect:
                return None
        writer.write(payload)
        await writer.drain()
        t0 = time.perf_counter()
        writer.write(b".\r\n")
        code = await _reply(reader)
        elapsed = (time.perf_counter() - t0) * 1000.0
        writer.write(b"QUIT\r\n")
        await _reply(reader)
        return elapsed if code == 250 else None
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def _run(host: str, port: int, sessions: int, messages: int) -> LatencyResult:
    payload = body()
    samples: list[float] = []
    errors = 0
    remaining = [messages]

    async def worker() -> None:
        nonlocal errors
        while remaining[0] > 0:
            remaining[0] -= 1
            try:
                result = await asyncio.wait_for(_one(host, port, payload), 60)
            except (TimeoutError, OSError, ConnectionError):
                result = None
            if result is None:
                errors += 1
            else:
                samples.append(result)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(sessions)))
    return LatencyResult(tuple(samples), errors, time.perf_counter() - start)


def measure(port: int, sessions: int, messages: int, host: str = "127.0.0.1") -> LatencyResult:
    return asyncio.run(_run(host, port, sessions, messages))
