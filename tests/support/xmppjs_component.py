"""xmpp.js (`@xmpp/component`, JavaScript) as an XEP-0114 component behind a router.

Owns: running tests/support/xmppjs/echo.mjs under node against a router, the
secret in the environment (COMPONENT_SECRET, never on the command line), and
reading back what the component logged, one line per event (echo.mjs's
opening comment lists them).
Must not know: which router runs, or what a test concludes from the log.

node_modules comes from tests/support/xmppjs/install (run by
scripts/bootstrap); xmpp.js is pinned in its package-lock.json.
"""

import os
import re
import shutil
from pathlib import Path

from .ports import connect_address
from .process import ManagedProcess

XMPPJS_DIR = Path(__file__).resolve().parent / "xmppjs"
ECHO_SCRIPT = XMPPJS_DIR / "echo.mjs"
INSTALL = XMPPJS_DIR / "install"

_STANZA = re.compile(r"^stanza (\S+) ns=(\S+) body-ns=(\S+) type=(\S+) from=(\S+)$")
_RECEIVED = re.compile(r"^received message from (\S+) body=(.*)$")
_ESCAPED = re.compile(r"\\(.)")


def _unescape(text):
    """Undo the escaping echo.mjs applies to a log line (backslash, newline)."""
    return _ESCAPED.sub(lambda m: "\n" if m.group(1) == "n" else m.group(1), text)


def node_binary():
    """The node that runs xmpp.js, with xmpp.js installed beside echo.mjs."""
    node = shutil.which("node")
    if node is None:
        raise FileNotFoundError("node is missing: install Debian's nodejs (scripts/bootstrap)")
    if not (XMPPJS_DIR / "node_modules" / "@xmpp" / "component").is_dir():
        raise FileNotFoundError("xmpp.js is not installed: run %s (scripts/bootstrap does)"
                                % INSTALL)
    return node


class XmppJsComponent(ManagedProcess):
    """One xmpp.js echo component serving `domain`, connected to `router`.

    `start` returns once the router answered the handshake (`<handshake/>`
    in the log), whether or not xmpp.js itself then came online: against a
    router that offers stream features, xmpp.js takes those for the answer
    and reports an error, though the router has accepted it.
    """

    def __init__(self, directory, domain, router, secret="secret", name="xmppjs"):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        log = directory / (name + ".log")
        argv = [node_binary(), str(ECHO_SCRIPT), domain, connect_address(router.ip),
                str(router.port), str(log)]
        super().__init__(name, argv, directory, cwd=XMPPJS_DIR,
                         env=dict(os.environ, COMPONENT_SECRET=secret), log_path=log)
        self.domain = domain

    def start(self, timeout=10.0):
        return self.spawn_until(timeout, log="nonza handshake")

    # -- what it logged ----------------------------------------------------------

    @property
    def events(self):
        """The component's log, one event per line."""
        return self.log_text.splitlines()

    def online(self):
        """True if xmpp.js itself reached status 'online' (it believes it is connected)."""
        return "online as %s" % self.domain in self.events

    def stream_header(self):
        """{'from', 'version', 'id'} of the router's stream header ('-' = absent)."""
        for line in self.events:
            if line.startswith("stream "):
                return dict(field.split("=", 1) for field in line.split()[1:])
        return None

    def nonzas(self):
        """[log line] for each top-level element that xmpp.js did not take for a stanza."""
        return [line for line in self.events if line.startswith("nonza ")]

    def stanzas(self, name=None):
        """[{name, ns, body_ns, type, from}] for each stanza xmpp.js emitted as 'stanza'."""
        found = []
        for line in self.events:
            m = _STANZA.match(line)
            if m and (name is None or m.group(1) == name):
                found.append(dict(zip(("name", "ns", "body_ns", "type", "from"), m.groups())))
        return found

    def received(self):
        """[(sender, body)] of the messages the component answered."""
        return [(m.group(1), _unescape(m.group(2)))
                for m in map(_RECEIVED.match, self.events) if m]

    def errors(self):
        return [line for line in self.events if line.startswith(("error ", "start failed"))]
