"""Option dataclasses: every knob of the client and the server, with its safe default.

Nothing here reads the environment; pass options explicitly.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

__all__ = ["ClientOptions", "Limits", "ServerOptions"]

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Limits:
    """What one peer accepts from the other. Every violation is refused before allocating."""

    max_payload_bytes: int = 1 * GiB  # bytes of one call's frame (all tensors + values)
    max_tensor_bytes: int = 512 * MiB  # decoded bytes of one tensor
    max_tensor_elements: int = 1 << 30  # elements of one tensor
    max_tensors: int = 1024  # tensors in one call
    max_ndim: int = 16  # dimensions of one tensor
    max_header_bytes: int = 1 * MiB  # msgpack header + plain values of one frame (unpacking
    # plain values can take ~50x their wire size in Python objects, so keep this small)
    max_decoded_bytes: int = 2 * GiB  # decoded bytes of all tensors of one frame together
    # (LZ4 and dequantization make them larger than the frame; checked before decoding any)
    max_depth: int = 32  # nesting of lists, tuples and maps in one frame's values (decoding
    # and walking the tree recurse once per level)


@dataclass(frozen=True)
class ClientOptions:
    """How a RemoteModule talks to its server."""

    def __post_init__(self) -> None:
        if isinstance(self.micro_batches, bool) or not isinstance(self.micro_batches, int):
            raise ValueError(
                f"ClientOptions.micro_batches must be an int, got {self.micro_batches!r}"
            )
        if self.micro_batches < 1:
            raise ValueError(f"ClientOptions.micro_batches must be >= 1, got {self.micro_batches}")
        _check_bounds(self, _CLIENT_BOUNDS, flags=False)

    timeout: float = 300.0  # deadline of a Compute/Backward/Step call, seconds
    connect_timeout: float = 30.0  # wait this long for the server to come up on first use
    retries: int = 3  # extra attempts of a call that is safe to repeat (UNAVAILABLE only)
    retry_backoff: float = 0.2  # first wait between attempts, seconds; doubles each time
    retry_backoff_max: float = 5.0  # longest wait between two attempts, seconds
    recover_contexts: bool = True  # a Backward whose forward context the server lost (restart,
    # expiry, eviction) resends the saved inputs so the server recomputes the forward
    seed: int | None = None  # seed of the trunk's per-forward RNG (dropout); None: random.
    # With a seed, a whole split run is reproducible and recomputed forwards match exactly
    # (with micro_batches > 1 up to float rounding: slices' gradients add in arrival order)
    compression: str = "auto"  # "auto" (LZ4 where a sample says it pays), "lz4" or "none"
    activation_quantization: str = "none"  # wire codec of forward tensors: none|bf16|fp16|int8
    gradient_quantization: str = "none"  # wire codec of backward tensors: none|bf16|fp16|int8
    micro_batches: int = 1  # >1: each Compute/Backward goes as this many slices of the batch
    # in flight at once, so wire and trunk overlap (only for trunks treating samples apart)
    bulk: bool = True  # send large frames over the server's bulk channel when it offers one
    bulk_min_bytes: int = 512 * KiB  # frames (either way) from this size use the bulk channel
    bulk_retry_interval: float = 30.0  # after the bulk channel could not be reached, large
    # frames use gRPC streams this many seconds, then the channel is tried again
    bulk_connect_timeout: float = 10.0  # a new bulk connection (its ticket, TCP connect, TLS
    # handshake) not open within this long, or within the call's deadline, is given up: the
    # call goes as gRPC streams (a firewalled port once stalled it for connect_timeout)
    token: str | None = None  # bearer token sent with every call
    root_certificates: bytes | None = None  # PEM of the CA that signed the server (enables TLS)
    certificate_chain: bytes | None = None  # PEM client certificate (mutual TLS)
    private_key: bytes | None = None  # PEM key of the client certificate
    limits: Limits = field(default_factory=Limits)  # what the client accepts in replies
    fingerprint: str | None = None  # remote_autograd.trunk_fingerprint() of the trunk this
    # client expects; a server serving another one is refused (TrunkMismatch). None: no check


# ClientOptions fields checked by _check_bounds (the others are read as given).
_CLIENT_BOUNDS = ((("bulk_connect_timeout",), 1e-9, "a number of seconds > 0"),)

# ServerOptions fields that a value out of these bounds would make useless: a server that
# refuses every call, never answers a stream (chunks of 0 bytes) or forgets at once.
_SERVER_BOUNDS = (
    (
        (
            "max_contexts",
            "max_session_contexts",
            "max_sessions",
            "max_sessions_per_identity",
            "max_identity_contexts",
            "max_context_bytes",
            "max_identity_context_bytes",
            "max_inflight_bytes",
            "max_identity_inflight_bytes",
            "max_decoding_bytes",
            "stream_chunk_bytes",
        ),
        1,
        "a whole number >= 1",
    ),
    (("checkpoint_every",), 0, "a whole number >= 0 (0: never by count)"),
    (("unary_payload_bytes",), 0, "a whole number >= 0 (0: every frame streamed)"),
    (
        ("max_bulk_connections", "max_session_bulk_connections"),
        0,
        "a whole number >= 0 (0: every large frame goes by gRPC)",
    ),
    (
        ("context_ttl", "session_ttl", "bulk_timeout", "bulk_hello_timeout"),
        1e-9,
        "a number of seconds > 0",
    ),
    (("max_lr", "max_grad_scale"), 1e-300, "a number > 0"),
    (
        ("step_wait", "checkpoint_interval", "min_checkpoint_interval", "max_weight_growth"),
        0,
        "a number >= 0",
    ),
)
_SERVED_DTYPES = ("float32", "float64", "float16", "bfloat16")


def _check_bounds(options: object, bounds: tuple, *, flags: bool) -> None:
    """Refuse a field of ``options`` out of ``bounds`` ((names, lowest, what), ...) by name
    (and, with ``flags``, its command-line flag). Numbers of any kind (8e9, a numpy integer
    from a config) pass, whole where they count something, and are then made ints."""
    for names, lowest, what in bounds:
        for name in names:
            value = getattr(options, name)
            number = isinstance(value, numbers.Real) and not isinstance(value, bool)
            whole = number and ("whole" not in what or float(value).is_integer())
            if whole and "whole" in what and not isinstance(value, int):
                object.__setattr__(options, name, int(value))  # 8e9, a numpy integer: an int
            if not whole or not value >= lowest:
                flag = f" (--{name.replace('_', '-')})" if flags else ""
                owner = type(options).__name__
                raise ValueError(f"{owner}.{name}{flag} must be {what}, got {value!r}")


@dataclass(frozen=True)
class ServerOptions:
    """How a trunk server runs and what it accepts. Settings that contradict each other or
    would be ignored are refused here, before a trunk is built or a port bound."""

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError(
                "ServerOptions.certificate_chain and private_key go together (--tls-cert and "
                "--tls-key): TLS needs both"
            )
        if self.client_ca is not None and self.certificate_chain is None:
            raise ValueError(
                "ServerOptions.client_ca (--client-ca) asks for mutual TLS, which needs TLS: "
                "give certificate_chain and private_key (--tls-cert, --tls-key) too"
            )
        if (self.checkpoint_every or self.checkpoint_interval) and not self.checkpoint_path:
            raise ValueError(
                "ServerOptions.checkpoint_every / checkpoint_interval (--checkpoint-every, "
                "--checkpoint-interval) need checkpoint_path (--checkpoint): nothing would be saved"
            )
        for name in ("max_workers", "token_workers"):
            value = getattr(self, name)
            if name == "token_workers" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"ServerOptions.{name} must be >= 1 (a whole number), got {value!r}"
                )
        _check_bounds(self, _SERVER_BOUNDS, flags=True)
        port = self.bulk_port
        if (
            not isinstance(port, numbers.Integral)
            or isinstance(port, bool)
            or not 0 <= port <= 65535
        ):
            raise ValueError(
                f"ServerOptions.bulk_port (--bulk-port) must be a TCP port, 0 to 65535 (0: any "
                f"free one), got {self.bulk_port!r}"
            )
        if self.compression not in ("auto", "lz4", "none"):
            raise ValueError(
                "ServerOptions.compression (--compression) must be 'auto', 'lz4' or 'none', "
                f"got {self.compression!r}"
            )
        if self.dtype is not None and self.dtype not in _SERVED_DTYPES:
            raise ValueError(
                f"ServerOptions.dtype (--dtype) must be one of {', '.join(_SERVED_DTYPES)}, "
                f"got {self.dtype!r}"
            )

    device: str = "cpu"  # where the trunk runs: "cpu", "cuda", "cuda:1"...
    dtype: str | None = None  # run the trunk in this floating dtype (inputs cast, outputs back)
    max_workers: int = 16  # gRPC worker threads (with tokens: each token's own, see below)
    token_workers: int | None = None  # with tokens: threads of each token's own, where its
    # calls run (more wait their turn), so calls one token holds open take no other token's
    # threads. None: max_workers each; health checks and refusals keep max_workers of their own
    limits: Limits = field(default_factory=Limits)  # what the server accepts from clients
    max_contexts: int = 4096  # cached forward contexts, all sessions together
    max_context_bytes: int = 8 * GiB  # bytes held by kept forwards (inputs, outputs and the
    # activations autograd saved for Backward), all sessions together
    context_ttl: float = 600.0  # a forward context expires this many seconds after its last use
    max_session_contexts: int = 1024  # cached forward contexts of one session (its oldest go)
    max_sessions: int = 64  # client sessions at once
    max_sessions_per_identity: int = 16  # sessions of one authenticated identity (token or
    # client certificate) at once, so one cannot lock the others out (no tokens/mTLS: unused)
    max_identity_contexts: int = 2048  # cached forward contexts of one identity (its oldest go)
    max_identity_context_bytes: int = 4 * GiB  # bytes of them (its oldest go)
    max_inflight_bytes: int = 2 * GiB  # bytes of streamed frames held by all calls at once
    max_identity_inflight_bytes: int = 1 * GiB  # bytes of them held by one identity's calls
    max_decoding_bytes: int = 4 * GiB  # what the frames of all calls at once decode to beyond
    # their own bytes (LZ4 decompressed, lossy values widened), counted before it is allocated
    step_wait: float = 10.0  # a Step's budget, seconds: it waits at most this long in all for
    # other sessions' forwards to get their Backward, then steps anyway (those forwards go
    # stale, and later Steps no longer wait for that session); docs/security.md says how to pick
    session_ttl: float = 3600.0  # an idle session (gradients, optimizer) is dropped after this
    unary_payload_bytes: int = 1 * MiB  # frames up to this travel in one message
    stream_chunk_bytes: int = 1 * MiB  # larger frames travel in chunks of this size
    compression: str = "auto"  # compression of replies: "auto", "lz4" or "none"
    bulk: bool = True  # offer the bulk channel (large frames on a TCP port beside gRPC); TLS
    # with the same certificates when the gRPC port is TLS (docs/protocol.md)
    bulk_port: int = 0  # TCP port of the bulk channel (0: any free port, told in Info)
    max_bulk_connections: int = 256  # bulk connections, all sessions together
    max_session_bulk_connections: int = 8  # bulk connections of one session
    bulk_timeout: float = 60.0  # a bulk transfer that stalls this many seconds is dropped
    bulk_hello_timeout: float = 5.0  # a new bulk connection's TLS handshake + ticket, in all
    tokens: tuple[str, ...] = ()  # accepted bearer tokens; empty: no token required
    certificate_chain: bytes | None = None  # PEM server certificate (enables TLS)
    private_key: bytes | None = None  # PEM key of the server certificate
    client_ca: bytes | None = None  # PEM CA for client certificates (mutual TLS)
    insecure: bool = False  # allow plain text on a non-loopback address
    recompute: bool = False  # keep only a forward's inputs and RNG seed; Backward recomputes it
    # (saves the activations' memory for one more forward per step)
    checkpoint_path: str | None = None  # trunk + optimizer checkpoint: loaded at start if present
    checkpoint_every: int = 0  # save after every this many optimizer steps, and every load
    # (LoadState) when set (0: never by count)
    checkpoint_interval: float = 0.0  # also save every this many seconds when weights changed
    max_lr: float = 100.0  # largest learning rate (and Rprop step size) a session may set
    max_grad_scale: float = 1.0  # largest grad_scale of a call (clip_grad_norm_ scales down)
    max_weight_growth: float = 100.0  # a Step may not make a parameter tensor's largest |w|
    # more than this times max(1, its largest |w| before): refused, nothing changed (0: off)
    min_checkpoint_interval: float = 10.0  # Checkpoint RPCs, all clients together, at most one
    # per this many seconds (others: RESOURCE_EXHAUSTED with the wait); 0: no limit
