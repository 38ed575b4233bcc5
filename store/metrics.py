"""The stack's Prometheus metrics, one set for every process (see store/telemetry.py).

Made at import: in multiprocess mode (``[metrics] listen`` set) that must come after
``telemetry.enable()``, which ``pochta serve`` and ``pochta up`` call first thing. Names follow
Prometheus' conventions: ``pochta_`` prefix, ``_total`` on counters (added by the client
library), base units (seconds, bytes).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Made at import: in multiprocess mode that must come after enable().

CONNECTIONS = Counter("pochta_connections", "Connections admitted, by listener "
                      "(smtp, submission, submissions, lmtp)", ["listener"])
SESSIONS = Gauge("pochta_sessions", "Sessions open now, by listener", ["listener"],
                 multiprocess_mode="livesum")
REFUSALS = Counter("pochta_refusals", "Replies 4xx and 5xx sent, by listener and enhanced "
                   "status code", ["listener", "status"])
MESSAGES = Counter("pochta_messages_accepted", "Messages accepted (spooled), by listener",
                   ["listener"])
MESSAGE_BYTES = Counter("pochta_messages_accepted_bytes", "Size of the messages accepted, "
                        "by listener", ["listener"])
RECIPIENTS = Counter("pochta_recipients_accepted", "Recipients of the messages accepted, by "
                     "listener", ["listener"])
TLS_SESSIONS = Counter("pochta_tls_sessions", "TLS handshakes completed, by listener and "
                       "protocol version", ["listener", "version"])
AUTH_FAILURES = Counter("pochta_auth_failures", "AUTH attempts refused, by listener",
                        ["listener"])
DEFENCE_HITS = Counter("pochta_defence_hits", "Clients refused or delayed by a defence "
                       "(dnsbl, greylist, pregreet, connection_rate, message_rate, auth_rate)",
                       ["check"])
SPAM_CHECKS = Counter("pochta_spam_checks", "Messages checked by rspamd, by result (ham, spam, "
                      "rejected, deferred, error: no verdict)", ["result"])
AUTH_RESULTS = Counter("pochta_authentication_results", "SPF, DKIM and DMARC results of "
                       "inbound messages", ["method", "result"])
DELIVERIES = Counter("pochta_deliveries", "Delivery attempts per recipient, by relay (local, "
                     "remote, smarthost) and outcome (sent, deferred, bounced, expired)",
                     ["relay", "outcome"])
DELIVERY_DELAY = Histogram("pochta_delivery_delay_seconds", "Time from acceptance to "
                           "delivery, by relay", ["relay"],
                           buckets=(0.1, 0.5, 1, 5, 30, 60, 300, 900, 3600, 14400, 86400,
                                    432000))
QUEUE_MESSAGES = Gauge("pochta_queue_messages", "Messages in the queue, by state (active, "
                       "deferred, held)", ["state"], multiprocess_mode="livemax")
QUEUE_OLDEST = Gauge("pochta_queue_oldest_message_age_seconds", "Age of the oldest message "
                     "in the queue (0 when empty)", multiprocess_mode="livemax")
MAILBOX_WRITES = Counter("pochta_mailbox_deliveries", "Messages written into mailboxes by the "
                         "MDA, by outcome (sent, deferred, failed)", ["outcome"])
