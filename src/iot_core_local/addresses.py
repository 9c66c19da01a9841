"""What a host given on the command line means: loopback only, every interface, or how a URL writes it.

Shared by the server (what endpoint.json tells clients), the control plane (whether signatures are
required off loopback) and `serve`'s own checks of `--advertise`.
"""

from __future__ import annotations

import ipaddress

__all__ = ["bracketed", "is_loopback", "is_wildcard"]


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach an address bound to `host` (0.0.0.0 and :: are not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def is_wildcard(host: str) -> bool:
    """True for an address that means "every interface": 0.0.0.0, ::, ::ffff:0.0.0.0, the empty string."""
    if not host:
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_unspecified or (mapped is not None and mapped.is_unspecified)


def bracketed(host: str) -> str:
    """`host` as a URL writes it: an IPv6 literal in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
