"""jrouter.errors: every error jrouter raises on purpose has one root, and the tree says what kind it is."""

import pytest

from jrouter import errors
from jrouter.routing.balance import SlotBusy, SlotsFull
from jrouter.wire.connection import ConnectionClosed
from jrouter.config import ConfigError, XMLProblem
from jrouter.config.filter_xml import FilterError
from jrouter.routing.policy import PolicyError
from jrouter.wire.sasl import SaslEncodingError, SaslError, SaslStateError
from jrouter.ops.server import ListenError
from jrouter.ops.status import StatusListenError
from jrouter.ops.status_cli import Failure
from jrouter.wire.xmlstream import StreamError


@pytest.mark.parametrize("error, kind", [
    (ConfigError, errors.ConfigurationError), (XMLProblem, errors.ConfigurationError),
    (FilterError, errors.ConfigurationError), (PolicyError, errors.ConfigurationError),
    (StreamError, errors.ProtocolError), (SaslError, errors.ProtocolError),
    (SaslEncodingError, errors.ProtocolError),
    (ListenError, errors.ListenError), (StatusListenError, errors.ListenError),
    (SlotBusy, errors.MembershipError), (SlotsFull, errors.MembershipError),
    (ConnectionClosed, errors.ConnectionClosed),
    (SaslStateError, errors.JrouterError), (Failure, errors.JrouterError),
])
def test_each_error_sits_in_the_tree(error, kind):
    """Each public error class is the kind of JrouterError the tree says."""
    assert issubclass(error, kind) and issubclass(kind, errors.JrouterError)


def test_value_errors_stay_value_errors():
    """Callers that catch ValueError for a bad value still do (a policy, SASL input, a slot)."""
    for error in (PolicyError, SaslError, SlotBusy, SlotsFull):
        assert issubclass(error, ValueError)
