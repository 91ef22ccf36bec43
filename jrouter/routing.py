"""The route table: which connections serve which names.

Owns the names -> members mapping, the one default route and the log sinks.
Membership follows jabberd2 exactly (spec 6.2): members are kept in bind
order, the route's kind is fixed by its first binder, and removing a member
moves the last member into its slot (swap-remove), because jabberd2's
cluster placement (``balance.jabberd2_pick``) depends on that order.

It must not know about sockets, XML or how a member is chosen for a packet.
"""

SINGLE = "single"
MULTI_TO = "multi-to"          # jabberd2 components bound with multi: hash the stanza 'to'
MULTI_FROM = "multi-from"      # XEP-0114 components: hash the stanza 'from'


class Route:
    """One routable name and the connections bound to it."""

    __slots__ = ("name", "kind", "members", "alias_of")

    def __init__(self, name, kind, alias_of=None):
        self.name = name
        self.kind = kind
        self.members = []
        self.alias_of = alias_of

    def __repr__(self):
        return f"Route({self.name!r}, {self.kind}, {len(self.members)} members)"


class RouteTable:
    """Names to routes, plus the default route and the log sinks."""

    def __init__(self):
        self.routes = {}
        self.default_name = None
        self.log_sinks = {}         # name -> connection

    def get(self, name):
        return self.routes.get(name)

    def __contains__(self, name):
        return name in self.routes

    def names(self):
        return self.routes.keys()

    def add(self, name, connection, kind, alias_of=None):
        """Append ``connection`` to ``name``'s members; return (route, mixed)
        where ``mixed`` says the route already had another kind."""
        route = self.routes.get(name)
        mixed = False
        if route is None:
            route = self.routes[name] = Route(name, kind, alias_of)
        elif route.kind != kind:
            mixed = True
        route.members.append(connection)
        return route, mixed

    def remove(self, name, connection):
        """Take ``connection`` out of ``name``; return how many members remain."""
        route = self.routes.get(name)
        if route is None or connection not in route.members:
            return len(route.members) if route else 0
        members = route.members
        index = members.index(connection)
        last = members.pop()
        if index < len(members):
            members[index] = last
        if not members:
            del self.routes[name]
            return 0
        return len(members)
