"""jrouter compiled (issue 12; docs/architecture.md, compiled): the modules
setup.py's COMPILED names built into C extensions by mypyc from the same
sources, in the tree scripts/build-compiled makes.

Every test that compares the routers runs on it already (the router kind
"jrouter-compiled" is one of ROUTER_KINDS: the real sm and c2s, biboumi,
xmpp.js, mu-conference, faults, TLS, operations, lifecycle, memory;
test_federation pairs it with the C router, through the real s2s; and
test_multinode runs every test on compiled nodes too). This
module checks that the build is what it claims: each of those modules is an
extension in the tree, the running router has mapped them, everything else
still imports, and unusual bytes go through both protocols unchanged.
"""

import ast
import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e import test_pypy
from tests.support.routers import REPO_ROOT, compiled_tree

# test_pypy's own, collected here again: `router` below runs compiled.
test_components_of_both_protocols_exchange_stanzas_byte_for_byte = \
    test_pypy.test_components_of_both_protocols_exchange_stanzas_byte_for_byte

#: The shared library mypyc makes for them all (setup.py's group_name).
_LIBRARY = "jrouter__mypyc"

#: The unit test files that cannot run on the compiled build, and why. All
#: the others run on it (test_unit_tests_pass_on_the_compiled_build): that is
#: how parse_jid(None) and RemoteMember were found.
INTERPRETED_ONLY = {
    "test_outbox.py": "plain strings stand for routes",
    "test_teardown_memory.py": "weak references, which native classes do not take",
    "test_fuzz_connection.py": "weak references, and a Connection method replaced",
}

_IMPORT_ALL = """
import importlib, pkgutil, jrouter
for module in pkgutil.walk_packages(jrouter.__path__, "jrouter."):
    if module.name != "jrouter.__main__":
        print(module.name, importlib.import_module(module.name).__file__)
"""


def compiled_names():
    """The module names setup.py's COMPILED lists (read, not imported:
    importing setup.py would run setup())."""
    tree = ast.parse((REPO_ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["COMPILED"]:
            paths = ast.literal_eval(node.value)
            return {p[:-len(".py")].replace("/", ".") for p in paths}
    raise AssertionError("setup.py has no COMPILED list")


@pytest.fixture
def router(router_factory):
    """jrouter run from the compiled tree, with its extensions loaded."""
    router = router_factory("jrouter-compiled")
    maps = Path("/proc/%d/maps" % router.pid).read_text()
    assert _LIBRARY in maps, "the router process has not loaded %s" % _LIBRARY
    return router


#: The one extension written in C (setup.py's framer_module), in every CPython build.
C_FRAMER = "jrouter.wire._expatframe"


def test_every_module_setup_py_names_is_an_extension_and_the_rest_imports():
    names = compiled_names()
    assert "jrouter.wire.xmlstream" in names and "jrouter.routing.router" in names, names
    names.add(C_FRAMER)
    tree = compiled_tree()
    done = subprocess.run([sys.executable, "-c", _IMPORT_ALL], cwd=tree, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    files = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    extension = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    assert names <= set(files), names - set(files)
    for name, path in files.items():
        assert os.path.dirname(path).startswith(str(tree)), (name, path)   # not the source tree's
        assert path.endswith(extension) == (name in names), (name, path)


def test_unit_tests_pass_on_the_compiled_build():
    """The unit tests, on the compiled modules: the tree first on the path
    (and the tests' own directory appended, so it stays first)."""
    tree = compiled_tree()
    ignored = ["--ignore=tests/unit/%s" % name for name in INTERPRETED_ONLY]
    done = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "pytest"), "-q", "-p", "no:cacheprovider",
         "--import-mode=append", "tests/unit", *ignored,
         "tests/e2e/test_compiled.py::test_this_process_runs_the_compiled_build"],
        cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(tree), JROUTER_EXPECT_COMPILED="1"),
        capture_output=True, text=True, timeout=280, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-6000:]
    assert " passed" in done.stdout and " failed" not in done.stdout, done.stdout[-2000:]


def test_this_process_runs_the_compiled_build():
    """Run by the test above in the compiled unit run: proof it was compiled."""
    import jrouter.wire.xmlstream

    if os.environ.get("JROUTER_EXPECT_COMPILED") == "1":
        assert jrouter.wire.xmlstream.__file__.startswith(str(compiled_tree()))
        assert jrouter.wire.xmlstream.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    else:
        assert jrouter.wire.xmlstream.__file__.endswith(".py")
