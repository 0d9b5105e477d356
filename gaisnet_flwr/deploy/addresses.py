"""Peer addresses: `host:port` checked, compared across spellings, and a listener's own
endpoints, so a chain cannot loop back to the peer that serves it. No torch, no gRPC: the
`gaisnet-peer` command line checks its flags with these before anything heavy loads."""

from __future__ import annotations

import contextlib
import ipaddress
import socket


def check_address(address: str, listen: bool = False) -> str:
    """`host:port` with a numeric port in 1..65535 (IPv6 hosts in brackets); a listening
    address may take port 0 (any free port)."""
    host, sep, port = address.rpartition(":")
    lowest = 0 if listen else 1
    if not sep or not host or not port.isdigit() or not lowest <= int(port) < 65536:
        raise ValueError(f"peer address {address!r} is not host:port (e.g. 192.168.1.20:50051)")
    return address


def endpoint(address: str) -> tuple[str, int]:
    """(host, port) of a checked address, the host lower-case and without IPv6 brackets: two
    spellings of one address compare equal (`[::1]:5` and `::1:5`, `Peer.lan:5`, `peer.lan:5`)."""
    host, _, port = check_address(address).rpartition(":")
    return host.strip("[]").lower(), int(port)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


WILDCARDS = ("0.0.0.0", "::", "")


def own_endpoints(listen: str, port: int) -> set[tuple[str, int]]:
    """The (host, port) pairs that reach a peer listening on `listen` at `port`: its host, and
    for a wildcard or loopback listener also localhost; a wildcard one also by this machine's
    host name and its addresses (best effort: what `getaddrinfo` knows)."""
    host = listen.rpartition(":")[0].strip("[]").lower()
    hosts = {host}
    if host in WILDCARDS or _loopback(host):
        hosts |= {"localhost", "127.0.0.1", "::1"}
    if host in WILDCARDS:
        with contextlib.suppress(OSError):
            name = socket.gethostname().lower()
            hosts |= {name} | {str(i[4][0]).lower() for i in socket.getaddrinfo(name, None)}
    return {(h, port) for h in hosts}


def loops_back(address: str, own: set[tuple[str, int]]) -> bool:
    """Whether `address` is one of `own`. Any loopback address on a loopback listener's port
    counts as itself (a wildcard listener answers on all of them; refusing a 127.0.0.2 that
    might not reach it costs nothing, since no other peer can listen there on that port)."""
    host, port = endpoint(address)
    if (host, port) in own:
        return True
    return _loopback(host) and any(p == port and _loopback(h) for h, p in own)
