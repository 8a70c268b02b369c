"""Client addresses as the per-address limits of the API and realtime count them."""

from __future__ import annotations

import ipaddress


def address_key(address: str | None) -> str:
    """The key of a client address: the address itself, or its /64 network for IPv6.

    One IPv6 host (a home, a VM) is given a whole /64 and can pick a new address in it for every attempt,
    so counting each address would give it an unlimited number of budgets. IPv4 addresses, also when
    written as IPv4-mapped IPv6, count one by one; a peer that is no IP address keeps its name.
    """
    if not address:
        return "unknown"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
