"""routing.placement: routing and /placement take the same decision.

Hypothesis builds a cluster (policy, members joining and leaving, with and
without instance identities) and JIDs; each JID's packet is routed through
the in-memory router, and the member that received it must be the one
``Router.member_for`` names (when that answer is fixed, i.e. not random).
"""

from hypothesis import given, settings
from hypothesis import strategies as st

from jrouter.routing.policy import ClusterPolicy, PolicyTable

from .harness import Network

NAME = "example.com"

policies = st.one_of(
    st.just(None),                                        # no <clustering>: jabberd2 exactly
    st.builds(ClusterPolicy, match=st.just(NAME), key=st.sampled_from([None, "to", "from"]),
              address=st.sampled_from(["bare", "full"]), algorithm=st.just("jabberd2"),
              nodeless=st.sampled_from(["random", "hash"])),
    st.builds(ClusterPolicy, match=st.just(NAME), key=st.sampled_from([None, "to", "from"]),
              address=st.sampled_from(["bare", "full"]),
              algorithm=st.just("consistent"), nodeless=st.sampled_from(["random", "hash"]),
              dead=st.sampled_from(["failover", "bounce", "hold"])),
    st.builds(ClusterPolicy, match=st.just(NAME), key=st.sampled_from([None, "to", "from"]),
              algorithm=st.just("slots"), slots=st.integers(1, 6),
              nodeless=st.sampled_from(["random", "hash"]),
              dead=st.sampled_from(["failover", "bounce", "hold"])),
)
jids = st.builds(lambda node, domain, resource: f"{node}{domain}{resource}",
                 st.sampled_from(["", "alice@", "bob@", "Carol@", "u1@", "u2@", "u3@", "zed@"]),
                 st.sampled_from(["example.com", "other.test", "muc.example.com"]),
                 st.sampled_from(["", "/phone", "/laptop"]))
# A cluster's history: members join (with an identity or none) and some leave.
histories = st.lists(st.tuples(st.sampled_from(["join", "leave"]), st.integers(0, 5),
                               st.booleans()), min_size=1, max_size=12)


def network(policy):
    if policy is None:
        return Network()
    return Network(clustering=PolicyTable([policy]))


def build_cluster(net, history):
    """Members of NAME after ``history``; each joins as an sm does (its own id
    first when it has an identity, then NAME with multi)."""
    live = {}
    for action, index, with_identity in history:
        if action == "join" and index not in live:
            peer = net.component()
            if with_identity:
                peer.bind(f"sm{index}")
            peer.bind(NAME, multi="to")
            peer.take()
            route = net.router.table.routes.get(NAME)
            if route is not None and peer.connection in route.members:
                live[index] = peer
            else:
                peer.hang_up()          # a slot policy with no slot left refused it
        elif action == "leave" and index in live:
            live.pop(index).hang_up()
    return live


def routes(peer):
    return [s for s in peer.stanzas() if s.tag.endswith("}route")]


@settings(max_examples=150, deadline=None)
@given(policy=policies, history=histories, addresses=st.lists(jids, min_size=1, max_size=8))
def test_routing_and_placement_agree(policy, history, addresses):
    """For random policies, members and JIDs, the member /placement names is the one that gets the packet."""
    net = network(policy)
    live = build_cluster(net, history)
    c2s = net.component("c2s")
    key_from = policy is not None and policy.key == "from"
    for jid in addresses:
        named = net.router.member_for(NAME, jid)
        stanza = (f"<message from='{jid}' to='x@example.com'/>" if key_from
                  else f"<message to='{jid}' from='x@c2s'/>")
        c2s.send(f"<route to='{NAME}' from='c2s'>{stanza}</route>")
        got = [peer.connection for peer in live.values() if routes(peer)]
        c2s.take()
        assert len(got) <= 1
        if named is not None:
            assert got == [named], (jid, policy)
        elif not live:
            assert got == []
