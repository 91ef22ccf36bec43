"""The one grammar of jrouter's configuration: numbers, switches, names, addresses.

Owns: how a value written in router.xml becomes a Python value, for every
section (jabberd2's own keys and ours alike), and how a problem is written
(``Problems``: ``FILE:LINE: element.path[@attr]: message``).
Must not know: which setting uses which reader, or what a setting does.

Each reader takes the text as written and returns the value or raises
``ValueError`` with a message that completes "FILE:LINE: KEY: ...".
Where jabberd2 silently turns garbage into something (``atoi("abc")`` is 0,
so ``<port>abc</port>`` listens on a random port), these readers refuse it
(protocol §2.2).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Callable, Optional, Sequence, TypeVar, Union

T = TypeVar("T")
D = TypeVar("D")

_INTEGER = re.compile(r"[ \t\r\n]*([+-]?[0-9]+)[ \t\r\n]*\Z")
_LABEL = re.compile(r"[\w-]{1,63}\Z")

#: The words a yes/no attribute of ours accepts (any case).
BOOLEANS = {"yes": True, "true": True, "1": True, "on": True,
            "no": False, "false": False, "0": False, "off": False}


class Problems(list[str]):
    """The problems found in one file, each a string naming file, line and element."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def add(self, line: int, key: str, message: str) -> None:
        self.append(f"{self.path}:{line}: {key}: {message}")

    def read(self, line: int, key: str, value: str, reader: Callable[[str], T],
             default: D) -> Union[T, D]:
        """``reader(value)``, or ``default`` after adding the reader's complaint."""
        try:
            return reader(value)
        except ValueError as exc:
            self.add(line, key, str(exc))
            return default


def text(value: str) -> str:
    return value


def integer(value: str) -> int:
    """A whole number, with an optional sign and surrounding white space."""
    match = _INTEGER.match(value)
    if match is None:
        raise ValueError(f"expected an integer, got {value!r}")
    return int(match.group(1))


def integer_from(low: int, high: Optional[int] = None, noun: str = "") -> Callable[[str], int]:
    """A reader of integers in ``low..high`` (no upper bound when ``high`` is None);
    ``noun`` names the value in the message ("port must be between ...")."""
    def read(value: str) -> int:
        number = integer(value)
        if high is not None and not low <= number <= high:
            raise ValueError(f"{noun + ' ' if noun else ''}must be between {low} and {high}, got {number}")
        if number < low:
            raise ValueError(f"must not be negative, got {number}" if low == 0
                             else f"must be at least {low}, got {number}")
        return number
    return read


non_negative = integer_from(0)
positive = integer_from(1)
port = integer_from(1, 65535, "port")


def jabberd2_flag(value: str) -> bool:
    """jabberd2's switches (``<enabled/>`` is "1"): any integer, true unless 0."""
    return integer(value) != 0


def boolean(value: str) -> bool:
    """Our yes/no attributes: yes/no, true/false, on/off, 1/0, in any case."""
    word = value.strip().lower()
    if word not in BOOLEANS:
        raise ValueError(f"expected yes or no, got {value!r}")
    return BOOLEANS[word]


def choice(allowed: Sequence[Optional[str]]) -> Callable[[str], str]:
    """A reader that takes one of ``allowed`` exactly."""
    def read(value: str) -> str:
        if value not in allowed:
            listed = ", ".join(repr(a) for a in allowed if a is not None)
            raise ValueError(f"must be one of {listed}, got {value!r}")
        return value
    return read


def ip_literal(value: str) -> str:
    """An IPv4 or IPv6 address as written (no host names: nothing is resolved)."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 or IPv6 address (host names are not allowed)") from None
    return value


def domain(value: str) -> str:
    """A domain name, in lower case."""
    name = value.lower()
    if len(name.encode("utf-8")) > 1023 or not all(_LABEL.match(label) for label in name.split(".")):
        raise ValueError(f"{value!r} is not a domain name")
    return name
