"""A stored message read with the header fields put in front of it: what delivery sends.

``PrefixedBody(prefix, body)`` is a binary file of ``prefix`` followed by ``body`` (a file from
the store's ``open_body``), readable in pieces and seekable as delivery needs (the SMTP client
measures the size with ``seek(0, 2)``/``tell()`` and rewinds with ``seek(0)`` to retry on a fresh
connection). The body is streamed, never read whole; closing it closes ``body``.

The queue manager delivers ``prefixed(message.prefix, store.open_body(queue_id))``: the header
fields a stage added once per message after its text was written (DKIM signing at intake, see
``interfaces.IPrependingWriter``), kept in the message's record, in front of the text as stored.
"""

from __future__ import annotations

import io
from typing import IO, BinaryIO


class PrefixedBody(io.BufferedIOBase, BinaryIO):
    """``prefix`` then ``body``, as one read-only binary file."""

    def __init__(self, prefix: bytes, body: IO[bytes]) -> None:
        super().__init__()
        self._prefix = prefix
        self._body = body
        self._position = 0  # while it is inside the prefix, ``body`` is at its start

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._body.seekable()

    def read(self, size: int | None = -1, /) -> bytes:
        if self.closed:
            raise ValueError("read of a closed file")
        head = b""
        if self._position < len(self._prefix):
            end = len(self._prefix) if size is None or size < 0 else self._position + size
            head = self._prefix[self._position : end]
            if size is not None and size >= 0:
                size -= len(head)
        rest = self._body.read() if size is None or size < 0 else self._body.read(size)
        data = head + rest if head else rest
        self._position += len(data)
        return data

    def read1(self, size: int = -1, /) -> bytes:
        return self.read(size)

    def seek(self, offset: int, whence: int = io.SEEK_SET, /) -> int:
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self._position + offset
        elif whence == io.SEEK_END:
            target = len(self._prefix) + self._body.seek(0, io.SEEK_END) + offset
        else:
            raise ValueError(f"invalid whence ({whence})")
        if target < 0:
            raise ValueError(f"negative seek position {target}")
        self._body.seek(max(0, target - len(self._prefix)))
        self._position = target
        return target

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        if not self.closed:
            try:
                self._body.close()
            finally:
                super().close()


def prefixed(prefix: bytes, body: IO[bytes]) -> IO[bytes]:
    """``body`` with ``prefix`` in front; ``body`` itself when there is nothing to put there."""
    return PrefixedBody(prefix, body) if prefix else body
