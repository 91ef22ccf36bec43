"""``jrouter-status``: the status endpoint's figures, printed for a person.

Owns: finding the endpoint (``--url``, or the ``<status>`` section of
router.xml), fetching ``/status`` or ``/placement`` and laying the answer out
as aligned tables. Must not know how the figures are made: it reads only what
the endpoint serves, so it works against any running router of this version.

Exit codes: 0 printed, 1 the endpoint is off or unreachable (with a message
saying which), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Optional, Sequence

from jrouter.config import DEFAULT_CONFIG_FILE, XMLProblem, parse_status, parse_xml
from jrouter.errors import JrouterError
from jrouter.wire.counters import FIELDS

TIMEOUT = 5.0

USAGE = "jrouter-status [--url URL | -c router.xml] [--json] [--placement NAME JID]"


class Failure(JrouterError):
    """Something a person must fix; the message says what."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="jrouter-status", usage=USAGE,
        description="Show what a running jrouter is doing, from its status endpoint "
                    "(<status> in router.xml).")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="the endpoint, e.g. http://127.0.0.1:5380")
    where.add_argument("-c", dest="config", metavar="router.xml",
                       help=f"read the endpoint's address from this file (default {DEFAULT_CONFIG_FILE})")
    parser.add_argument("--json", action="store_true", help="print the raw JSON answer")
    parser.add_argument("--placement", nargs=2, metavar=("NAME", "JID"),
                        help="which member of the clustered NAME serves JID")
    args = parser.parse_args(argv)
    try:
        base = _base_url(args.url) if args.url else _url_from_config(args.config or DEFAULT_CONFIG_FILE)
        if args.placement:
            name, jid = args.placement
            query = urllib.parse.urlencode({"name": name, "jid": jid})
            data = fetch(f"{base}/placement?{query}", accept_codes=(400, 404))
            text = json.dumps(data, indent=1) if args.json else format_placement(data)
        else:
            data = fetch(f"{base}/status")
            text = json.dumps(data, indent=1) if args.json else format_status(data, base)
    except Failure as exc:
        print(f"jrouter-status: {exc}", file=sys.stderr)
        return 1
    print(text)
    return 0


# ---------------------------------------------------------------------------
# Finding and asking the endpoint.


def _base_url(url: str) -> str:
    url = url.rstrip("/")
    if "://" not in url:
        url = "http://" + url
    for suffix in ("/status", "/metrics", "/placement"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    return url


def _url_from_config(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise Failure(f"couldn't open {path}: {exc.strerror} (use -c FILE or --url URL)") from None
    try:
        root = parse_xml(data)
    except XMLProblem as exc:
        raise Failure(f"{path}:{exc.line}: parse error: {exc.message}") from None
    element = next((c for c in root.iterchildren() if isinstance(c.tag, str) and c.tag == "status"), None)
    settings, problems = parse_status(element, path)
    if problems:
        raise Failure("\n".join(problems))
    if settings is None:
        raise Failure(f"the status endpoint is off in {path}; turn it on with "
                      "<status><ip>127.0.0.1</ip><port>5380</port></status> and restart the router")
    ip = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(settings.ip, settings.ip)
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{settings.port}"


def fetch(url: str, accept_codes: Sequence[int] = ()) -> Any:
    """GET ``url`` and decode its JSON; raise Failure with a reason a person can act on."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    # No proxies: the endpoint is on this host, and an http_proxy from the
    # environment would send the request elsewhere.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=TIMEOUT) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        if exc.code not in accept_codes:
            raise Failure(f"{url} answered {exc.code} {exc.reason}") from None
        body = exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Failure(f"cannot reach the status endpoint at {url}: {reason} "
                      "(is the router running, with <status> in its router.xml?)") from None
    try:
        return json.loads(body)
    except ValueError:
        raise Failure(f"{url} did not answer JSON; is that a jrouter status endpoint?") from None


# ---------------------------------------------------------------------------
# Laying it out.


def format_status(data: dict, source: str = "") -> str:
    """The whole snapshot as text: a summary line, then connections and names."""
    totals = data["totals"]
    lines = [f"jrouter status{' from ' + source if source else ''}"
             + (f", up {duration(data['uptime'])}" if data.get("uptime") is not None else "")]
    lines.append(f"{data['connection_count']} connections, {data['name_count']} names, "
                 f"default route: {data.get('default_route') or 'none'}")
    lines.append("")
    lines.append("Totals (closed connections included)")
    lines.extend(table(["PKTS IN", "PKTS OUT", "BYTES IN", "BYTES OUT", "BOUNCES", "DROPS", "THROTTLED"],
                       [_counter_cells(totals)], right=range(7)))
    lines.append("")
    lines.append("Connections")
    rows = []
    for conn in data["connections"]:
        flags = ["legacy"] if conn["legacy"] else []
        if conn["throttling"]:
            flags.append(f"throttling({conn['throttle_queue']} held)")
        rows.append([conn["label"], conn["state"], conn["user"] or "-", ",".join(conn["names"]) or "-",
                     *_counter_cells(conn["counters"]), size(conn["queued_bytes"]),
                     duration(conn.get("connected_for")), " ".join(flags)])
    if rows:
        lines.extend(table(["CONNECTION", "STATE", "USER", "NAMES", "PKTS IN", "PKTS OUT", "BYTES IN",
                            "BYTES OUT", "BOUNCES", "DROPS", "THROTTLED", "QUEUED", "UP", ""],
                           rows, right=range(4, 13)))
    else:
        lines.append("  (none)")
    lines.append("")
    lines.append("Names")
    rows = []
    for entry in sorted(data["names"], key=lambda e: e["name"]):
        flags = [f for f, on in (("default", entry["default"]), ("log", entry["log_sink"])) if on]
        if entry.get("alias_of"):
            flags.append(f"alias of {entry['alias_of']}")
        rows.append([entry["name"], entry["kind"], str(len(entry["members"])),
                     *_counter_cells(entry["counters"]), " ".join(flags)])
        if len(entry["members"]) > 1:       # a cluster: show who is in which slot
            rows.extend([f"  {index}: {label}", "", "", *[""] * len(FIELDS), ""]
                        for index, label in enumerate(entry["members"]))
    if rows:
        lines.extend(table(["NAME", "KIND", "MEMBERS", "PKTS IN", "PKTS OUT", "BYTES IN", "BYTES OUT",
                            "BOUNCES", "DROPS", "THROTTLED", ""], rows, right=range(2, 10)))
    else:
        lines.append("  (none)")
    if data.get("cluster"):
        lines.extend(_cluster_lines(data["cluster"]))
    return "\n".join(line.rstrip() for line in lines)


def _cluster_lines(cluster: dict) -> list[str]:
    """The node set and the links of one node of several (<cluster>)."""
    lines = ["", f"Cluster {cluster['cluster']}: node {cluster['node']}, {cluster['state']}, "
                 f"table at revision {cluster['revision']}, {cluster['remote_members']} members on "
                 f"other nodes, {cluster['forwarded_in']} routes forwarded here, "
                 f"{cluster['dropped']} dropped"]
    rows = []
    for node in sorted(cluster["nodes"], key=lambda n: n["id"]):
        if node["self"]:
            rows.append([node["id"], node["address"], "this node", "", "", "", ""])
            continue
        held = cluster["held_for_nodes"].get(node["id"], 0)
        rows.append([node["id"], node["address"], "linked" if node["linked"] else "NOT LINKED",
                     str(node.get("packets_out", "-")), str(node.get("packets_in", "-")),
                     size(node["queued_bytes"]) if "queued_bytes" in node else "-", str(held)])
    lines.extend(table(["NODE", "ADDRESS", "LINK", "PKTS OUT", "PKTS IN", "QUEUED", "HELD"], rows,
                       right=range(3, 7)))
    return lines


def format_placement(data: dict) -> str:
    """One ``/placement`` answer as a sentence or two."""
    if data.get("member") is not None:
        where = f"member {data['index']} of {len(data['members'])}" if data.get("index") is not None \
            else f"via the default route {data.get('default_route')}"
        why = f"; {data['reason']}" if data.get("reason") else ""
        return f"{data['jid']} on {data['name']} is served by {data['member']} ({where}{why})"
    text = data.get("error") or data.get("note") or "no member"
    lines = [f"{data['jid']} on {data['name']}: {text}"]
    for index, label in enumerate(data.get("members") or []):
        lines.append(f"  {index}: {label}")
    return "\n".join(lines)


def _counter_cells(counters: dict) -> list[str]:
    return [size(counters[f]) if f.startswith("bytes") else str(counters[f]) for f in FIELDS]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Any = ()) -> list[str]:
    """Aligned columns, two spaces apart, indented by two; ``right`` lists
    the columns aligned right (numbers)."""
    right = set(right)
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  " + "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                                for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(headers), *(line(row) for row in rows)]


def size(count: int) -> str:
    """Bytes for a person: 999 B, 1.5 KiB, 12.0 MiB."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def duration(seconds: Optional[float]) -> str:
    """Seconds for a person: 45s, 12m05s, 3h07m, 2d04h."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


if __name__ == "__main__":
    sys.exit(main())
