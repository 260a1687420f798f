"""The ASCII helpers every protocol number, keyword and blank goes through."""

from __future__ import annotations

import pytest

from mailrelay import _ascii

# Unicode digits and blanks Python's own predicates accept: none of them is SMTP.
NOT_ASCII_DIGITS = ["²", "١٤", "٤", "０", "１２", "1٠", "𝟙", "①", "Ⅻ"]


@pytest.mark.parametrize(
    "text, max_digits, expected",
    [
        ("0", 1, 0),
        ("14", 2, 14),
        ("007", 3, 7),
        ("52428800", 20, 52428800),
        ("123", 2, None),
        ("", 5, None),
        ("-1", 5, None),
        ("+1", 5, None),
        (" 1", 5, None),
        ("1 ", 5, None),
        ("1_0", 5, None),
        ("1.0", 5, None),
        ("0x1", 5, None),
        ("1e3", 5, None),
        *[(text, 5, None) for text in NOT_ASCII_DIGITS],
    ],
)
def test_number(text: str, max_digits: int, expected: int | None) -> None:
    assert _ascii.number(text, max_digits) == expected


@pytest.mark.parametrize(
    "text, upper_only, expected",
    [
        ("0A", True, True),
        ("FF", True, True),
        ("ff", True, False),
        ("ff", False, True),
        ("aF09", False, True),
        ("", False, False),
        ("G0", False, False),
        ("٤1", False, False),
        ("Ａ1", False, False),
        ("１", False, False),
        (" A", False, False),
    ],
)
def test_is_hex(text: str, upper_only: bool, expected: bool) -> None:
    assert _ascii.is_hex(text, upper_only=upper_only) is expected


@pytest.mark.parametrize(
    "text, upper, lower",
    [
        ("quit", "QUIT", "quit"),
        ("Last", "LAST", "last"),
        ("quıt", "QUıT", "quıt"),  # dotless i: str.upper() makes it I
        ("ſuccess", "ſUCCESS", "ſuccess"),  # long s: str.upper() makes it S
        ("ﬆarttls", "ﬆARTTLS", "ﬆarttls"),  # ligature st: str.upper() makes it ST
        ("straße", "STRAßE", "straße"),  # str.upper() makes ß SS
        ("\u212aB", "\u212aB", "\u212ab"),  # Kelvin sign: str.lower() makes it k
    ],
)
def test_case_mapping_touches_ascii_letters_only(text: str, upper: str, lower: str) -> None:
    assert (_ascii.upper(text), _ascii.lower(text)) == (upper, lower)


@pytest.mark.parametrize(
    "blank", ["\u00a0", "\u3000", "\u2028", "\u200b", "\u0085", "\x0b", "\x0c", "\x1c"]
)
def test_only_sp_and_htab_are_blanks(blank: str) -> None:
    assert _ascii.strip(f" \t{blank}x{blank}\t ") == f"{blank}x{blank}"
    assert _ascii.split(f"a{blank}b \t c  ") == [f"a{blank}b", "c"]
    assert _ascii.split("") == [] and not _ascii.strip(" \t" * 2)


def test_printable_escapes_what_is_not_printable_ascii() -> None:
    assert _ascii.printable("SIZE=1") == "SIZE=1"
    assert _ascii.printable("SIZE=²\u2028\x00") == "SIZE=\\xb2\\u2028\\x00"
    assert _ascii.printable("SIZE=²\u2028\x00").isascii()
