"""The server's fixed replies, in one place so the wording and enhanced codes stay consistent.

Enhanced status codes per RFC 3463 / RFC 5248; the greeting and the EHLO/HELO answers carry none
(RFC 2034 3).
"""

from __future__ import annotations

from mailrelay.envelope import Reply

OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Ok")
RCPT_OK = Reply(250, "2.1.5", "Ok")
START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
BYE = Reply(221, "2.0.0", "Bye")
VRFY = Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")

BAD_SEQUENCE = Reply(503, "5.5.1", "Error: bad sequence of commands")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
NO_VALID_RCPT = Reply(554, "5.5.1", "Error: no valid recipients")
UNKNOWN_COMMAND = Reply(500, "5.5.2", "Error: command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
BARE_NEWLINE_COMMAND = Reply(500, "5.5.2", "Error: bare <CR> or <LF> in command")
NOT_UTF8 = Reply(500, "5.5.2", "Error: command is not valid UTF-8")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
HTTP_COMMAND = Reply(502, "5.5.1", "Error: this is an SMTP server, not an HTTP proxy")
NO_ARGUMENTS = Reply(501, "5.5.4", "Syntax error: no arguments allowed")
HELO_SYNTAX = Reply(501, "5.5.4", "Syntax: HELO/EHLO hostname")
TOO_BIG = Reply(552, "5.3.4", "Error: message size exceeds fixed limit")
TEXT_LINE_TOO_LONG = Reply(
    550,
    "5.6.0",
    "Error: message has a line longer than the limit (1000 octets by default); dropped",
)
BARE_NEWLINE_DATA = Reply(550, "5.6.0", "Error: bare <CR> or <LF> in message text; dropped")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Error: too many errors")
TIMEOUT = Reply(421, "4.4.2", "Error: timeout exceeded")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Error: too many connections")
TOO_MANY_FROM_YOU = Reply(421, "4.7.0", "Error: too many connections from your address")
PREGREET = Reply(554, "5.5.0", "Error: talking before the greeting")
NEED_SMTPUTF8 = Reply(553, "5.6.7", "Error: non-ASCII address requires SMTPUTF8")
LOCAL_ERROR = Reply(451, "4.3.0", "Error: local error in processing")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Error: too many hops (mail loop?)")
