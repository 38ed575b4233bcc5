"""The MDA: an LMTP server (RFC 2033) writing each message into the user's maildir or mbox."""
