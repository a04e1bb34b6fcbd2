"""Every gRPC channel and server option in one place: message sizes, keepalive, TLS, tokens."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import ssl
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures

import grpc
import torch

from .addresses import is_unix_socket
from .options import ClientOptions, ServerOptions

__all__ = [
    "AUTH_METADATA_KEY",
    "SESSION_METADATA_KEY",
    "bulk_client_tls",
    "bulk_server_tls",
    "create_channel",
    "create_server",
    "fits_unary",
]

log = logging.getLogger(__name__)

SESSION_METADATA_KEY = "ra-session"
AUTH_METADATA_KEY = "authorization"
# One gRPC message carries at most a stream chunk or a unary frame plus protobuf framing;
# the codec's own limits bound the frame as a whole.
_MESSAGE_SLACK = 64 << 10


def _message_options(max_receive: int, max_send: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_send),
        ("grpc.max_receive_message_length", max_receive),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        # The server must accept the clients' keepalive pings (every 30 s, also while idle);
        # gRPC's default (one per 5 minutes) answers them with GOAWAY "too_many_pings".
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 20_000),
    ]


def max_message_bytes(unary_payload_bytes: int, stream_chunk_bytes: int) -> int:
    return max(unary_payload_bytes, stream_chunk_bytes) + _MESSAGE_SLACK


def fits_unary(frame_bytes: int, unary_payload_bytes: int) -> bool:
    """Whether a frame goes in one message: the limit is on tensor payload, and the frame's
    own header rides in the slack (a 1 MiB tensor must not be streamed for 130 bytes)."""
    return frame_bytes <= unary_payload_bytes + _MESSAGE_SLACK // 2


def create_channel(address: str, options: ClientOptions) -> grpc.Channel:
    """A channel to a trunk server; TLS when the options carry root certificates."""
    # Replies to unary calls may be a whole frame; what the client sends is bounded by the
    # server (one unary frame or one stream chunk per message).
    largest = options.limits.max_payload_bytes + _MESSAGE_SLACK
    channel_options = [
        *_message_options(largest, largest),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2_000),
        ("grpc.enable_retries", 0),  # the client retries where it is safe, not gRPC
        # Connections of this channel alone: gRPC otherwise shares them between channels to
        # one address, and a refused attempt of an earlier channel (a server since restarted
        # on that port) would make this one's handshake fail fast while in reconnect backoff.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if options.root_certificates is not None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=options.root_certificates,
            private_key=options.private_key,
            certificate_chain=options.certificate_chain,
        )
        return grpc.secure_channel(address, credentials, options=channel_options)
    return grpc.insecure_channel(address, options=channel_options)


def is_loopback(address: str) -> bool:
    if is_unix_socket(address):  # reachable from this machine only, as loopback is
        return True
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def torch_threads() -> None:
    """Run in each new worker thread: torch sets a thread's intra-op thread count (OpenMP's)
    on its first parallel op, and oneDNN's kernels (convolutions) do not ask; without this, a
    worker thread ran them with one thread per core whatever ``torch.set_num_threads`` said:
    other summation orders than the same module run in the caller's thread, and more threads
    than the cores the process was given."""
    torch.set_num_threads(torch.get_num_threads())


def create_server(
    address: str,
    options: ServerOptions,
    *,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> tuple[grpc.Server, int]:
    """A gRPC server bound to ``address``; returns it with the bound port."""
    max_message = max_message_bytes(options.unary_payload_bytes, options.stream_chunk_bytes)
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=options.max_workers,
            thread_name_prefix="remote-autograd",
            initializer=torch_threads,
        ),
        interceptors=list(interceptors),
        # A small request can produce a large output: a unary reply may be up to a whole
        # frame (the client switches that method to streams once it has seen one).
        options=[
            *_message_options(max_message, options.limits.max_payload_bytes + _MESSAGE_SLACK),
            ("grpc.so_reuseport", 0),
        ],
    )
    if options.certificate_chain is not None:
        if options.private_key is None:
            raise ValueError("ServerOptions.certificate_chain needs private_key too")
        credentials = grpc.ssl_server_credentials(
            [(options.private_key, options.certificate_chain)],
            root_certificates=options.client_ca,
            require_client_auth=options.client_ca is not None,
        )
        port = _bound(address, lambda: server.add_secure_port(address, credentials))
    else:
        if not is_loopback(address):
            if not options.insecure:
                raise ValueError(
                    f"refusing to serve plain text on {address}: it is not a loopback address. "
                    "Give a certificate and key (TLS), or pass insecure=True (--insecure) "
                    "on a network you trust."
                )
            log.warning(
                "serving PLAIN TEXT on %s (--insecure): anyone on the network can read and send",
                address,
            )
        port = _bound(address, lambda: server.add_insecure_port(address))
    return server, port


def _bound(address: str, add_port: Callable[[], int]) -> int:
    """The port gRPC bound, or an OSError that names the address (gRPC raises a
    RuntimeError, or returns 0, for a port another process holds)."""
    try:
        port = add_port()
    except RuntimeError as exc:
        port, reason = 0, f": {exc}"
    else:
        reason = ""
    if port == 0:
        raise OSError(f"could not bind {address} (is the port in use?){reason}")
    return int(port)


# -- TLS of the bulk channel (bulk.py): the same certificates as the gRPC port -----------------


def bulk_server_tls(options: ServerOptions) -> ssl.SSLContext | None:
    """The bulk port's TLS: the gRPC port's certificate and key, and under mutual TLS the
    same client CA, a client certificate required. None for a plain-text server."""
    if options.certificate_chain is None:
        return None
    if options.private_key is None:
        raise ValueError("ServerOptions.certificate_chain needs private_key too")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.num_tickets = 0  # every connection is a full handshake: no session resumption
    _load_cert_chain(context, options.certificate_chain, options.private_key, "ServerOptions")
    if options.client_ca is not None:
        context.load_verify_locations(cadata=options.client_ca.decode("ascii"))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def bulk_client_tls(options: ClientOptions) -> ssl.SSLContext | None:
    """The client's side of it: the roots (and client certificate) of its gRPC channel, the
    server's host name checked. None where the gRPC channel is plain text."""
    if options.root_certificates is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cadata=options.root_certificates.decode("ascii"))
    if options.certificate_chain is not None:
        if options.private_key is None:
            raise ValueError("ClientOptions.certificate_chain needs private_key too")
        _load_cert_chain(context, options.certificate_chain, options.private_key, "ClientOptions")
    return context


# Handshake failures that say the port does not speak TLS (OpenSSL's reasons).
_NOT_TLS = frozenset(
    {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"}
)


def tls_refusal(
    address: str, context: ssl.SSLContext, timeout: float = 3.0
) -> tuple[str, str] | None:
    """Why a TLS handshake with the gRPC port at ``host:port`` fails for certain, as (kind,
    text), or None. gRPC reports such a handshake as a server that is down and retries it;
    one handshake of our own names the cause. Certain: this side's check of the server's
    certificate fails, or the server's alert names a certificate ("certificate"); the port
    answers in something other than TLS ("plain"). A bare close is not certain (a TLS proxy
    whose backend is not up yet closes so too): None."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        context.set_alpn_protocols(["h2"])  # what a gRPC server expects
        with (
            socket.create_connection((host, int(port)), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as sock,
        ):
            sock.settimeout(0.5)  # a server that took us waits for the HTTP/2 preface
            sock.recv(1)  # the server's alert, if it refused us
    except ssl.SSLCertVerificationError as exc:
        return "certificate", str(exc)
    except ssl.SSLError as exc:  # an alert naming a certificate is certain, a close is not
        text = str(exc)
        if "certificate" in text.lower() or "unknown ca" in text.lower():
            return "certificate", text
        return ("plain", text) if exc.reason in _NOT_TLS else None
    except (OSError, ValueError):
        return None
    return None


def _load_cert_chain(context: ssl.SSLContext, chain: bytes, key: bytes, owner: str) -> None:
    """``load_cert_chain`` from PEM bytes: the ssl module reads only files, so the key goes
    to an anonymous in-memory file where the system has one (Linux), else to a 0600 file in
    a 0700 directory, deleted as soon as it is read."""
    try:
        with _pem_file(chain) as chain_path, _pem_file(key) as key_path:
            context.load_cert_chain(chain_path, key_path)
    except ssl.SSLError as exc:
        raise ValueError(
            f"{owner}.certificate_chain / private_key: expected a PEM certificate and the PEM "
            f"key that matches it, the ssl module says: {exc}"
        ) from exc


@contextlib.contextmanager
def _pem_file(data: bytes) -> Iterator[str]:
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("remote-autograd-pem", os.MFD_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="remote-autograd-") as directory:  # mode 0700
        path = os.path.join(directory, "pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        yield path
