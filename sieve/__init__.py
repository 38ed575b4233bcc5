"""The Sieve mail filtering language (RFC 5228 and extensions): syntax (grammar.py), what
each command accepts (language.py) and running a script for one delivery (interpreter.py).
Pure: imports nothing of pochta's other packages; the MDA carries out what a script decides,
ManageSieve and the CLI check scripts with it.
"""

from sieve.grammar import SieveError
from sieve.interpreter import (
    INBOX,
    Context,
    Limits,
    Outcome,
    SieveRuntimeError,
    Vacation,
    evaluate,
)
from sieve.language import EXTENSIONS, Node, check, compile_script

__all__ = ["EXTENSIONS", "INBOX", "Context", "Limits", "Node", "Outcome", "SieveError",
           "SieveRuntimeError", "Vacation", "check", "compile_script", "evaluate"]
