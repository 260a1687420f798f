"""ESMTP parameters of MAIL and RCPT: pure functions from parameters to fields, or the Reply.

MAIL: SIZE (RFC 1870), BODY (RFC 6152, RFC 3030), SMTPUTF8 (RFC 6531), RET and ENVID (RFC 3461),
AUTH (RFC 4954 5: accepted, not passed on). RCPT: NOTIFY and ORCPT (RFC 3461). Anything else,
or a parameter whose extension is off, is ``555 5.5.4``. The first problem found is the answer.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from mailrelay import _ascii
from mailrelay.envelope import Reply
from mailrelay.paths import PathError, decode_xtext, is_addr_type
from mailrelay.smtp.settings import SessionSettings

_NOTIFY = frozenset({"SUCCESS", "FAILURE", "DELAY"})


@attrs.frozen
class MailFields:
    """What MAIL's parameters say about the message."""

    size: int | None = None
    body: str | None = None  # None (7BIT), "8BITMIME" or "BINARYMIME"
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None


@attrs.frozen
class RcptFields:
    """What RCPT's parameters say about one recipient."""

    notify: tuple[str, ...] = ()
    orcpt: str | None = None


def mail_fields(
    params: Mapping[str, str | None], settings: SessionSettings, esmtp: bool
) -> MailFields | Reply:
    if params and not esmtp:
        return Reply(555, "5.5.4", "Error: parameters need EHLO")
    size: int | None = None
    body: str | None = None
    smtputf8 = False
    ret: str | None = None
    envid: str | None = None
    for key, value in params.items():
        if key == "SIZE":
            size = _ascii.number(value or "", 20)
            if size is None:
                return Reply(501, "5.5.4", "Bad SIZE parameter")
            if size > settings.max_message_size:
                return Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
        elif key == "BODY":
            keyword = _ascii.upper(value or "")
            if keyword not in ("7BIT", "8BITMIME", "BINARYMIME") or (
                keyword == "BINARYMIME" and not settings.chunking
            ):
                return Reply(501, "5.5.4", "Bad BODY parameter")
            if keyword == "BINARYMIME" and not settings.binarymime:
                return Reply(
                    555,
                    "5.5.4",
                    "BODY=BINARYMIME not offered: no route onward is known to carry it",
                )
            body = None if keyword == "7BIT" else keyword
        elif key == "SMTPUTF8" and settings.smtputf8:
            if value is not None:
                return Reply(501, "5.5.4", "SMTPUTF8 takes no value")
            smtputf8 = True
        elif key == "RET" and settings.dsn:
            ret = _ascii.upper(value or "")
            if ret not in ("FULL", "HDRS"):
                return Reply(501, "5.5.4", "Bad RET parameter")
        elif key == "ENVID" and settings.dsn:
            try:
                envid = decode_xtext(value or "")
            except PathError:
                envid = ""
            if not envid or len(value or "") > 100:
                return Reply(501, "5.5.4", "Bad ENVID parameter")
        elif key == "AUTH":
            pass  # RFC 4954 5: accepted and not passed on (we do not trust it)
        else:
            return Reply(555, "5.5.4", f"Unsupported option: {key}")
    if not params:
        return _NO_FIELDS
    return MailFields(size, body, smtputf8, ret, envid)


_NO_FIELDS = MailFields()


def rcpt_fields(params: Mapping[str, str | None], settings: SessionSettings) -> RcptFields | Reply:
    if not params:
        return _NO_RCPT_FIELDS
    notify: tuple[str, ...] = ()
    orcpt: str | None = None
    for key, value in params.items():
        if key == "NOTIFY" and settings.dsn:
            items = tuple(_ascii.upper(value or "").split(","))
            if not (
                items == ("NEVER",)
                or (items and set(items) <= _NOTIFY and len(set(items)) == len(items))
            ):
                return Reply(501, "5.5.4", "Bad NOTIFY parameter")
            notify = items
        elif key == "ORCPT" and settings.dsn:
            addr_type, semi, xtext = (value or "").partition(";")
            try:
                decoded = decode_xtext(xtext) if semi else ""
            except PathError:
                decoded = ""
            if not decoded or not is_addr_type(addr_type) or len(value or "") > 500:
                return Reply(501, "5.5.4", "Bad ORCPT parameter")
            orcpt = f"{addr_type};{decoded}"
        else:
            return Reply(555, "5.5.4", f"Unsupported option: {key}")
    return RcptFields(notify, orcpt)


_NO_RCPT_FIELDS = RcptFields()
