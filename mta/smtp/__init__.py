"""The SMTP and LMTP wire layer: the only code that imports aiosmtpd.

- ``server``: listeners (implicit TLS counted before its handshake), connection limits, and
  ``BaseSMTP``, aiosmtpd's SMTP class with our session set-up, idle timer, reply batching and
  DATA/BDAT reading;
- ``data``: DATA framing (end marker, dot-stuffing, line and size limits, bare CR/LF), pure;
- ``protocol``: SMTP as the MTA and the MSA speak it (strict command lines, DSN parameters);
- ``lmtp``: LMTP as the MDA speaks it (LHLO, one reply per recipient, BDAT, XQUEUEID).

Everything else (mta/session.py, mta/submission.py, mda/session.py) writes handlers and takes
aiosmtpd's public names from here.

aiosmtpd is pinned to 1.4.x (pyproject.toml) because ``server`` relies on these private
names of its SMTP class; audit them here before an upgrade:

- ``__init__`` is replaced (``BaseSMTP.__init__``): what aiosmtpd sets per connection is read
  instead from one ``ListenerSettings`` per listener through properties (``hostname``,
  ``tls_context``, ``data_size_limit``, ``event_handler``, ``_timeout_duration``,
  ``_auth_require_tls``, ``_authenticator``, ``_auth_callback``, ``_decode_data``,
  ``_handle_hooks``, ``_ehlo_hook_ver``, ``_auth_methods``, ``_smtp_methods``,
  ``_call_limit_base``, ``_call_limit_default``) or class defaults (``_tls_handshake_okay``,
  ``_tls_protocol``, ``_original_transport``, ``_timeout_handle``, ``_handler_coroutine``,
  ``_proxy_timeout``, ``session``, ``envelope``, ``transport``); ``_enforce_call_limit`` is
  off and ``_smtp_methods`` counts the calls instead;
- ``_handle_client`` (wrapped: admission, pregreet), ``_cb_client_connected`` (the strict
  line reader), ``_reader`` / ``_writer`` and the reader's ``_buffer`` and ``_limit``;
- ``_call_handler_hook``, ``_set_post_data_state``, ``_reset_timeout``, ``_timeout_cb``,
  ``_strip_command_keyword``, ``_getaddr`` (a fast path for plain paths), and
  ``login_always_fail``.
"""

from aiosmtpd.smtp import MISSING, AuthResult, Envelope, LoginPassword, Session

__all__ = ["MISSING", "AuthResult", "Envelope", "LoginPassword", "Session"]
