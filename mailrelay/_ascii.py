"""Protocol text is ASCII: the numbers, hex digits, keywords and blanks of RFC 5234 B.1.

Python's own predicates and case mappings are Unicode-aware, which is wrong for the wire:
``"²".isdigit()`` is True and ``int("²")`` raises, ``int("١٤")`` is 14, ``"ſ".upper()`` is ``"S"``
and ``"ı".upper()`` is ``"I"`` (so ``"quıt"`` would read as QUIT), and ``strip()``/``split()``
take U+3000 or U+2028 for blanks. Every number, keyword and separator read from a peer (SMTP
commands and replies, EHLO keywords, DSN parameters, MTA-STS policies) goes through here instead.
"""

from __future__ import annotations

import string

#: RFC 5234 WSP: the only blanks between SMTP words (Unicode spaces are not).
WSP = " \t"

_HEX = frozenset(string.hexdigits)
_UPPER_HEX = frozenset(string.digits + "ABCDEF")
_TO_UPPER = str.maketrans(string.ascii_lowercase, string.ascii_uppercase)
_TO_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def number(text: str, max_digits: int) -> int | None:
    """``text`` read as 1 to ``max_digits`` ASCII digits (RFC 5234 DIGIT), else None.

    No sign, no blanks, no ``_`` and no other script's digits, all of which ``int()`` accepts.
    """
    if not 0 < len(text) <= max_digits or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def is_hex(text: str, *, upper_only: bool = False) -> bool:
    """Whether ``text`` is one or more ASCII hex digits (only ``A``-``F`` when ``upper_only``)."""
    digits = _UPPER_HEX if upper_only else _HEX
    return bool(text) and all(c in digits for c in text)


def upper(text: str) -> str:
    """``a``-``z`` to upper case and nothing else (``"ſ"`` stays ``"ſ"``, never ``"S"``)."""
    return text.upper() if text.isascii() else text.translate(_TO_UPPER)


def lower(text: str) -> str:
    """``A``-``Z`` to lower case and nothing else (the Kelvin sign stays, never ``"k"``)."""
    return text.lower() if text.isascii() else text.translate(_TO_LOWER)


def strip(text: str) -> str:
    """``text`` without leading and trailing SP and HTAB."""
    return text.strip(WSP)


def split(text: str) -> list[str]:
    """The words of ``text`` between runs of SP and HTAB."""
    return [word for word in text.replace("\t", " ").split(" ") if word]


def printable(text: str) -> str:
    """``text`` safe to echo in a reply: non-ASCII and control characters as backslash escapes."""
    return ascii(text)[1:-1]
