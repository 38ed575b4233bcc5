"""Every SMTP reply the MTA and MSA send by policy, with its RFC 3463 enhanced status code.

One vocabulary (like mox's smtp/codes.go) so the session code reads as policy, and tests can
compare against the same names.
"""

from __future__ import annotations

SENDER_OK = "250 2.1.0 Sender OK"
RCPT_OK = "250 2.1.5 Recipient OK"
QUEUED = "250 2.0.0 Ok: queued as {id}"

# 4xx: try again later
TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"
DIRECTORY_UNAVAILABLE = "451 4.3.0 Directory temporarily unavailable, try again later"
SPOOL_ERROR = "451 4.3.0 Could not queue the message, try again later"
LOCAL_ERROR = "451 4.3.0 Local error in processing, try again later"
SPOOL_FULL = "452 4.3.1 Insufficient system storage, try again later"
TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"

# 5xx: permanent
BARE_LF_COMMAND = "500 5.5.2 Command lines must end with CRLF"
CONTROL_IN_COMMAND = "500 5.5.2 Control characters are not allowed in a command line"
NOT_UTF8_COMMAND = "501 5.5.4 Command line is not valid UTF-8"
BAD_ORCPT = "501 5.5.4 Malformed ORCPT parameter (RFC 3461 4.2: addr-type;xtext)"
NOT_IMPLEMENTED = "502 5.5.1 Command not implemented"
EXPN_DISABLED = "502 5.5.1 EXPN not available"
ALREADY_TLS = "503 5.5.1 TLS already active"
NEED_MAIL = "503 5.5.1 Need MAIL command first"
NO_AUTH_HERE = "503 5.5.1 AUTH not available on this port; use submission"
VRFY_DISABLED = "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery"
NO_SUCH_USER = "550 5.1.1 <{addr}> Recipient address rejected: no such user here"
RELAY_DENIED = "554 5.7.1 <{addr}> Relay access denied"
RELAY_TRICK = "554 5.7.1 <{addr}> Relay access denied: routing characters in address"
BAD_ADDRESS = "553 5.1.3 <{addr}> Malformed address: {why}"
BAD_SENDER = "553 5.1.7 <{addr}> Malformed sender address: {why}"
MAIL_LOOP = "554 5.4.6 Too many Received headers: mail loop"
