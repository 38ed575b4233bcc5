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

- ``__init__`` is replaced (``BaseSMTP.__init__``): it sets ``_tls_context``,
  ``_tls_handshake_okay``, ``_tls_protocol``, ``_original_transport``, ``_decode_data``,
  ``_timeout_duration``, ``_timeout_handle``, ``_handler_coroutine``, ``_auth_require_tls``,
  ``_auth_required``, ``_authenticator``, ``_auth_callback``, ``_proxy_timeout``,
  ``_enforce_call_limit``, ``_call_limit_base``, ``_call_limit_default``, and builds
  ``_auth_methods`` (of ``_AuthMechAttr``), ``_handle_hooks``, ``_smtp_methods`` and
  ``_ehlo_hook_ver`` once per (protocol, handler) class instead of per connection;
- ``_handle_client`` (wrapped: admission, pregreet), ``_cb_client_connected`` (the strict
  line reader), ``_reader`` / ``_writer`` and the reader's ``_buffer`` and ``_limit``;
- ``_call_handler_hook``, ``_set_post_data_state``, ``_reset_timeout``, ``_timeout_cb``,
  ``_strip_command_keyword``, ``_getaddr`` (a fast path for plain paths), and
  ``login_always_fail``.
"""

from aiosmtpd.smtp import MISSING, AuthResult, Envelope, LoginPassword, Session

__all__ = ["MISSING", "AuthResult", "Envelope", "LoginPassword", "Session"]
