"""Shared fixtures: routers of each kind, and the real jabberd2 sm/c2s around them.

`router_kind` is parametrized over ROUTER_KINDS (the C router, jrouter, and
jrouter compiled: tests/support/routers.py), so every test that uses `router`
(or `jabberd2_stack`) runs once against each router. A test that wants one
kind only parametrizes `router_kind` itself.
When a test fails, the logs and output of the processes it started are added
to the report.
"""

import pytest

from tests.support.jabberd2 import Jabberd2Stack
from tests.support.ports import connect_address, free_port
from tests.support.routers import ROUTER_KINDS, RouterProcess, write_router_config

_PROCESSES = pytest.StashKey()


def _track(request, thing):
    """Remember a process (or stack) whose logs go into the report on failure."""
    request.node.stash.setdefault(_PROCESSES, []).append(thing)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed:
        for thing in item.stash.get(_PROCESSES, []):
            report.sections.append(("%s (%s)" % (thing.name, report.when), thing.describe()))


@pytest.fixture(params=ROUTER_KINDS)
def router_kind(request):
    """'jabberd2' (Debian's C router), 'jrouter' (ours) or 'jrouter-compiled'."""
    return request.param


@pytest.fixture
def router_factory(request, tmp_path):
    """make(kind, *, args=(), start=True, **config) -> RouterProcess.

    `config` goes to write_router_config (port defaults to a free one);
    each router gets its own dir under tmp_path. All are stopped at teardown.
    """
    made = []

    def make(kind, *, args=(), start=True, **config):
        ip = config.setdefault("ip", "127.0.0.1")
        port = config.pop("port", None) or free_port(connect_address(ip))
        directory = tmp_path / ("router" if not made else "router-%d" % (len(made) + 1))
        router = RouterProcess(kind, write_router_config(directory, port, **config), args=args)
        made.append(router)
        _track(request, router)
        return router.start() if start else router

    yield make
    for router in reversed(made):
        router.stop()


@pytest.fixture
def router(router_factory, router_kind):
    """A started router of `router_kind` with Debian's default users and ACLs."""
    return router_factory(router_kind)


@pytest.fixture
def jabberd2_stack_factory(request, tmp_path, router_factory):
    """make(router, **kwargs) -> started Jabberd2Stack (kwargs as Jabberd2Stack).

    Depends on router_factory so that stacks stop before their routers (a
    router stopped under live components waits for them: slow and noisy).
    """
    made = []

    def make(router, **kwargs):
        directory = tmp_path / ("jabberd2" if not made else "jabberd2-%d" % (len(made) + 1))
        stack = Jabberd2Stack(directory, router, **kwargs)
        made.append(stack)
        _track(request, stack)
        return stack.start()

    yield make
    for stack in reversed(made):
        stack.stop()


@pytest.fixture
def jabberd2_stack(jabberd2_stack_factory, router):
    """Real jabberd2 sm + c2s for example.test, connected to `router`."""
    return jabberd2_stack_factory(router)
