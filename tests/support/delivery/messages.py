"""Test messages that stress dot-stuffing at chunk boundaries."""

from __future__ import annotations

BLOCK = 16 * 1024


def dotted_message(sender: str, blocks: int) -> bytes:
    """A message in which a line starting with a dot begins at every 16 KiB offset.

    Lines stay under 998 bytes (Postfix folds longer ones), so the bytes survive any relay.
    """
    head = (
        f"From: {sender}\r\nTo: rcpt@example.test\r\nDate: Wed, 25 Nov 2026 09:00:00 +0000\r\n"
        f"Message-ID: <{sender}>\r\nSubject: dots\r\n"
    ).encode()
    pad = BLOCK - len(head) - 2  # the header ends exactly at the first boundary
    while pad > 0:
        n = min(pad - 2, 900) if pad - 2 > 900 + 12 else pad - 2
        head += b"X-Pad: " + b"p" * (n - 7) + b"\r\n"
        pad -= n + 2
    head += b"\r\n"
    assert len(head) == BLOCK, len(head)
    lines = [b"." + b"a" * 97] + [b"b" * 98] * 162 + [b"c" * 82]  # 100 * 163 + 84 = 16384
    block = b"".join(ln + b"\r\n" for ln in lines)
    assert len(block) == BLOCK
    return head + block * blocks
