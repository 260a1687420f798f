"""Domains compare in one canonical form: IDNA 2008 without mappings, so a look-alike is no
match."""

from __future__ import annotations

import pytest

from mailrelay.address import (
    DomainError,
    canonical_domain,
    canonical_pattern,
    domain_matches,
    split,
)

# Each spells local.test only through a mapping (NFKC, UTS-46, IDNA 2003, Unicode lower case).
LOOK_ALIKES = [
    "ｌｏｃａｌ.ｔｅｓｔ",  # fullwidth letters
    "local。test",  # U+3002 ideographic full stop
    "local．test",  # U+FF0E fullwidth full stop
    "local｡test",  # U+FF61 halfwidth ideographic full stop
    "lo\u200bcal.test",  # zero-width space
    "lo\u00adcal.test",  # soft hyphen
    "local.test\u3000",  # trailing ideographic space
    "LOCAL.\u212aEY",  # Kelvin sign, lower-cased by str.lower() to "k"
    "ＬＯＣＡＬ.test",
]


@pytest.mark.parametrize("domain", LOOK_ALIKES)
def test_a_look_alike_is_not_a_domain(domain: str) -> None:
    with pytest.raises(DomainError):
        canonical_domain(domain)
    assert split(f"user@{domain}")[1] not in ("local.test", "local.key")


@pytest.mark.parametrize(
    "domain, canonical",
    [
        ("Local.TEST", "local.test"),
        ("bücher.de", "xn--bcher-kva.de"),
        ("Bücher.DE", "xn--bcher-kva.de"),
        ("XN--BCHER-KVA.de", "xn--bcher-kva.de"),
        ("faß.de", "xn--fa-hia.de"),  # not fass.de (IDNA 2003)
        ("σας.gr", "xn--mxa8ab.gr"),
        ("[IPv6:::1]", "[ipv6:::1]"),
    ],
)
def test_valid_names_have_one_canonical_form(domain: str, canonical: str) -> None:
    assert canonical_domain(domain) == canonical


@pytest.mark.parametrize(
    "domain", ["BÜCHER.de", "xn--zz.test", "a_b.test", "a..test", "", "-a.test"]
)
def test_what_is_not_a_valid_name_is_refused(domain: str) -> None:
    with pytest.raises(DomainError):
        canonical_domain(domain)


def test_patterns_and_matching_use_the_canonical_form() -> None:
    assert canonical_pattern(".Bücher.de.") == ".xn--bcher-kva.de"
    assert domain_matches("mail.bücher.de", canonical_pattern(".bücher.de"))
    assert not domain_matches("ｌｏｃａｌ.ｔｅｓｔ", canonical_pattern("local.test"))
    with pytest.raises(DomainError):
        canonical_pattern("ｌｏｃａｌ.ｔｅｓｔ")


@pytest.mark.parametrize("domain", LOOK_ALIKES)
def test_the_parser_refuses_a_look_alike_in_either_path(domain: str) -> None:
    """MAIL FROM gets 501 5.1.7 and RCPT TO 501 5.1.3; the session goes on."""
    from tests.support.smtp.fakes import Conn

    c = Conn()
    c.ehlo()
    c.send(
        f"MAIL FROM:<a@{domain}> SMTPUTF8\r\nMAIL FROM:<a@example.org> SMTPUTF8\r\nRCPT "
        f"TO:<b@{domain}>\r\n"
    )
    assert [(code, text[:5]) for code, text in c.replies()] == [
        (501, "5.1.7"),
        (250, "2.1.0"),
        (501, "5.1.3"),
    ]


def test_an_international_name_is_passed_on_as_written_and_routed_by_its_a_label() -> None:
    from mailrelay.smtp._parser import parse_mailbox

    path = parse_mailbox("jörg@Faß.example")
    assert (
        path.address == "jörg@Faß.example"
    )  # as written: it is the name compared, ASCII case aside
    assert split(path.address) == ("jörg", "xn--fa-hia.example")  # not fass.example (IDNA 2003)
