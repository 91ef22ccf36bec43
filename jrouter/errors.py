"""The errors jrouter raises on purpose: one small tree with one root.

    JrouterError
      ConfigurationError  a file or setting the router cannot use
                          (router.xml, router-filter.xml, a clustering policy)
      ProtocolError       a peer broke its protocol (a fatal stream problem, SASL)
      ListenError         the router cannot listen where it was told
      MembershipError     a clustered name cannot take this member now
      ConnectionClosed    a stream is over: send what is queued, then close

Stanza problems are not errors: they become bounces (protocol §4.5). Two
private exceptions (``filter._Never``, ``sasl._Reject``) are control flow
inside one function and stay outside the tree.
"""


class JrouterError(Exception):
    """Root of every error jrouter raises on purpose."""


class ConfigurationError(JrouterError):
    """A configuration file or setting that cannot be used."""


class ProtocolError(JrouterError):
    """A peer broke the rules of its protocol."""


class ListenError(JrouterError):
    """Cannot listen on the configured address; the message is the log line."""


class MembershipError(JrouterError):
    """A clustered name cannot take a member now (its slot is live, or all are)."""


class ConnectionClosed(JrouterError):
    """The stream is over; what is queued must be sent, then the socket closed."""
