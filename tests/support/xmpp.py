"""Real XMPP clients (slixmpp) for end-to-end tests through jabberd2's c2s.

Owns: connecting over plain TCP on loopback, in-band registration
(XEP-0077), SASL PLAIN login, and collecting what arrives so a test can
wait (bounded) for a stanza matching a condition.
Must not know: which router sits behind c2s.

Every wait has a timeout: nothing here blocks forever. Call these from
inside one `asyncio.run(...)`; clients bind to the running loop.
"""

import asyncio
import contextlib

import slixmpp
from slixmpp.exceptions import IqError, IqTimeout

DEFAULT_TIMEOUT = 10.0


class LoginFailed(RuntimeError):
    """Registration, authentication or session start did not succeed."""


class Client(slixmpp.ClientXMPP):
    """A client that records every message and presence it receives.

    No automatic subscription handling: the test answers subscription
    requests itself, so it can assert on each step.

    With `register_only`, the client registers in-band and goes away
    without logging in. jabberd2 2.7's c2s cannot do both on one stream:
    after an in-stream registration, the session start for the later bind
    is never answered (c2s matches the sm's reply against the resource it
    made for the registration and drops it). So tests register first, then
    log in on a new connection, as real clients do.
    """

    def __init__(self, jid, password, *, register_only=False):
        # Loopback without TLS: c2s offers no STARTTLS, so allow SASL PLAIN in clear.
        super().__init__(jid, password, plugin_config={
            "feature_mechanisms": {"unencrypted_plain": True}})
        self.enable_direct_tls = False
        self.enable_starttls = False
        self.enable_plaintext = True
        self.use_aiodns = False
        self.roster.auto_authorize = None  # neither accept nor refuse on our own
        self.roster.auto_subscribe = False
        self.received = []  # ('message' | 'presence', stanza), in arrival order
        self._arrived = asyncio.Event()
        self._outcome = asyncio.get_running_loop().create_future()
        # Nobody may be waiting any more when a late failure arrives.
        self._outcome.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.register_plugin("xep_0077")
        if register_only:
            self.add_event_handler("register", self._register)
            self.unregister_feature("mechanisms", self.plugin["feature_mechanisms"].order)
            self.add_event_handler("stream_negotiated", self._fail("no registration offered"))
        else:
            self.add_event_handler("session_start", self._session_start)
            self.add_event_handler("failed_all_auth", self._fail("authentication failed"))
            self.add_event_handler("no_auth", self._fail("no usable authentication"))
        self.add_event_handler("disconnected", self._fail("disconnected too early"))
        self.add_event_handler("message", self._record("message"))
        self.add_event_handler("presence", self._record("presence"))

    # -- registration and login ------------------------------------------------

    async def _register(self, _form):
        iq = self.Iq()
        iq["type"] = "set"
        iq["register"]["username"] = self.boundjid.user
        iq["register"]["password"] = self.password
        try:
            await iq.send(timeout=DEFAULT_TIMEOUT)
        except (IqError, IqTimeout) as exc:
            self._settle(LoginFailed("registration of %s failed: %s" % (self.boundjid.bare, exc)))
        else:
            self._settle(None)

    def _session_start(self, _event):
        self._settle(None)

    def _fail(self, why):
        def handler(_event):
            self._settle(LoginFailed("%s: %s" % (self.boundjid.bare, why)))
        return handler

    def _settle(self, error):
        if self._outcome.done():
            return
        if error is None:
            self._outcome.set_result(True)
        else:
            self._outcome.set_exception(error)

    async def run_until_ready(self, host, port, timeout=DEFAULT_TIMEOUT):
        """Connect to c2s at host:port; wait until registered or session started."""
        self.connect(host, port)
        try:
            await asyncio.wait_for(asyncio.shield(self._outcome), timeout)
        except BaseException:
            self.abort()
            raise
        return self

    async def logout(self, timeout=DEFAULT_TIMEOUT):
        """Close the stream politely (abort the socket if that takes too long),
        then end slixmpp's send task, which it would otherwise leave pending."""
        try:
            await asyncio.wait_for(self.disconnect(wait=min(2.0, timeout)), timeout)
        except asyncio.TimeoutError:
            self.abort()
        sender = self._run_out_filters
        if sender is not None and not sender.done():
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender

    # -- what arrives ----------------------------------------------------------

    def _record(self, kind):
        def handler(stanza):
            self.received.append((kind, stanza))
            self._arrived.set()
        return handler

    async def wait_for(self, kind, match=lambda s: True, timeout=DEFAULT_TIMEOUT):
        """Take (remove and return) the first received `kind` stanza that `match`es.

        Looks at what arrived already, then waits for more, at most `timeout`
        seconds; raises TimeoutError listing what did arrive.
        """
        async def take():
            while True:
                for i, (k, stanza) in enumerate(self.received):
                    if k == kind and match(stanza):
                        del self.received[i]
                        return stanza
                self._arrived.clear()
                await self._arrived.wait()

        try:
            return await asyncio.wait_for(take(), timeout)
        except asyncio.TimeoutError:
            seen = "\n".join("  %s" % s for k, s in self.received if k == kind) or "  (none)"
            raise TimeoutError("%s: no matching %s within %.1fs; unmatched ones:\n%s" % (
                self.boundjid, kind, timeout, seen)) from None

    def pending(self, kind):
        """Stanzas of `kind` received and not yet taken by wait_for."""
        return [s for k, s in self.received if k == kind]

    # -- requests ----------------------------------------------------------------

    async def fetch_roster(self, timeout=DEFAULT_TIMEOUT):
        """Ask the server for the roster; return {bare jid str: item dict}."""
        iq = self.Iq()
        iq["type"] = "get"
        iq.enable("roster")
        result = await iq.send(timeout=timeout)
        return {str(jid): dict(item) for jid, item in result["roster"]["items"].items()}


async def register(jid, password, host, port, timeout=DEFAULT_TIMEOUT):
    """Register `jid` in-band (XEP-0077) through c2s at host:port, then disconnect."""
    client = Client(jid, password, register_only=True)
    await client.run_until_ready(host, port, timeout)
    await client.logout(timeout)


async def login(jid, password, host, port, timeout=DEFAULT_TIMEOUT):
    """A Client logged in as `jid` (its resource is the one requested)."""
    client = Client(jid, password)
    return await client.run_until_ready(host, port, timeout)


class Clients:
    """The clients of one test, all logged out at the end whatever happens.

        async with Clients(stack.c2s_ip, stack.c2s_port) as clients:
            await clients.register("alice@example.test", "pw")
            alice = await clients.login("alice@example.test/home", "pw")
    """

    def __init__(self, host, port, timeout=DEFAULT_TIMEOUT):
        self.host, self.port, self.timeout = host, port, timeout
        self._open = []

    async def register(self, jid, password):
        await register(jid, password, self.host, self.port, self.timeout)

    async def login(self, jid, password):
        client = Client(jid, password)
        self._open.append(client)
        return await client.run_until_ready(self.host, self.port, self.timeout)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await asyncio.gather(*(c.logout(self.timeout) for c in self._open))


def run(coro, timeout=120.0):
    """Run one async test scenario on a fresh event loop, bounded by `timeout`."""
    return asyncio.run(asyncio.wait_for(coro, timeout))
