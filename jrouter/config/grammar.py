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
_TOKEN = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")

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


def token(value: str) -> str:
    """A safe name (ASCII letters, digits, ``-``, ``_``, ``.``; 1-64 of them):
    one that can stand in a key, a file name or a log line as it is."""
    if not _TOKEN.match(value):
        raise ValueError(f"{value!r} is not a name of 1 to 64 letters, digits, '-', '_' or '.'")
    return value


def host_port(value: str) -> tuple[str, int]:
    """``host:port``: an IPv4 address or a domain name, or an IPv6 address in
    brackets (``[::1]:5348``), then a port.  Nothing is resolved; a domain
    name comes back in lower case."""
    if value.startswith("["):
        host, bracket, number = value[1:].partition("]:")
        if not bracket:
            raise ValueError(f"expected [IPv6 address]:port, got {value!r}")
        if not _is_ip(host, version=6):
            raise ValueError(f"{value!r}: only an IPv6 address goes in brackets")
        return host, port(number)
    host, colon, number = value.rpartition(":")
    if not colon or not host:
        raise ValueError(f"expected host:port, got {value!r}")
    if ":" in host:
        raise ValueError(f"{value!r}: write an IPv6 address in brackets, [{host}]:{number}")
    if not _is_ip(host):
        host = domain(host)
    return host, port(number)


def _is_ip(value: str, version: Optional[int] = None) -> bool:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return False
    return version is None or address.version == version
