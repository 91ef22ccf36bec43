"""jrouter.testing.component_client paired with the real in-memory router: each
harness Peer carries its client's bytes to Connection.receive and the router's
back to the client (Peer.converse), and the tests read what the client made of them."""

import pytest

from jrouter.testing.component_client import (
    NS_ACCEPT, AuthFailed, Authenticated, BindRefused, Bound, ComponentClient,
    LocalProtocolError, ProceedToTls, RemoteProtocolError, State, header)
from jrouter.wire.xmlstream import Element, StreamClose, StreamOpen

from .harness import Network, same


@pytest.fixture
def net():
    return Network()


def connect(net):
    peer = net.peer()
    return peer, peer.client


def online(net, name):
    """A client authenticated over the jabberd2 protocol and bound to ``name`` (by the harness)."""
    peer = net.component(name)
    return peer, peer.client


def elements(received):
    return [e for e in received if isinstance(e, Element)]


def test_authenticate_and_bind_over_the_jabberd2_protocol(net):
    """Header, features, SASL with the router's rspauth checked, a new stream, then <bind/>."""
    peer, client = connect(net)
    client.open()
    opened, features = peer.converse()
    assert isinstance(opened, StreamOpen) and client.state is State.READY
    assert [child.tag for child in features.tree()] == ["{urn:ietf:params:xml:ns:xmpp-sasl}mechanisms"]
    first_id = client.stream_id
    client.authenticate("jabberd", "secret")
    received = peer.converse()
    kinds = [type(e) for e in received]
    assert kinds == [Element, Element, Authenticated, StreamOpen, Element]  # challenge, success, ...
    assert client.authenticated and client.server_verified and client.state is State.ONLINE
    assert client.stream_id != first_id and len(received[-1].tree()) == 0    # empty features
    assert net.logged("authenticated as jabberd@")
    client.bind("sm")
    received = peer.converse()
    assert received[-1] == Bound("sm") and same(received[0].tree(), "<bind/>")
    assert client.bound == ["sm"] and net.logged("[sm] online")


def test_routes_flow_once_bound(net):
    """Two bound clients: a <route/> from one arrives at the other as an element."""
    sm_peer, sm = online(net, "sm")
    c2s_peer, c2s = online(net, "c2s")
    sm.receive(sm_peer.raw())             # c2s's advertisement
    c2s.send("<route to='sm' from='c2s'><message id='1'/></route>")
    c2s_peer.converse()
    (route,) = elements(sm.receive(sm_peer.raw()))
    assert same(route.tree(), "<route to='sm' from='c2s'><message id='1'/></route>")


def test_wrong_password_is_a_failure_event_and_a_retry_works(net):
    """<failure/> becomes AuthFailed(not-authorized); the stream stays and SASL can start again."""
    peer, client = connect(net)
    client.open()
    peer.converse()
    client.authenticate("jabberd", "wrong")
    received = peer.converse()
    (failed,) = [e for e in received if isinstance(e, AuthFailed)]
    assert failed.condition == "not-authorized" and b"<failure" in failed.raw
    assert client.failure == failed and client.state is State.READY and not client.authenticated
    client.authenticate("jabberd", "secret")
    assert Authenticated() in peer.converse() and client.state is State.ONLINE


def test_bind_refused_names_the_error(net):
    """A name taken already is refused with 409, reported against the name asked for."""
    online(net, "sm")
    peer, client = online(net, "c2s")
    client.bind("sm")
    received = peer.converse()
    assert received[-1] == BindRefused("sm", "409") and same(received[0].tree(), "<bind error='409'/>")
    assert client.refused == {"sm": "409"} and client.bound == ["c2s"]


def test_handshake_over_xep0114(net):
    """The header's stream id and the secret make the handshake; <handshake/> means online."""
    peer, client = connect(net)
    client.open(header(NS_ACCEPT, version=False, to="legacy.example.com"))
    (opened,) = peer.converse()
    assert opened.default_ns == NS_ACCEPT and client.state is State.OPEN
    client.handshake("secret")
    reply, authenticated = peer.converse()
    assert same(reply.tree(), "<handshake/>", NS_ACCEPT) and authenticated == Authenticated()
    assert client.authenticated and client.state is State.ONLINE
    assert net.logged("authenticated as legacy.example.com")


def test_wrong_secret_is_a_failure_event_and_the_end(net):
    """A bad handshake: the router's stream error is AuthFailed, then the stream closes."""
    peer, client = connect(net)
    client.open(header(NS_ACCEPT, version=False, to="legacy.example.com"))
    peer.converse()
    client.handshake("not the secret")
    received = peer.converse()
    failed = next(e for e in received if isinstance(e, AuthFailed))
    assert (failed.condition, failed.text) == ("not-authorized", "hash didn't match, auth failed")
    assert isinstance(received[-1], StreamClose) and client.state is State.CLOSED
    assert peer.closed and not client.authenticated


def challenged(net):
    """A client that has read the router's challenge; its response is queued, not sent."""
    peer, client = connect(net)
    client.open()
    peer.converse()
    client.authenticate("jabberd", "secret")
    peer.send(client.data_to_send())
    client.receive(peer.raw())
    return peer, client


def test_success_and_the_new_stream_in_one_chunk(net):
    """Bytes behind <success/> are read as the restarted stream, not the old one."""
    peer, client = challenged(net)
    peer.send(client.data_to_send() + header())   # the new header pipelined
    received = client.receive(peer.raw())  # <success/>, header and features at once
    assert [type(e) for e in received] == [Element, Authenticated, StreamOpen, Element]
    assert client.state is State.ONLINE
    assert client.data_to_send() == header()      # its own restart header, not needed here


def test_a_wrong_rspauth_is_refused(net):
    """A router that does not know the password (wrong rspauth) is a remote protocol error."""
    peer, client = challenged(net)
    peer.send(client.data_to_send())
    forged = b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>cnNwYXV0aD0wMDAw</success>"
    assert peer.raw().startswith(b"<success")
    with pytest.raises(RemoteProtocolError):
        client.receive(forged)             # rspauth=0000


def test_starttls_stops_at_proceed(net):
    """<starttls/> then <proceed/>: the caller starts TLS and the client starts over."""
    net.router.tls_available = True
    peer, client = connect(net)
    client.open()
    peer.converse()
    client.starttls()
    received = peer.converse()
    assert received[-1] == ProceedToTls() and client.state is State.START
    assert peer.connection.starting_tls


def test_requests_out_of_turn_are_local_errors():
    """bind before SASL, SASL before the features, a second open: LocalProtocolError."""
    client = ComponentClient()
    with pytest.raises(LocalProtocolError):
        client.bind("sm")
    with pytest.raises(LocalProtocolError):
        client.authenticate("jabberd", "secret")
    client.open()
    with pytest.raises(LocalProtocolError):
        client.open()
    assert client.data_to_send() == header()


def test_a_bind_written_by_hand_is_only_a_stanza(net):
    """A bind reply the client did not ask for changes nothing it tracks."""
    peer, client = online(net, "sm")
    peer.send("<bind name='other'/>")
    received = client.receive(peer.raw())
    assert [type(e) for e in received] == [Element] and client.bound == ["sm"]
