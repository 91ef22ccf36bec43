"""End to end over TLS: the real jabberd2 sm and c2s use STARTTLS to the router
(their <router><pemfile>), and clients chat through them."""

import pytest

from tests.support.jabberd2 import RouterAddress
from tests.support.tap import Tap
from tests.support.tls import make_pemfile
from tests.support.xmpp import Clients, run

DOMAIN = "example.test"


@pytest.fixture
def tls_stack(tmp_path, router_factory, router_kind, jabberd2_stack_factory):
    """Router with a pemfile; sm and c2s reach it through a recording relay."""
    pem = make_pemfile(tmp_path)
    router = router_factory(router_kind, local_extra=f"<pemfile>{pem}</pemfile>")
    tap = Tap(router.ip, router.port)
    stack = jabberd2_stack_factory(RouterAddress(tap.ip, tap.port, pemfile=str(pem)))
    yield router, stack, tap
    tap.stop()


def test_sm_and_c2s_reach_the_router_over_tls(tls_stack):
    """sm and c2s negotiate TLS with the router; users then register, log in and chat."""
    router, stack, tap = tls_stack

    async def scenario():
        async with Clients(stack.c2s_ip, stack.c2s_port) as clients:
            for user in ("alice", "bob"):
                await clients.register(f"{user}@{DOMAIN}", f"{user}-pw")
            alice = await clients.login(f"alice@{DOMAIN}/a", "alice-pw")
            bob = await clients.login(f"bob@{DOMAIN}/b", "bob-pw")
            alice.send_presence()
            bob.send_presence()
            alice.send_message(mto=f"bob@{DOMAIN}/b", mbody="over TLS", mtype="chat")
            got = await bob.wait_for("message", lambda m: m["body"] == "over TLS")
            assert str(got["from"]) == f"alice@{DOMAIN}/a"
    run(scenario())
    # On the wire: each component asked for STARTTLS, then sent TLS records
    # (a handshake record starts with byte 0x16) and never plain SASL.
    assert len(tap.upstream) >= 2
    for sent in tap.upstream:
        head, _, rest = bytes(sent).partition(b"<starttls")
        assert rest, head[:200]
        after = rest[rest.index(b">") + 1:]
        assert after[:1] == b"\x16" and b"<auth" not in after
