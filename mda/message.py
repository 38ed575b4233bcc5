"""Turning the LMTP DATA bytes into the bytes a mailbox stores (pure functions)."""

from __future__ import annotations


def to_lf(data: bytes) -> bytes:
    """Mailboxes on Unix store LF line endings; SMTP carries CRLF."""
    return data.replace(b"\r\n", b"\n")


def trace_headers(mail_from: str, rcpt: str) -> bytes:
    """``Return-Path`` (RFC 5321 §4.4: added at final delivery) and ``Delivered-To``."""
    sender = "" if mail_from in ("", "<>") else mail_from
    return (f"Return-Path: <{sender}>\nDelivered-To: {rcpt}\n").encode()


def stored_message(body: bytes, mail_from: str, rcpt: str) -> bytes:
    """The message as one mailbox keeps it: our two headers, then ``body`` (LF endings)."""
    if body and not body.endswith(b"\n"):
        body += b"\n"
    return trace_headers(mail_from, rcpt) + body
