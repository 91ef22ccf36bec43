"""router-users.xml: the component user table (jabberd2's ``user_table_load``, protocol §2.3).

Owns: reading the file into name -> secret.  Must not know: SASL, ACLs or
logging: ``load_users`` never raises and returns the log lines jabberd2
would write, for the caller to log.
"""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

from .xmlfile import XMLProblem, element_text, parse_xml

@dataclass(frozen=True)
class UsersResult:
    """The user table (name -> secret) and the log lines (level, text) jabberd2 would write."""

    users: dict[str, str]
    messages: list[tuple[str, str]]


def _local_children(el: etree._Element, name: str) -> list[etree._Element]:
    # nad_parse is namespace-aware: names are compared without prefix or namespace.
    return [c for c in el.iterchildren(etree.Element) if etree.QName(c).localname == name]


def load_users(path: str) -> UsersResult:
    """Read the user table.  Never raises: a bad file gives an empty table and an error line."""
    try:
        handle = open(path, "rb")
    except OSError as exc:
        return UsersResult({}, [("error", f"couldn't open user table file {path}: {exc.strerror}")])
    try:
        with handle:
            data = handle.read()
    except OSError as exc:
        return UsersResult({}, [("error", f"couldn't read from user table file: {exc.strerror}")])
    if not data:
        return UsersResult({}, [("error", f"empty user table file {path}")])
    try:
        root = parse_xml(data)
    except XMLProblem:
        return UsersResult({}, [("error", "couldn't parse user table")])
    users: dict[str, str] = {}
    messages: list[tuple[str, str]] = []
    count = 0
    for user in _local_children(root, "user"):
        name = [element_text(e) for e in _local_children(user, "name")[:1]]
        secret = [element_text(e) for e in _local_children(user, "secret")[:1]]
        if not (name and name[0] and secret and secret[0]):
            # jabberd2 logs this forever without advancing (protocol §2.3); we log once and go on.
            messages.append(("error", "malformed user entry in user table file, skipping"))
            continue
        users[name[0]] = secret[0]  # a later duplicate overwrites, as xhash_put does
        count += 1
    messages.append(("notice", f"loaded user table ({count} users)"))
    return UsersResult(users, messages)
