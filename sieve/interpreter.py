"""Running a checked Sieve script against one message for one recipient: the outcome says
where copies go (folders and their flags), what to redirect, reject or discard, and the
vacation reply to consider. Pure: the MDA (mda/filtering.py) carries the outcome out.

Safe by construction: Sieve has no loops, scripts are size-limited (sieve/grammar.py), and
``Limits`` bound actions, redirects and the time a regular expression may take. A run that
breaks a limit or hits an error raises ``SieveRuntimeError``; the caller then keeps the
message in the INBOX (RFC 5228 §2.10.6), so a broken filter never loses mail.
"""

from __future__ import annotations

import email.header
import email.message
import email.parser
import email.policy
import email.utils
import html
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import regex

from sieve.language import Node

INBOX = ""  # the folder name of the INBOX in an outcome
SYSTEM_FLAGS = {"\\seen": "\\Seen", "\\answered": "\\Answered", "\\flagged": "\\Flagged",
                "\\deleted": "\\Deleted", "\\draft": "\\Draft"}


class SieveRuntimeError(Exception):
    pass


@dataclass(frozen=True)
class Limits:
    actions: int = 32
    redirects: int = 4
    regex_seconds: float = 0.25
    body_bytes: int = 1 << 20  # of decoded text a body test searches


@dataclass(frozen=True)
class Vacation:
    reason: str
    days: int
    subject: str | None
    sender: str | None  # :from
    addresses: tuple[str, ...]
    mime: bool
    handle: str


@dataclass
class Outcome:
    folders: dict[str, list[str]] = field(default_factory=dict)  # folder -> flags, in order
    redirects: list[str] = field(default_factory=list)
    reject: str | None = None
    ereject: bool = False
    vacation: Vacation | None = None
    discarded: bool = False
    implicit_keep: bool = True


@dataclass
class Context:
    """One delivery as the script sees it: the header section parsed once, the envelope."""

    message: bytes  # the message (LF or CRLF line endings)
    envelope_from: str  # "" for the null sender
    envelope_to: str  # the recipient as given (with any +detail)
    _headers: email.message.Message | None = None
    _full: email.message.Message | None = None

    @property
    def headers(self) -> email.message.Message:
        if self._headers is None:
            self._headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
                self.message)
        return self._headers

    @property
    def full(self) -> email.message.Message:
        if self._full is None:
            self._full = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(
                self.message)
        return self._full

    def header_values(self, name: str) -> list[str]:
        return [_decoded(v) for v in self.headers.get_all(name, [])]


def _decoded(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (ValueError, LookupError, UnicodeError, email.errors.HeaderParseError):
        return text


_ASCII_FOLD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _fold(s: str, comparator: str) -> str:
    return s.translate(_ASCII_FOLD) if comparator == "i;ascii-casemap" else s


def glob_to_regex(pattern: str) -> str:
    """A :matches pattern (``*``, ``?``, ``\\`` escapes) as a regular expression whose groups
    are the wildcards' matches (the variables ${1}...)."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append("(.*?)" if c == "*" else "(.)" if c == "?" else re.escape(c))
        i += 1
    return "".join(out)


class Run:
    def __init__(self, ctx: Context, required: set[str], limits: Limits,
                 subaddress_separator: str = "+") -> None:
        self.ctx = ctx
        self.required = required
        self.limits = limits
        self.separator = subaddress_separator
        self.outcome = Outcome()
        self.actions = 0
        self.variables: dict[str, str] = {}
        self.matches: list[str] = []  # ${0}, ${1}... of the last successful :matches/:regex
        self.flags: list[str] = []  # imap4flags' internal variable

    # -- strings and variables (RFC 5229) --------------------------------------------------

    def expand(self, s: str) -> str:
        if "variables" not in self.required or "${" not in s:
            return s

        def one(m: re.Match[str]) -> str:
            name = m.group(1).lower()
            if name.isdigit():
                n = int(name)
                return self.matches[n] if n < len(self.matches) else ""
            return self.variables.get(name, "")

        return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*|[0-9]+)\}", one, s)

    def strings(self, value: object) -> list[str]:
        assert isinstance(value, list)
        return [self.expand(str(v)) for v in value]

    def string(self, value: object) -> str:
        return self.expand(str(value))

    # -- matching -------------------------------------------------------------------------

    def match(self, node: Node, values: Iterable[str], keys: list[str]) -> bool:
        comparator = str(node.tags.get(":comparator", "i;ascii-casemap"))
        for value in values:
            for key in keys:
                if self._match_one(node, comparator, value, key):
                    return True
        return False

    def _match_one(self, node: Node, comparator: str, value: str, key: str) -> bool:
        v, k = _fold(value, comparator), _fold(key, comparator)
        if ":contains" in node.tags:
            return k in v
        if ":matches" in node.tags:
            # Many "*" against a long header backtrack for ages: bounded like :regex.
            m = self._timed(regex.fullmatch, glob_to_regex(k), v, regex.DOTALL, key)
            if m and "variables" in self.required:
                self.matches = [value, *(value[m.start(i):m.end(i)]
                                         for i in range(1, (m.lastindex or 0) + 1))]
            return m is not None
        if ":regex" in node.tags:
            flags = regex.IGNORECASE if comparator == "i;ascii-casemap" else 0
            r = self._timed(regex.search, key, value, flags, key)
            if r and "variables" in self.required:
                self.matches = [r.group(0), *(g or "" for g in r.groups())][:10]
            return r is not None
        return v == k  # :is

    def _timed(self, find: Callable[..., regex.Match[str] | None], pattern: str, value: str,
               flags: int, key: str) -> regex.Match[str] | None:
        try:
            return find(pattern, value, flags, timeout=self.limits.regex_seconds)
        except regex.error as e:
            raise SieveRuntimeError(f"bad regular expression {key!r}: {e}") from None
        except TimeoutError:
            raise SieveRuntimeError(f"pattern {key!r} took too long to match") from None

    def address_parts(self, node: Node, addresses: Iterable[str]) -> list[str]:
        out: list[str] = []
        for address in addresses:
            local, at, domain = address.rpartition("@")
            if not at:
                local, domain = address, ""
            if ":localpart" in node.tags:
                out.append(local)
            elif ":domain" in node.tags:
                out.append(domain)
            elif ":user" in node.tags or ":detail" in node.tags:
                user, sep, detail = local.partition(self.separator)
                if ":user" in node.tags:
                    out.append(user)
                elif sep:  # no separator: :detail matches nothing (RFC 5233 §4)
                    out.append(detail)
            else:
                out.append(address)
        return out

    # -- tests ----------------------------------------------------------------------------

    def test(self, node: Node) -> bool:
        name = node.name
        if name == "true":
            return True
        if name == "false":
            return False
        if name == "not":
            return not self.test(node.tests[0])
        if name == "allof":
            return all(self.test(t) for t in node.tests)
        if name == "anyof":
            return any(self.test(t) for t in node.tests)
        if name == "exists":
            return all(self.ctx.headers.get_all(h) for h in self.strings(node.args[0]))
        if name == "size":
            size = len(self.ctx.message)
            limit = node.args[0]
            assert isinstance(limit, int)
            return size > limit if ":over" in node.tags else size < limit
        if name == "header":
            values = [v for h in self.strings(node.args[0]) for v in self.ctx.header_values(h)]
            return self.match(node, values, self.strings(node.args[1]))
        if name == "address":
            found = [a for h in self.strings(node.args[0])
                     for _, a in email.utils.getaddresses(self.ctx.header_values(h)) if a]
            return self.match(node, self.address_parts(node, found), self.strings(node.args[1]))
        if name == "envelope":
            found = []
            for part in self.strings(node.args[0]):
                part = part.lower()
                if part == "from":
                    found.append(self.ctx.envelope_from)
                elif part == "to":
                    found.append(self.ctx.envelope_to)
            if ":user" in node.tags or ":detail" in node.tags or ":localpart" in node.tags:
                found = [a for a in found if a]  # the null sender has no parts
            return self.match(node, self.address_parts(node, found), self.strings(node.args[1]))
        if name == "body":
            return self.match(node, [self.body_text(node)], self.strings(node.args[0]))
        if name == "hasflag":
            keys = self.strings(node.args[-1])
            if len(node.args) == 2:
                have = [f for var in self.strings(node.args[0])
                        for f in self.variables.get(var.lower(), "").split()]
            else:
                have = self.flags
            return self.match(node, have, [k for key in keys for k in key.split()])
        if name == "string":
            return self.match(node, self.strings(node.args[0]), self.strings(node.args[1]))
        raise SieveRuntimeError(f"test {name} is not implemented")  # pragma: no cover

    def body_text(self, node: Node) -> str:
        limit = self.limits.body_bytes
        if ":raw" in node.tags:
            raw = self.ctx.message
            sep = raw.find(b"\n\n")
            body = raw[sep + 2:] if sep >= 0 else b""
            return body[:limit].decode("utf-8", "replace")
        types = node.tags.get(":content", ["text"])
        assert isinstance(types, list)
        wanted = [t.lower() for t in types]
        parts: list[str] = []
        size = 0
        for part in self.ctx.full.walk():
            if part.is_multipart():
                continue
            ctype = part.get_content_type()
            if not any(w == "" or w == ctype or w == ctype.split("/")[0] for w in wanted):
                continue
            payload = part.get_payload(decode=True)
            if not isinstance(payload, bytes):
                continue
            charset = part.get_content_charset() or "us-ascii"
            try:
                text = payload.decode(charset, "replace")
            except LookupError:
                text = payload.decode("utf-8", "replace")
            if ctype == "text/html" and ":content" not in node.tags:
                # RFC 5173 §5.2: :text means the text a reader sees, not the markup.
                text = html.unescape(re.sub(r"(?s)<(script|style)\b.*?</\1\s*>|<[^>]*>", " ",
                                            text))
            parts.append(text)
            size += len(text)
            if size >= limit:
                break
        return "\n".join(parts)[:limit]

    # -- commands -------------------------------------------------------------------------

    def count_action(self) -> None:
        self.actions += 1
        if self.actions > self.limits.actions:
            raise SieveRuntimeError(f"more than {self.limits.actions} actions")

    def flags_of(self, node: Node) -> list[str]:
        if ":flags" in node.tags:
            return _flag_list(self.strings(node.tags[":flags"]))
        return list(self.flags)

    def store(self, folder: str, flags: list[str]) -> None:
        existing = self.outcome.folders.get(folder)
        if existing is None:
            self.outcome.folders[folder] = flags
        else:  # stored once per folder; the flags of every action that asked for it
            existing.extend(f for f in flags if f not in existing)

    def run(self, nodes: list[Node]) -> bool:
        """False once ``stop`` ran."""
        skip_else = False
        for node in nodes:
            name = node.name
            if name == "require":
                continue
            if name in ("if", "elsif", "else"):
                if name == "if":
                    skip_else = False
                if skip_else:
                    continue
                if name == "else" or self.test(node.tests[0]):
                    skip_else = True
                    assert node.block is not None
                    if not self.run(node.block):
                        return False
                continue
            if name == "stop":
                return False
            self.command(node)
        return True

    def command(self, node: Node) -> None:
        name = node.name
        out = self.outcome
        if name in ("setflag", "addflag", "removeflag"):
            flags = _flag_list(self.strings(node.args[-1]))
            target = self.flags
            if len(node.args) == 2:
                var = self.strings(node.args[0])[0].lower()
                target = self.variables.get(var, "").split()
            if name == "setflag":
                target = flags
            elif name == "addflag":
                target = target + [f for f in flags if f not in target]
            else:
                drop = {f.lower() for f in flags}
                target = [f for f in target if f.lower() not in drop]
            if len(node.args) == 2:
                self.variables[self.strings(node.args[0])[0].lower()] = " ".join(target)
            else:
                self.flags = target
            return
        if name == "set":
            self.variables[self.string(node.args[0]).lower()] = _modify(
                self.string(node.args[1]), node.tags)
            return
        self.count_action()
        if name == "keep":
            out.implicit_keep = False
            self.store(INBOX, self.flags_of(node))
        elif name == "discard":
            out.implicit_keep = False
            out.discarded = True
        elif name == "fileinto":
            folder = normalize_folder(self.string(node.args[0]))
            if ":copy" not in node.tags:
                out.implicit_keep = False
            self.store(folder, self.flags_of(node))
        elif name == "redirect":
            address = self.string(node.args[0]).strip()
            if "@" not in address or any(c in address for c in " <>\r\n\t,"):
                raise SieveRuntimeError(f"redirect to a malformed address {address!r}")
            if ":copy" not in node.tags:
                out.implicit_keep = False
            if address.lower() not in (r.lower() for r in out.redirects):
                if len(out.redirects) >= self.limits.redirects:
                    raise SieveRuntimeError(f"more than {self.limits.redirects} redirects")
                out.redirects.append(address)
        elif name in ("reject", "ereject"):
            if out.reject is not None:
                raise SieveRuntimeError("more than one reject")
            out.implicit_keep = False
            out.reject = self.string(node.args[0])
            out.ereject = name == "ereject"
        elif name == "vacation":
            if out.vacation is not None:
                raise SieveRuntimeError("more than one vacation action")
            days = node.tags.get(":days", 7)
            assert isinstance(days, int)
            subject = node.tags.get(":subject")
            sender = node.tags.get(":from")
            handle = node.tags.get(":handle")
            addrs = node.tags.get(":addresses", [])
            reason = self.string(node.args[0])
            out.vacation = Vacation(
                reason=reason, days=min(max(days, 1), 30),
                subject=self.string(subject) if subject is not None else None,
                sender=self.string(sender) if sender is not None else None,
                addresses=tuple(self.strings(addrs)),
                mime=":mime" in node.tags,
                # RFC 5230 §4.2: without :handle, the reply's content identifies it.
                handle=self.string(handle) if handle is not None else (
                    f"{subject or ''}\0{node.tags.get(':from', '')}\0{reason}"))
        else:  # pragma: no cover - language.py knows every command
            raise SieveRuntimeError(f"command {name} is not implemented")


def _flag_list(values: list[str]) -> list[str]:
    out: list[str] = []
    for value in values:
        for flag in value.split():
            flag = SYSTEM_FLAGS.get(flag.lower(), flag)
            if flag not in out:
                out.append(flag)
    return out


def _modify(value: str, tags: dict[str, object]) -> str:
    """``set``'s modifiers (RFC 5229 §4.1), applied in their precedence order."""
    if ":lower" in tags:
        value = value.lower()
    if ":upper" in tags:
        value = value.upper()
    if ":lowerfirst" in tags:
        value = value[:1].lower() + value[1:]
    if ":upperfirst" in tags:
        value = value[:1].upper() + value[1:]
    if ":quotewildcard" in tags:
        value = re.sub(r"([*?\\])", r"\\\1", value)
    if ":quoteregex" in tags:
        value = regex.escape(value)
    if ":length" in tags:
        value = str(len(value))
    return value


def normalize_folder(name: str) -> str:
    """A fileinto mailbox name as the path of folders ("Lists/pochta"); "INBOX" is the INBOX."""
    parts = [p for p in name.replace(".", "/").split("/") if p]
    if not parts or (len(parts) == 1 and parts[0].upper() == "INBOX"):
        return INBOX
    if parts[0].upper() == "INBOX":
        parts = parts[1:]
    return "/".join(parts)


def evaluate(nodes: list[Node], required: set[str], ctx: Context,
             limits: Limits | None = None) -> Outcome:
    """Run the script; the outcome with the implicit keep applied (RFC 5228 §2.10.2)."""
    run = Run(ctx, required, limits or Limits())
    run.run(nodes)
    outcome = run.outcome
    if outcome.reject is not None and (outcome.folders or outcome.redirects):
        # RFC 5429 §2.1: reject is incompatible with keep, fileinto and redirect.
        raise SieveRuntimeError("reject together with keep, fileinto or redirect")
    if outcome.implicit_keep:
        run.store(INBOX, list(run.flags))
    return outcome
