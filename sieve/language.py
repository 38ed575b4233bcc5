"""What each Sieve command and test accepts (RFC 5228 and the extensions we implement), and
the check of a parsed script against it: ``compile_script`` turns text into checked nodes or
raises ``SieveError`` with the position of the first mistake. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

from sieve.grammar import Argument, Command, SieveError, Test, parse

# What `require` may name, and what ManageSieve's CAPABILITY announces.
EXTENSIONS = (
    "fileinto", "envelope", "copy", "subaddress", "imap4flags", "body", "variables",
    "reject", "ereject", "vacation", "regex", "comparator-i;octet",
    "comparator-i;ascii-casemap",
)
COMPARATORS = ("i;octet", "i;ascii-casemap")
MATCH_TYPES = {":is": None, ":contains": None, ":matches": None, ":regex": "regex"}
ADDRESS_PARTS = {":all": None, ":localpart": None, ":domain": None, ":user": "subaddress",
                 ":detail": "subaddress"}
# RFC 5229 §4.1's modifiers (":quoteregex" is the regex draft's; ":encodeurl" belongs to
# enotify, which we do not offer).
SET_MODIFIERS = (":lower", ":upper", ":lowerfirst", ":upperfirst", ":quotewildcard",
                 ":quoteregex", ":length")


@dataclass(frozen=True)
class Signature:
    """``tags``: tag -> kind of its value ("" none, "string", "strings", "number") and the
    extension it needs; ``positional``: the kinds of the arguments after the tags;
    ``tests``: 0, 1, or -1 (a list); ``block``: whether it takes ``{...}``."""

    tags: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    positional: tuple[str, ...] = ()
    tests: int = 0
    block: bool = False
    extension: str | None = None
    groups: tuple[tuple[str, ...], ...] = ()  # tags of which at most one may appear
    min_positional: int | None = None  # fewer allowed (hasflag's optional variable list)


def _tags(names: dict[str, str | None], kind: str = "") -> dict[str, tuple[str, str | None]]:
    return {name: (kind, ext) for name, ext in names.items()}


_COMPARATOR = {":comparator": ("string", None)}
_MATCH = {**_COMPARATOR, **_tags(MATCH_TYPES)}
_ADDRESS = {**_MATCH, **_tags(ADDRESS_PARTS)}
_MATCH_GROUPS = (tuple(MATCH_TYPES),)
_ADDRESS_GROUPS = (tuple(MATCH_TYPES), tuple(ADDRESS_PARTS))
_FLAGS: dict[str, tuple[str, str | None]] = {":flags": ("strings", "imap4flags")}

COMMANDS: dict[str, Signature] = {
    "require": Signature(positional=("strings",)),
    "if": Signature(tests=1, block=True),
    "elsif": Signature(tests=1, block=True),
    "else": Signature(block=True),
    "stop": Signature(),
    "keep": Signature(tags=_FLAGS),
    "discard": Signature(),
    "fileinto": Signature(tags={":copy": ("", "copy"), **_FLAGS, ":create": ("", None)},
                          positional=("string",), extension="fileinto"),
    "redirect": Signature(tags={":copy": ("", "copy")}, positional=("string",)),
    "reject": Signature(positional=("string",), extension="reject"),
    "ereject": Signature(positional=("string",), extension="ereject"),
    "vacation": Signature(tags={":days": ("number", None), ":subject": ("string", None),
                                ":from": ("string", None), ":addresses": ("strings", None),
                                ":mime": ("", None), ":handle": ("string", None)},
                          positional=("string",), extension="vacation"),
    "setflag": Signature(positional=("strings", "strings"), extension="imap4flags",
                         min_positional=1),
    "addflag": Signature(positional=("strings", "strings"), extension="imap4flags",
                         min_positional=1),
    "removeflag": Signature(positional=("strings", "strings"), extension="imap4flags",
                            min_positional=1),
    "set": Signature(tags=_tags({m: "regex" if m == ":quoteregex" else None
                                 for m in SET_MODIFIERS}), positional=("string", "string"),
                     extension="variables"),
}

TESTS: dict[str, Signature] = {
    "address": Signature(tags=_ADDRESS, positional=("strings", "strings"),
                         groups=_ADDRESS_GROUPS),
    "envelope": Signature(tags=_ADDRESS, positional=("strings", "strings"),
                          extension="envelope", groups=_ADDRESS_GROUPS),
    "header": Signature(tags=_MATCH, positional=("strings", "strings"), groups=_MATCH_GROUPS),
    "exists": Signature(positional=("strings",)),
    "size": Signature(tags={":over": ("", None), ":under": ("", None)}, positional=("number",),
                      groups=((":over", ":under"),)),
    "allof": Signature(tests=-1),
    "anyof": Signature(tests=-1),
    "not": Signature(tests=1),
    "true": Signature(),
    "false": Signature(),
    "body": Signature(tags={**_MATCH, ":raw": ("", None), ":text": ("", None),
                            ":content": ("strings", None)},
                      positional=("strings",), extension="body",
                      groups=(*_MATCH_GROUPS, (":raw", ":text", ":content"))),
    "hasflag": Signature(tags=_MATCH, positional=("strings", "strings"),
                         extension="imap4flags", groups=_MATCH_GROUPS, min_positional=1),
    "string": Signature(tags=_MATCH, positional=("strings", "strings"), extension="variables",
                        groups=_MATCH_GROUPS),
}


@dataclass
class Node:
    """A checked command or test: tag values (True for a tag without one), positional
    arguments (``list[str]`` or ``int``), its tests and block."""

    name: str
    tags: dict[str, object]
    args: list[object]
    tests: list[Node]
    block: list[Node] | None
    line: int
    column: int


def compile_script(text: str) -> tuple[list[Node], set[str]]:
    """The checked commands of ``text`` and the extensions it requires."""
    commands = parse(text)
    required: set[str] = set()
    nodes: list[Node] = []
    _check_block(commands, required, nodes, top=True)
    return nodes, required


def _check_block(commands: list[Command], required: set[str], out: list[Node],
                 top: bool = False) -> None:
    previous = ""
    requires_allowed = top
    for cmd in commands:
        if cmd.name == "require":
            if not requires_allowed:
                raise SieveError("require must come before any other command", cmd.line,
                                 cmd.column)
            node = _check(cmd, COMMANDS["require"], required)
            for ext in cast("list[str]", node.args[0]):
                if ext not in EXTENSIONS:
                    raise SieveError(f"unsupported extension {ext!r}", cmd.line, cmd.column)
                required.add(ext)
            out.append(node)
            continue
        requires_allowed = False
        sig = COMMANDS.get(cmd.name)
        if sig is None:
            hint = " (a test, not a command)" if cmd.name in TESTS else ""
            raise SieveError(f"unknown command {cmd.name!r}{hint}", cmd.line, cmd.column)
        if cmd.name in ("elsif", "else") and previous not in ("if", "elsif"):
            raise SieveError(f"{cmd.name} without a preceding if", cmd.line, cmd.column)
        node = _check(cmd, sig, required)
        if cmd.block is not None:
            node.block = []
            _check_block(cmd.block, required, node.block)
        out.append(node)
        previous = cmd.name


def _need(ext: str | None, required: set[str], what: str, line: int, column: int) -> None:
    if ext is not None and ext not in required:
        raise SieveError(f'{what} needs require "{ext}"', line, column)


def _check(item: Command | Test, sig: Signature, required: set[str]) -> Node:
    _need(sig.extension, required, item.name, item.line, item.column)
    tags: dict[str, object] = {}
    args: list[object] = []
    arguments = list(item.args)
    i = 0
    while i < len(arguments) and arguments[i].kind == "tag":
        arg = arguments[i]
        name = str(arg.value)
        spec = sig.tags.get(name)
        if spec is None:
            raise SieveError(f"{item.name} has no tag {name}", arg.line, arg.column)
        value_kind, ext = spec
        _need(ext, required, name, arg.line, arg.column)
        if name in tags:
            raise SieveError(f"tag {name} given twice", arg.line, arg.column)
        for group in sig.groups:
            if name in group and any(t in tags for t in group):
                raise SieveError(f"{name} conflicts with an earlier tag", arg.line, arg.column)
        value: object = True
        if value_kind:
            if i + 1 >= len(arguments):
                raise SieveError(f"{name} needs a value", arg.line, arg.column)
            value = _value(arguments[i + 1], value_kind, name)
            i += 1
        tags[name] = value
        i += 1
    if ":comparator" in tags:
        comparator = tags[":comparator"]
        if comparator not in COMPARATORS:
            raise SieveError(f"unsupported comparator {comparator!r}", item.line, item.column)
    rest = arguments[i:]
    wanted = list(sig.positional)
    low = sig.min_positional if sig.min_positional is not None else len(wanted)
    if not low <= len(rest) <= len(wanted):
        where = rest[len(wanted)] if len(rest) > len(wanted) else item
        raise SieveError(f"{item.name} takes {_count(low, len(wanted))} argument(s) after its "
                         f"tags, found {len(rest)}", where.line, where.column)
    # With an optional leading argument (hasflag, setflag...), the last one is the required.
    kinds = wanted[len(wanted) - len(rest):]
    for arg, want in zip(rest, kinds, strict=True):
        args.append(_value(arg, want, item.name))
    tests: list[Node] = []
    if sig.tests == 0 and item.tests:
        t = item.tests[0]
        raise SieveError(f"{item.name} takes no test", t.line, t.column)
    if sig.tests == 1 and len(item.tests) != 1:
        raise SieveError(f"{item.name} needs exactly one test", item.line, item.column)
    if sig.tests == -1 and not item.tests:
        raise SieveError(f"{item.name} needs a list of tests", item.line, item.column)
    for t in item.tests:
        tsig = TESTS.get(t.name)
        if tsig is None:
            hint = " (a command, not a test)" if t.name in COMMANDS else ""
            raise SieveError(f"unknown test {t.name!r}{hint}", t.line, t.column)
        tests.append(_check(t, tsig, required))
    if isinstance(item, Command):
        if sig.block and item.block is None:
            raise SieveError(f"{item.name} needs a block {{...}}", item.line, item.column)
        if not sig.block and item.block is not None:
            raise SieveError(f"{item.name} takes no block; end it with \";\"", item.line,
                             item.column)
    if item.name == "size" and not tags:
        raise SieveError("size needs :over or :under", item.line, item.column)
    return Node(item.name, tags, args, tests, None, item.line, item.column)


def _count(low: int, high: int) -> str:
    return str(high) if low == high else f"{low} to {high}"


def _value(arg: Argument, kind: str, what: str) -> object:
    if kind == "number":
        if arg.kind != "number":
            raise SieveError(f"{what} needs a number", arg.line, arg.column)
        return arg.value
    if arg.kind != "strings":
        raise SieveError(f"{what} needs a string{' list' if kind == 'strings' else ''}",
                         arg.line, arg.column)
    assert isinstance(arg.value, list)
    if kind == "string":
        if len(arg.value) != 1:
            raise SieveError(f"{what} needs one string, not a list", arg.line, arg.column)
        return arg.value[0]
    return list(arg.value)


def check(text: str) -> str:
    """"" for a script that compiles, else the error ("line L, column C: ...")."""
    try:
        compile_script(text)
    except SieveError as e:
        return str(e)
    return ""
