"""Every reply pochta's SMTP and LMTP servers send, with its RFC 3463 enhanced status code.

One vocabulary (like mox's smtp/codes.go) so the session code reads as policy, and tests can
compare against the same names. Templates take named fields (``.format(addr=...)``). The MTA,
the MSA and the MDA use it; aiosmtpd's own replies are rewritten with an enhanced code by
``mta/smtp/server.py``.
"""

from __future__ import annotations


def code_of(reply: str) -> int:
    """The reply code of a reply line (0 if it has none)."""
    head = reply[:3]
    return int(head) if head.isdigit() else 0

SENDER_OK = "250 2.1.0 Sender OK"
RCPT_OK = "250 2.1.5 Recipient OK"
QUEUED = "250 2.0.0 Ok: queued as {id}"

# 4xx: try again later
TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"
TOO_MANY_CALLS = "421 4.7.0 {verb} sent too many times"
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
SPAM_REJECTED = "550 5.7.1 Message rejected as spam: {why}"
SPAM_DEFERRED = "451 4.7.1 Message deferred by the spam filter, try again later"
SPAM_CHECK_UNAVAILABLE = "451 4.7.1 Spam filter unavailable, try again later"
SIEVE_REJECTED = "550 5.7.1 <{addr}> {text}"  # the recipient's Sieve reject/ereject (RFC 5429)
FORGED_SRS = "550 5.7.1 <{addr}> Recipient address rejected: invalid or expired SRS address"
RELAY_TRICK = "554 5.7.1 <{addr}> Relay access denied: routing characters in address"
BAD_ADDRESS = "553 5.1.3 <{addr}> Malformed address: {why}"
BAD_SENDER = "553 5.1.7 <{addr}> Malformed sender address: {why}"
MAIL_LOOP = "554 5.4.6 Too many Received headers: mail loop"

# -- connections (mta/smtp/server.py, mta/session.py) ----------------------------------------
SHUTTING_DOWN = "421 4.3.2 Service shutting down"
SHUTTING_DOWN_HOST = "421 4.3.2 {host} Service shutting down"
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
TOO_MANY_FROM_ADDRESS = "421 4.7.0 Too many connections from your address, try again later"
CONNECTION_RATE = "421 4.7.0 Too many connections from your address, slow down"
IDLE_TIMEOUT = "421 4.4.2 {host} Error: timeout exceeded"
DNSBL_LISTED = "554 5.7.1 Service unavailable; client [{ip}] blocked using {zone}"
PREGREET = "554 5.7.1 Protocol error: talking before the greeting"

# -- commands and the message (wire layer) ----------------------------------------------------
# aiosmtpd sends this one itself, then closes: not counted as one more error (protocol.py).
AIOSMTPD_BOGUS_LIMIT = "502 5.5.1 Too many unrecognized commands, goodbye."
NEED_RCPT = "503 5.5.1 Need RCPT command first"
START_DATA = "354 End data with <CR><LF>.<CR><LF>"
DATA_SYNTAX = "501 5.5.4 Syntax: DATA"
EXPN_SYNTAX = "501 5.5.4 Syntax: EXPN <list>"
BAD_RET = "501 5.5.4 RET must be FULL or HDRS"
BAD_ENVID = "501 5.5.4 Malformed ENVID"
RCPT_SYNTAX = "501 5.5.4 Syntax: RCPT TO:<address> [SP <parameters>]"
MALFORMED_PATH = "553 5.1.3 Malformed address: {raw}"
RCPT_PARAMETER = "555 5.5.4 RCPT TO parameter {name} not supported"
BAD_NOTIFY = "501 5.5.4 Bad NOTIFY parameter"
MESSAGE_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
LINE_TOO_LONG = "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)"
BARE_EOL = ("554 5.6.0 Message refused: bare CR or LF in message; lines must end with CRLF "
            "(RFC 5321 2.3.8)")

# -- policy (mta/session.py, mta/authcheck.py) ------------------------------------------------
GREYLISTED = "451 4.7.1 <{addr}> Greylisted, please try again in {wait:.0f} seconds"
DMARC_REJECT = "550 5.7.1 Message rejected: DMARC policy of {domain} says reject"
AUTHCHECK_TEMPERROR = "451 4.7.0 Temporary DNS failure checking authentication, try again later"
VRFY_UNKNOWN = "550 5.1.1 <{addr}> No such user here"
VRFY_OK = "250 2.1.5 <{addr}>"
EXPN_UNKNOWN = "550 5.1.1 <{addr}> No such mailing list here"
EXPN_MEMBER = "250{sep}2.1.5 <{addr}>"  # sep "-" on every line but the last

# -- ETRN, RFC 1985 §5 (mta/session.py) --------------------------------------------------------
ETRN_SYNTAX = "501 5.5.4 Syntax: ETRN [@]domain"
ETRN_STARTED = "250 2.0.0 Queuing for node {node} started"
ETRN_NAMED_QUEUE = "458 4.3.0 Unable to queue messages for node {node}: named queues not supported"
ETRN_UNABLE = "458 4.3.0 Unable to queue messages for node {node}, try again later"
ETRN_NOT_RELAY = "459 4.7.1 Node {node} not allowed: not a relay domain here"
ETRN_NOT_ALLOWED = "554 5.7.1 ETRN not allowed from your address"

# -- ODMR, RFC 2645 §4.2 (mta/odmr.py; 250 and 453 come from the queue runner) ----------------
ATRN_SYNTAX = "501 5.5.4 Syntax: ATRN [domain[,domain]]"
ATRN_UNABLE = "450 4.3.0 ATRN request refused: unable to process it now, try again later"
ATRN_NOT_YOURS = "450 4.7.1 ATRN request refused: {domain} is not held for you"
ATRN_NO_DOMAINS = "450 4.7.1 ATRN request refused: no domain is held for you"
NOT_ON_ODMR = "502 5.5.1 Command not available on the ODMR port (ATRN only)"

# -- submission (mta/submission.py) -----------------------------------------------------------
AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
AUTH_TOO_MANY_FAILURES = "454 4.7.0 Too many authentication failures, try later"
AUTH_TEMPORARY = "454 4.7.0 Temporary authentication failure"
AUTH_BAD_BASE64 = "501 5.5.2 Cannot decode base64"
AUTH_BAD_PLAIN = "501 5.5.2 Malformed PLAIN credentials"
SENDER_NOT_OWNED = "553 5.7.1 <{addr}> Sender address not owned by user {login}"
FROM_NOT_OWNED = "553 5.7.1 From: header address <{addr}> not owned by user {login}"
FROM_UNREADABLE = "553 5.7.1 From: header without a readable address"
MESSAGE_RATE = "451 4.7.1 Message rate limit reached for your account, try again later"

# -- LMTP (mta/smtp/lmtp.py, mda/) ------------------------------------------------------------
BAD_QUEUE_ID = "501 5.5.4 Malformed XQUEUEID"
BDAT_SYNTAX = "501 5.5.4 Syntax: BDAT <size> [LAST]"
NEED_LHLO = "503 5.5.1 Error: send LHLO first"
NOT_LMTP = '500 5.5.1 Error: command "{verb}" not recognized, this is LMTP'
NEED_MAIL_AND_RCPT = "503 5.5.1 Need MAIL and an accepted RCPT first"
CHUNK_RECEIVED = "250 2.0.0 {size} octets received"
NEED_EHLO = "503 5.5.1 Error: send EHLO first"
AUTH_REQUIRED = "530 5.7.0 Authentication required"
REQUIRETLS_WITHOUT_TLS = "530 5.7.10 REQUIRETLS needs a TLS session (STARTTLS first)"
BINARYMIME_NEEDS_BDAT = "503 5.5.1 BODY=BINARYMIME: send the message with BDAT (RFC 3030 3)"
DATA_AFTER_BDAT = "503 5.5.1 DATA after BDAT in one transaction (RFC 3030): send RSET"
LMTP_SENDER_OK = "250 2.1.0 Sender OK"
LMTP_RCPT_OK = "250 2.1.5 OK"
MALFORMED_RCPT = "553 5.1.3 <{addr}> Malformed address"
NO_SUCH_MAILBOX = "550 5.1.1 <{addr}> No such mailbox here"
UNSAFE_MAILBOX = "550 5.1.3 {why}"
DELIVERY_LOCAL_ERROR = "451 4.3.0 Local error in delivery, try again later"
DELIVERED = "250 2.0.0 <{addr}> Delivered"
DELIVERED_ALREADY = "250 2.0.0 <{addr}> Delivered (already)"
MAILBOX_FULL = "452 4.2.2 <{addr}> Mailbox full"
MAILBOX_STORAGE_FULL = "452 4.3.1 <{addr}> Insufficient system storage"
MAILBOX_LOCAL_ERROR = "451 4.3.0 <{addr}> Temporary local problem, try again later"
