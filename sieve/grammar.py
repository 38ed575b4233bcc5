"""The Sieve language's syntax (RFC 5228 §2 and §8): text to a tree of commands, or a
``SieveError`` with the line and column of the first mistake. Pure; nothing here knows what a
command means (sieve/language.py checks that).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_SCRIPT = 256 * 1024  # bytes: a user's filter, not a program
MAX_DEPTH = 32  # nested blocks and tests


class SieveError(ValueError):
    """A script that cannot run: ``line`` and ``column`` are 1-based."""

    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__(f"line {line}, column {column}: {message}")
        self.message = message
        self.line = line
        self.column = column


@dataclass(frozen=True)
class Token:
    kind: str  # identifier, tag, number, string, or the punctuation itself: ; , ( ) [ ] { }
    value: str | int
    line: int
    column: int


@dataclass
class Test:
    name: str
    args: list[Argument]
    tests: list[Test]
    line: int
    column: int


@dataclass
class Command:
    name: str
    args: list[Argument]
    tests: list[Test]
    block: list[Command] | None  # None: the command ended with ";"
    line: int
    column: int


@dataclass
class Argument:
    kind: str  # "tag", "number", "strings"
    value: str | int | list[str]
    line: int
    column: int


_TOKEN = re.compile(r"""
    (?P<space>[ \t\r\n]+)
  | (?P<hashcomment>\#[^\n]*)
  | (?P<bracketcomment>/\*.*?\*/)
  | (?P<multiline>text:[ \t]*(?:\#[^\n]*)?\r?\n)
  | (?P<tag>:[A-Za-z_][A-Za-z0-9_]*)
  | (?P<identifier>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<number>[0-9]+[KkMmGg]?)
  | (?P<quoted>"(?:[^"\\]|\\.)*")
  | (?P<punct>[;,()\[\]{}])
""", re.VERBOSE | re.DOTALL)

_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def tokenize(text: str) -> list[Token]:
    if len(text.encode()) > MAX_SCRIPT:
        raise SieveError(f"script larger than {MAX_SCRIPT} bytes", 1, 1)
    tokens: list[Token] = []
    pos = 0
    line, line_start = 1, 0

    def where(p: int) -> tuple[int, int]:
        return line, p - line_start + 1

    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            ln, col = where(pos)
            if text.startswith("/*", pos):
                raise SieveError("comment not closed with */", ln, col)
            if text[pos] == '"':
                raise SieveError("string not closed with \"", ln, col)
            raise SieveError(f"unexpected character {text[pos]!r}", ln, col)
        kind = m.lastgroup
        assert kind is not None
        raw = m.group()
        ln, col = where(pos)
        end = m.end()
        if kind == "multiline":
            value, end = _multiline(text, end, ln, col)
            tokens.append(Token("string", value, ln, col))
        elif kind == "tag":
            tokens.append(Token("tag", raw.lower(), ln, col))
        elif kind == "identifier":
            tokens.append(Token("identifier", raw.lower(), ln, col))
        elif kind == "number":
            unit = raw[-1].lower()
            n = int(raw[:-1]) * _UNITS[unit] if unit in _UNITS else int(raw)
            if n >= 1 << 63:
                raise SieveError("number too large", ln, col)
            tokens.append(Token("number", n, ln, col))
        elif kind == "quoted":
            tokens.append(Token("string", re.sub(r"\\(.)", r"\1", raw[1:-1], flags=re.DOTALL),
                                ln, col))
        elif kind == "punct":
            tokens.append(Token(raw, raw, ln, col))
        consumed = text[pos:end]
        newlines = consumed.count("\n")
        if newlines:
            line += newlines
            line_start = pos + consumed.rindex("\n") + 1
        pos = end
    tokens.append(Token("end", "", *where(len(text))))  # where "unexpected end" points
    return tokens


def _multiline(text: str, start: int, line: int, column: int) -> tuple[str, int]:
    """A ``text:`` string (RFC 5228 §2.4.2): lines up to a line holding only ".", with a
    leading ".." standing for "."."""
    lines: list[str] = []
    pos = start
    while True:
        nl = text.find("\n", pos)
        if nl < 0:
            raise SieveError('multi-line string not ended by a line with "."', line, column)
        current = text[pos:nl].rstrip("\r")
        pos = nl + 1
        if current == ".":
            return "".join(lines), pos
        lines.append((current[1:] if current.startswith("..") else current) + "\r\n")


class _Parser:
    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens
        self.i = 0

    def peek(self) -> Token | None:
        token = self.tokens[self.i]
        return None if token.kind == "end" else token

    def take(self) -> Token:
        token = self.peek()
        if token is None:
            end = self.tokens[-1]
            raise SieveError("unexpected end of script", end.line, end.column)
        self.i += 1
        return token

    def expect(self, kind: str, what: str) -> Token:
        token = self.take()
        if token.kind != kind:
            raise SieveError(f"expected {what}, found {_shown(token)}", token.line, token.column)
        return token

    def commands(self, depth: int, closing: bool) -> list[Command]:
        out: list[Command] = []
        while True:
            token = self.peek()
            if token is None:
                if closing:
                    end = self.tokens[-1]
                    raise SieveError("block not closed with }", end.line, end.column)
                return out
            if token.kind == "}" and closing:
                self.i += 1
                return out
            out.append(self.command(depth))

    def command(self, depth: int) -> Command:
        name = self.expect("identifier", "a command")
        args, tests = self.arguments(depth)
        end = self.take()
        if end.kind == ";":
            return Command(str(name.value), args, tests, None, name.line, name.column)
        if end.kind == "{":
            if depth >= MAX_DEPTH:
                raise SieveError("blocks nested too deeply", end.line, end.column)
            block = self.commands(depth + 1, True)
            return Command(str(name.value), args, tests, block, name.line, name.column)
        raise SieveError(f'expected ";" or "{{" after {name.value}, found {_shown(end)}',
                         end.line, end.column)

    def arguments(self, depth: int) -> tuple[list[Argument], list[Test]]:
        args: list[Argument] = []
        while True:
            token = self.peek()
            if token is None:
                return args, []
            if token.kind == "tag":
                self.i += 1
                args.append(Argument("tag", token.value, token.line, token.column))
            elif token.kind == "number":
                self.i += 1
                args.append(Argument("number", token.value, token.line, token.column))
            elif token.kind == "string":
                self.i += 1
                args.append(Argument("strings", [str(token.value)], token.line, token.column))
            elif token.kind == "[":
                args.append(self.string_list())
            elif token.kind == "identifier":
                return args, [self.test(depth + 1)]
            elif token.kind == "(":
                return args, self.test_list(depth + 1)
            else:
                return args, []

    def string_list(self) -> Argument:
        start = self.take()
        values: list[str] = []
        while True:
            values.append(str(self.expect("string", "a string in the list").value))
            sep = self.take()
            if sep.kind == "]":
                return Argument("strings", values, start.line, start.column)
            if sep.kind != ",":
                raise SieveError(f'expected "," or "]", found {_shown(sep)}', sep.line,
                                 sep.column)

    def test(self, depth: int) -> Test:
        if depth >= MAX_DEPTH:
            token = self.take()
            raise SieveError("tests nested too deeply", token.line, token.column)
        name = self.expect("identifier", "a test")
        args, tests = self.arguments(depth)
        return Test(str(name.value), args, tests, name.line, name.column)

    def test_list(self, depth: int) -> list[Test]:
        self.take()
        tests: list[Test] = []
        while True:
            tests.append(self.test(depth))
            sep = self.take()
            if sep.kind == ")":
                return tests
            if sep.kind != ",":
                raise SieveError(f'expected "," or ")", found {_shown(sep)}', sep.line,
                                 sep.column)


def _shown(token: Token) -> str:
    if token.kind == "string":
        return "a string"
    if token.kind == "number":
        return f"the number {token.value}"
    return repr(token.value)


def parse(text: str) -> list[Command]:
    """The script's commands; ``SieveError`` for a script that does not follow the grammar."""
    return _Parser(tokenize(text)).commands(0, False)
