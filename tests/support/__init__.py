"""Test support: real processes and clients around the router under test.

ports     free loopback ports; "is process P listening on port N" without connecting
process   ManagedProcess: a foreground daemon with captured output, SIGTERM then SIGKILL
routers   write_router_config(), RouterProcess(kind) for 'jabberd2' | 'jrouter'
jabberd2  Debian's jabberd2 sm and c2s (sqlite, in-band registration): Jabberd2Stack
xmpp      slixmpp clients that register, log in and wait (bounded) for stanzas
peer      Peer: a blocking component (jabberd2 protocol or XEP-0114) on jrouter.testing's client role
faults    components to SIGKILL (half a stanza, never reading, echoing), bystander probes, RSS
"""
