"""jrouter on Debian's pypy3 (issue 12: PyPy, measured in docs/architecture.md):
the real jabberd2 sm and c2s chat through it, and components of both
protocols exchange stanzas byte for byte.

The interpreter is the venv scripts/bootstrap makes (.venv-pypy: Debian's
pypy3, with gevent built from source, since PyPI has no PyPy 3.9 wheel of
it); its absence is a failure, not a skip. The chat tests are test_chat's
own, collected here again with `router` running on PyPy.
"""

import os
import subprocess

import pytest

from tests.e2e import test_chat
from tests.support.cluster_nodes import ComponentPeer
from tests.support.routers import PYPY, REPO_ROOT

# test_chat's own, collected here again: `router` below runs on PyPy.
test_subscriptions_and_presence = test_chat.test_subscriptions_and_presence
test_messages = test_chat.test_messages
test_offline_message = test_chat.test_offline_message

_IMPORT_ALL = """
import pkgutil, importlib, platform, jrouter
for module in pkgutil.walk_packages(jrouter.__path__, "jrouter."):
    if module.name != "jrouter.__main__":
        importlib.import_module(module.name)
print(platform.python_implementation())
"""


@pytest.fixture
def router(router_factory):
    """jrouter run by pypy3 (every test of this module, test_chat's too)."""
    assert PYPY.exists(), "%s missing: scripts/bootstrap makes it" % PYPY
    router = router_factory("jrouter-pypy")
    executable = os.readlink("/proc/%d/exe" % router.pid)
    assert "pypy" in os.path.basename(executable), executable
    return router


def test_every_module_imports_on_pypy():
    """The cluster modules too (no match statement, no 3.10-only typing at run time)."""
    assert PYPY.exists(), "%s missing: scripts/bootstrap makes it" % PYPY
    done = subprocess.run([str(PYPY), "-c", _IMPORT_ALL], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "PyPy"


def test_components_of_both_protocols_exchange_stanzas_byte_for_byte(router):
    address = (router.ip, router.port)
    peers = [ComponentPeer.bound(address, "ca.test"), ComponentPeer.bound(address, "cb.test"),
             ComponentPeer.accepted(address, "xa.test"), ComponentPeer.accepted(address, "xb.test")]
    ca, cb, xa, xb = peers
    try:
        route = ("<route to='cb.test' from='ca.test'><message xmlns='jabber:client' to='u@cb.test' "
                 "from='v@ca.test' id='r1'><body>Grüße &amp; ✓</body></message></route>")
        stanza = "<message to='u@xb.test' from='v@xa.test' id='x1'><body>zurück &lt;3</body></message>"
        for _ in range(50):            # until each sees the other's name bound
            ca.send(route)
            xa.send(stanza)
            got = cb.find(lambda e: e.attrs.get("to") == "cb.test", 0.1)
            if got is not None:
                break
        assert got is not None and got.raw == route.encode(), getattr(got, "raw", None)
        arrived = xb.find(lambda e: e.attrs.get("id") == "x1", 5.0)
        assert arrived is not None and arrived.raw == stanza.encode(), getattr(arrived, "raw", None)
    finally:
        for peer in peers:
            peer.close()
