"""The Host header check of the servers the job runs (the dashboard, the Prometheus exporter): a
defence against DNS rebinding, where a web page makes the browser of someone on this machine send
requests to a loopback service under a name the attacker controls.

Contract: `allowed(bind, extra)` is the set of host names a server bound to `bind` answers to:
the bound address itself; for a loopback bind also `localhost`, `127.0.0.1` and `::1`; for a
wildcard bind (`0.0.0.0`, `::`) this machine's name and addresses; plus `extra` (`--allow-host`,
`anomaly.prometheus_allow_hosts`: the names a proxy or a tunnel uses). `check(header, names)` is
None when the request's Host header (port ignored, case-insensitive) names one of them, else the
message for a 400 answer, which says how to allow the name (`allow_with`) and never lists the
names it answers to.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

import psutil

LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD = frozenset({"", "0.0.0.0", "::"})


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _this_machine() -> set[str]:
    names = {socket.gethostname().lower(), socket.getfqdn().lower()}
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                names.add(a.address.split("%")[0].lower())
    return names


def allowed(bind: str, extra: Iterable[str] = ()) -> frozenset[str]:
    bind = bind.strip("[]").lower()
    names = {e.strip().lower() for e in extra if e.strip()}
    if bind not in WILDCARD:
        names.add(bind)
    if _is_loopback(bind):
        names |= LOOPBACK
    if bind in WILDCARD:
        names |= LOOPBACK | _this_machine()
    return frozenset(names)


def host_of(header: str) -> str:
    """The host of a Host header, without its port (`[::1]:8266` -> `::1`)."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h[1:]
    if h.count(":") == 1:
        return h.split(":", 1)[0]
    return h


def check(
    header: str | None, names: frozenset[str], allow_with: str = "--allow-host NAME"
) -> str | None:
    if header and host_of(header) in names:
        return None
    given = host_of(header)[:100] if header else "(none)"
    # the names it does answer to are not listed: they would tell a rebinding page this
    # machine's addresses
    return (
        f"Host {given!r} is not a name this server answers to: a page elsewhere may be reaching "
        f"it through your browser. To reach it by that name (a proxy, a tunnel), allow it with "
        f"{allow_with}"
    )
