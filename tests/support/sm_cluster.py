"""Several jabberd2 sm on one domain, each seen on the wire: where did the router send a packet?

Owns: a Jabberd2Stack whose every sm reaches the router through its own
WireTap (c2s connects directly), so a test reads, per sm, the packets the
router handed it; stopping an sm and starting it again with the same id;
where each session lives (the sm logs); what an sm filed as offline (the
shared sqlite `queue` table, mod_offline's).
Must not know: which router or placement runs, what a test concludes.

The tap is kept across an sm's restarts: each run is one more connection
of the same tap, so `placed` covers every run of the sm.
"""

import re
import sqlite3

from .jabberd2 import Jabberd2Stack, RouterAddress, SmProcess, write_sm_config
from .wiretap import DOWN, WireTap

COMPONENT = "http://jabberd.jabberstudio.org/ns/component/1.0"
SESSION = "http://jabberd.jabberstudio.org/ns/session/1.0"
CLIENT = "jabber:client"


class TappedSmStack(Jabberd2Stack):
    """A Jabberd2Stack whose sm `X` talks to the router through `taps[X]`."""

    def __init__(self, directory, router, **kwargs):
        self.taps = {}
        super().__init__(directory, router, **kwargs)

    def _make_sm(self, sm_id):
        tap = self.taps.get(sm_id)
        if tap is None:
            tap = self.taps[sm_id] = WireTap(self.router.ip, self.router.port)
        via = RouterAddress(tap.ip, tap.port, self.router.user, self.router.password,
                            self.router.pemfile)
        d = self.directory
        log, pidfile = d / ("sm-%s.log" % sm_id), d / ("sm-%s.pid" % sm_id)
        config = write_sm_config(d / ("sm-%s.xml" % sm_id), via, sm_id=sm_id,
                                 domains=(self.domain,), db_path=self.db_path,
                                 log_path=log, pidfile=pidfile, retry=self.retry)
        return SmProcess(config, d, sm_id, log)

    def restart_sm(self, sm_id, timeout=30.0):
        """Start a stopped sm again with the same id (and config, log and tap)."""
        if self.sms[sm_id].running():
            raise RuntimeError("sm %s still runs" % sm_id)
        sm = self.sms[sm_id] = self._make_sm(sm_id)
        return sm.start(timeout)

    def stop(self, timeout=5.0):
        codes = super().stop(timeout)
        for tap in self.taps.values():
            tap.stop()
        return codes

    # -- what the sms saw and did ------------------------------------------------

    def placed(self, bodies):
        """body -> ids of the sms the router handed a `<message>` with that `<body>`
        on a route addressed to the domain: placement's choice. (c2s hands the
        sender's own stanza to the sender's sm by its id; that one is not counted.)"""
        wanted = set(bodies)
        found = {b: set() for b in wanted}
        for sm_id, tap in self.taps.items():
            for conn in tap.connections:
                for _t, route in conn.elements(DOWN):
                    if route.tag != "{%s}route" % COMPONENT or route.get("to") != self.domain:
                        continue
                    for message in route.iter("{%s}message" % CLIENT):
                        body = message.findtext("{%s}body" % CLIENT)
                        if body in wanted:
                            found[body].add(sm_id)
        return found

    def offline(self, texts):
        """The texts of `texts` found in some stanza of the offline queues."""
        conn = sqlite3.connect(str(self.db_path), timeout=5)
        try:
            rows = [xml for (xml,) in conn.execute('SELECT xml FROM queue')]
        finally:
            conn.close()
        return {t for t in texts if any(t in xml for xml in rows)}

    def session_sm(self, full_jid):
        """The ids of the sms whose logs say a session of `full_jid` started."""
        return sorted(sm_id for sm_id, sm in self.sms.items() if re.search(
            r"session started: jid=%s$" % re.escape(full_jid), sm.log_text, re.M))

    def session_ended(self, full_jid):
        """True if some sm's log says the session of `full_jid` ended."""
        return any(re.search(r"session ended: jid=%s$" % re.escape(full_jid), sm.log_text, re.M)
                   for sm in self.sms.values())
