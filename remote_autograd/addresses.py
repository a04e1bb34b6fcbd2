"""What a trunk server's address may be, and what a failure to reach one means.

An address is what ``grpc.insecure_channel`` takes: ``host:port``, ``[ipv6]:port``, or a gRPC
target URI (``dns:///host:port``, ``ipv4:...``, ``ipv6:...``, ``unix:path``,
``unix-abstract:name``). A malformed one is refused when the client is created, not after the
first call has waited out its ``connect_timeout``.
"""

from __future__ import annotations

import os
import socket

__all__ = [
    "accepts_connections",
    "bulk_host",
    "check_address",
    "refuse_a_taken_socket",
    "is_unix_socket",
    "unreachable_reason",
]

_GRPC_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")
_URL_SCHEMES = ("http://", "https://", "grpc://", "grpcs://", "tcp://")


def check_address(address: object, *, listen: bool = False) -> str:
    """``address`` if it is a usable trunk address; a ValueError that says why otherwise.
    ``listen``: one a server binds, where port 0 asks for any free port."""
    if not isinstance(address, str):
        raise ValueError(f"a trunk address is a 'host:port' string, got {type(address).__name__}")
    text = address.strip()
    if not text:
        raise ValueError("the trunk address is empty: give 'host:port', e.g. '127.0.0.1:50051'")
    lowered = text.lower()
    for scheme in _URL_SCHEMES:
        if lowered.startswith(scheme):
            rest = text[len(scheme) :].rstrip("/")
            raise ValueError(
                f"trunk address {address!r}: gRPC takes 'host:port', not a URL; "
                f"drop the {scheme!r} (e.g. {rest!r}); TLS is chosen by "
                "ClientOptions.root_certificates"
            )
    if lowered.startswith(_GRPC_SCHEMES):
        if lowered.startswith("dns:"):
            _check_host_port(
                text.split(":", 1)[1].lstrip("/").split("/", 1)[-1], address, 0 if listen else 1
            )
        return text
    _check_host_port(text, address, 0 if listen else 1)
    return text


_UNIX_SOCKETS = ("unix:", "unix-abstract:")  # gRPC's Unix domain socket addresses


def is_unix_socket(address: str) -> bool:
    """A Unix domain socket: reachable from this machine only (its file's permissions)."""
    return address.lower().startswith(_UNIX_SOCKETS)


def refuse_a_taken_socket(address: str) -> None:
    """Refuse to listen on a Unix socket another server answers on: gRPC would silently
    take its path over (a TCP port in use is refused). A file nobody answers on is a stale
    one, which gRPC replaces."""
    if not address.lower().startswith("unix:"):
        return
    path = address[len("unix:") :]
    path = "/" + path.lstrip("/") if path.startswith("//") else path
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        return
    finally:
        probe.close()
    raise OSError(f"cannot serve on {address!r}: another server listens on that socket")


def bulk_host(address: str) -> str | None:
    """The host of a checked address, where its bulk channel is reached (the port comes from
    the server): ``host:port``, ``[ipv6]:port``, ``dns:///host:port``, ``ipv4:a.b.c.d:port``
    (the first of a list), ``ipv6:[addr]:port`` (or without the port). None for a socket that
    is not TCP (``unix:``, ``unix-abstract:``, ``vsock:``): no bulk channel then."""
    lowered = address.lower()
    if lowered.startswith((*_UNIX_SOCKETS, "vsock:")):
        return None
    if lowered.startswith("dns:"):
        target = address[4:].lstrip("/").rsplit("/", 1)[-1]
    elif lowered.startswith(("ipv4:", "ipv6:")):
        target = address[5:].lstrip("/").split(",", 1)[0]
    else:
        target = address
    if target.startswith("["):  # [ipv6] or [ipv6]:port
        return target[1:].partition("]")[0]
    if target.count(":") > 1:  # a bare IPv6 address (ipv6: without a port)
        return target
    return target.partition(":")[0]


def _check_host_port(text: str, address: str, lowest: int = 1) -> None:
    if text.startswith("["):  # [ipv6]:port
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            raise ValueError(
                f"trunk address {address!r}: an IPv6 address goes in brackets: '[{host}]:{port}'"
            )
    if not sep or not host:
        raise ValueError(
            f"trunk address {address!r} names no port: give 'host:port', "
            f"e.g. '{text.strip('[]') or '127.0.0.1'}:50051'"
        )
    if not port.isdigit() or not lowest <= int(port) <= 65535:
        raise ValueError(
            f"trunk address {address!r}: the port must be a number from {lowest} to 65535"
            + (" (0: any free port)" if lowest == 0 else "")
            + f", got {port!r}"
        )


def unreachable_reason(details: str) -> str | None:
    """Why a server cannot be reached, when gRPC's error says it for certain (nobody listens
    on the port, the host name does not resolve): such a failure is not waited out."""
    lowered = details.lower()
    if "connection refused" in lowered:
        return "the connection was refused: nothing listens on that port"
    if "errors resolving" in lowered or "dns resolution failed" in lowered:
        return "the host name does not resolve"
    return None


def accepts_connections(address: str, timeout: float = 1.0) -> bool | None:
    """Whether something accepts TCP connections at a ``host:port`` address right now (None
    for the other gRPC target forms). gRPC reports the last failure of a connection that it
    shares between channels and retries with backoff, so a server started on a port that
    refused a moment ago can still read as refused: the operating system has the last word."""
    if address.startswith(_GRPC_SCHEMES):
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False
