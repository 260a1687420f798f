"""RFC 5321 paths and ESMTP parameters (4.1.2, 4.1.3; RFC 6531 for UTF-8): pure text functions.

Shared by the wire (MAIL/RCPT arguments), policy (is this recipient ours?) and routing, so none of
them reaches into another's private parser. ``PathError.syntax`` tells a malformed command (501
5.5.4) from a well-formed command naming a bad address (501 5.1.x).
"""

from __future__ import annotations

import ipaddress
import re

import attrs

from mailrelay import _ascii
from mailrelay.address import DomainError, canonical_domain

# -- paths and ESMTP parameters (RFC 5321 4.1.2, 4.1.3; RFC 6531 for UTF-8) ------------------

# Non-ASCII (UTF-8, RFC 6531) is matched as an alternative rather than inside the character
# classes: a class spanning U+0080..U+10FFFF costs ~0.4 s to compile at import.
_NA = r"[^\x00-\x7f]"
_ATOM = rf"(?:[A-Za-z0-9!#$%&'*+\-/=?^_`{{|}}~]|{_NA})+"
_DOT_STRING = rf"{_ATOM}(?:\.{_ATOM})*"
_QUOTED = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|{_NA}|\\[\x20-\x7e])*"'
_LET_DIG = rf"(?:[A-Za-z0-9]|{_NA})"
_LABEL = rf"{_LET_DIG}(?:(?:[A-Za-z0-9\-]|{_NA})*{_LET_DIG})?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"  # dcontent (RFC 5321 4.1.3)
_MAILBOX_RE = re.compile(rf"({_DOT_STRING}|{_QUOTED})@({_DOMAIN}|{_LITERAL})")
_ROUTE_RE = re.compile(rf"@(?:{_DOMAIN}|{_LITERAL})(?:,@(?:{_DOMAIN}|{_LITERAL}))*:")
_DOT_STRING_RE = re.compile(_DOT_STRING)
# The same mailbox grammar without the non-ASCII alternatives, for ASCII text (nearly every
# address): one character class per run instead of an alternation per character.
_ATOM_ASCII = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"
_QUOTED_ASCII = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_LABEL_ASCII = r"[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?"
_MAILBOX_ASCII_RE = re.compile(
    rf"({_ATOM_ASCII}(?:\.{_ATOM_ASCII})*|{_QUOTED_ASCII})@({_LABEL_ASCII}(?:\.{_LABEL_ASCII})*|{_LITERAL})"
)
_ATOM_ASCII_RE = re.compile(_ATOM_ASCII)
_KEYWORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*")
_VALUE_RE = re.compile(rf"(?:[\x21-\x3c\x3e-\x7e]|{_NA})+")


class PathError(ValueError):
    """The argument of MAIL/RCPT does not parse; ``syntax`` False: the mailbox itself is bad."""

    def __init__(self, reason: str, syntax: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.syntax = syntax


@attrs.frozen
class Path:
    """A parsed reverse- or forward-path.

    ``address`` is the canonical mailbox (``""`` for ``<>``, ``"postmaster"`` for the unqualified
    ``<postmaster>``), its local part unquoted when quoting was not needed and its source route
    (``@a,@b:``) dropped (RFC 5321 4.1.1.3, C). ``local_part`` is the unquoted local part, so a
    policy can see an ``@`` hidden in quotes. ``utf8``: non-ASCII appears (needs SMTPUTF8).
    """

    address: str
    local_part: str = ""
    domain: str = ""
    quoted: bool = False
    source_route: tuple[str, ...] = ()

    @property
    def utf8(self) -> bool:
        return not self.address.isascii()

    @property
    def is_null(self) -> bool:
        return self.address == ""


def _unquote(q: str) -> str:
    return re.sub(r"\\(.)", r"\1", q[1:-1])


def _quote(local: str) -> str:
    if _DOT_STRING_RE.fullmatch(local):
        return local
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check_literal(lit: str) -> None:
    inner = lit[1:-1]
    try:
        if _ascii.lower(inner[:5]) == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        raise PathError(f"bad address literal {_ascii.printable(lit)}", syntax=False) from None


def parse_mailbox(text: str) -> Path:
    """``local@domain`` (no brackets) → ``Path``; raises ``PathError``."""
    m = (_MAILBOX_ASCII_RE if text.isascii() else _MAILBOX_RE).fullmatch(text)
    if not m:
        raise PathError("bad address syntax", syntax=False)
    local_raw, domain = m.group(1), m.group(2)
    quoted = local_raw.startswith('"')
    local = _unquote(local_raw) if quoted else local_raw
    if len(local) > 16 and len(local.encode()) > 64:  # at most 4 octets a character
        raise PathError("local part longer than 64 octets", syntax=False)
    if domain.startswith("["):
        _check_literal(domain)
    else:
        ascii_domain = domain
        if not domain.isascii() or "xn--" in domain.lower():
            try:  # U-labels and A-labels as IDNA 2008 has them, unmapped: a look-alike is no name
                ascii_domain = canonical_domain(domain)
            except DomainError:
                raise PathError("invalid domain name", syntax=False) from None
        if len(ascii_domain) > 63 and (
            len(ascii_domain) > 255 or any(len(label) > 63 for label in ascii_domain.split("."))
        ):
            raise PathError("domain name too long", syntax=False)
    # unquoted, the local part matched the dot-string form already: nothing to requote
    return Path(f"{_quote(local) if quoted else local}@{domain}", local, domain, quoted)


def split_path(arg: str, prefix: str) -> tuple[str, str]:
    """``"FROM:<a@b> SIZE=1"`` → (``"a@b"``, ``"SIZE=1"``): the text in the brackets, the rest.

    Tolerates spaces after the colon (common, harmless); requires the angle brackets. A ``>``
    inside a quoted local part does not close the path.
    """
    head = arg[: len(prefix) + 1]
    if _ascii.upper(head) != prefix + ":":
        raise PathError(f"syntax: {prefix}:<address>")
    rest = arg[len(prefix) + 1 :].lstrip(" ")
    if not rest.startswith("<"):
        raise PathError(f"syntax: {prefix}:<address>")
    if '"' not in rest:  # no quoted local part: the first ">" closes the path
        i = rest.find(">")
        if i < 0:
            raise PathError("missing '>'")
    else:
        i = _closing_bracket(rest)
    after = rest[i + 1 :]
    if after and not after.startswith(" "):
        raise PathError("junk after '>'")
    return rest[1:i], after.strip(" ")


def _closing_bracket(rest: str) -> int:
    i, quoted = 1, False
    while i < len(rest):
        c = rest[i]
        if quoted and c == "\\":
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return i
        i += 1
    raise PathError("missing '>'")


def parse_path(inner: str, *, allow_null: bool, allow_postmaster: bool) -> Path:
    """The text inside ``<...>`` → ``Path`` (source route stripped)."""
    if inner == "":
        if allow_null:
            return Path("")
        raise PathError("empty address", syntax=False)
    if allow_postmaster and _ascii.lower(inner) == "postmaster":
        return Path("postmaster", "postmaster")
    route: tuple[str, ...] = ()
    if inner.startswith("@"):
        m = _ROUTE_RE.match(inner)
        if not m:
            raise PathError("bad source route", syntax=False)
        route = tuple(part[1:] for part in m.group(0)[:-1].split(","))
        inner = inner[m.end() :]
    if len(inner.encode()) > 254:
        raise PathError("path longer than 256 octets", syntax=False)
    path = parse_mailbox(inner)
    return attrs.evolve(path, source_route=route) if route else path


def parse_params(text: str) -> dict[str, str | None]:
    """``"SIZE=100 BODY=8BITMIME"`` → ``{"SIZE": "100", "BODY": "8BITMIME"}``; keywords upper-cased.

    Raises ``PathError`` on bad syntax or a repeated keyword.
    """
    params: dict[str, str | None] = {}
    for item in text.split(" "):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not _KEYWORD_RE.fullmatch(key) or (eq and not _VALUE_RE.fullmatch(value)):
            raise PathError(f"bad parameter {_ascii.printable(item)}")
        key = key.upper()
        if key in params:
            raise PathError(f"parameter {key} repeated")
        params[key] = value if eq else None
    return params


def is_addr_type(text: str) -> bool:
    """ORCPT's addr-type (RFC 3461 4.2): an ASCII atom such as ``rfc822``."""
    return _ATOM_ASCII_RE.fullmatch(text) is not None


def decode_xtext(value: str) -> str:
    """RFC 3461 4: ``+XX`` hex escapes (ENVID, ORCPT), two ASCII upper-case hex digits each.

    What they spell must be printable ASCII (RFC 3461 4.4; an address outside ASCII is the
    ``utf-8`` addr-type's ``\\x{..}`` form, RFC 6533): a ``+C3+A9`` is refused rather than read as
    two Latin-1 characters, which would be passed on as four octets.
    """
    out, i = [], 0
    while i < len(value):
        c = value[i]
        if c == "+":
            hexpart = value[i + 1 : i + 3]
            if len(hexpart) != 2 or not _ascii.is_hex(hexpart, upper_only=True):
                raise PathError("bad xtext")
            octet = int(hexpart, 16)
            if not 0x20 <= octet <= 0x7E:
                raise PathError("xtext encodes a character that is not printable US-ASCII")
            out.append(chr(octet))
            i += 3
            continue
        if not ("!" <= c <= "~") or c == "=":
            raise PathError("bad xtext")
        out.append(c)
        i += 1
    return "".join(out)
