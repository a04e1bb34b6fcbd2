"""The trunk server: :func:`serve` and :class:`TrunkServer`.

Puts a trunk engine (engine.py) behind the Trunk servicer (service.py) on one gRPC server with
the standard health checking and reflection services, opens the bulk channel beside it, runs the
sweeper that expires idle contexts and sessions (and saves scheduled checkpoints), and drains
calls in flight on stop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ._proto import remote_autograd_pb2 as pb
from ._proto import remote_autograd_pb2_grpc as pb_grpc
from .adapters import AdapterEngine
from .addresses import bulk_host, check_address, refuse_a_taken_socket
from .bulk import BulkListener
from .drain import CallDrain
from .engine import TrunkEngine
from .options import ServerOptions
from .service import TrunkService, tolerant
from .tokens import TokenGate
from .transport import bulk_server_tls, create_server

__all__ = ["SERVICE_NAME", "TrunkServer", "serve"]

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Trunk"].full_name


def _add_trunk_service(servicer: pb_grpc.TrunkServicer, server: grpc.Server) -> None:
    """Register the generated handlers, except that a request protobuf cannot parse reaches
    the servicer (and is answered INVALID_ARGUMENT) instead of gRPC's INTERNAL and a logged
    traceback per message, which a client could use to flood the log."""

    class Capture:
        handlers: dict[str, Any] = {}

        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            pass

        def add_registered_method_handlers(self, name: str, handlers: dict[str, Any]) -> None:
            self.handlers = handlers

    capture = Capture()
    pb_grpc.add_TrunkServicer_to_server(servicer, capture)
    handlers = {
        name: handler._replace(request_deserializer=tolerant(handler.request_deserializer))
        for name, handler in capture.handlers.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class TrunkServer:
    """A running trunk server: the bound ``address``/``port``, ``stop()``, ``wait()``."""

    def __init__(
        self,
        trunk: torch.nn.Module | TrunkEngine | AdapterEngine,
        address: str,
        options: ServerOptions | None = None,
        *,
        interceptors: Sequence[grpc.ServerInterceptor] = (),
    ) -> None:
        address = check_address(address, listen=True)  # port 99999 would wrap around
        refuse_a_taken_socket(address)
        if isinstance(trunk, (TrunkEngine, AdapterEngine)):
            self.engine = trunk
            self.options = options = trunk.options
        else:
            self.options = options = options or ServerOptions()
            self.engine = TrunkEngine(trunk, options)
        self.service = TrunkService(self.engine)
        self._drain = CallDrain(f"/{SERVICE_NAME}/")  # counts every Trunk call
        # First: a call without a known token is refused before it takes a worker thread.
        workers = options.token_workers or options.max_workers
        self._gate = gate = TokenGate(self.service.tokens, workers)
        self._server, self.port = create_server(
            address, options, interceptors=(gate, self._drain, *interceptors)
        )
        host = address.rsplit(":", 1)[0]
        tcp = bulk_host(address) is not None  # else no port, and no TCP for a bulk channel
        self.address = f"{host}:{self.port}" if tcp else address
        if options.bulk and tcp:  # TLS exactly when the gRPC port is
            try:
                self.service.bulk = BulkListener(
                    host.strip("[]") or "0.0.0.0",
                    options.bulk_port,
                    max_connections=options.max_bulk_connections,
                    max_session_connections=options.max_session_bulk_connections,
                    timeout=options.bulk_timeout,
                    hello_timeout=options.bulk_hello_timeout,
                    tls=bulk_server_tls(options),
                )
            except OSError as exc:
                self._server.stop(None)
                raise OSError(
                    f"could not bind the bulk channel on port {options.bulk_port} "
                    f"(ServerOptions.bulk_port, --bulk-port; 0: any free one): {exc}"
                ) from exc
        _add_trunk_service(self.service, self._server)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._stop_done = threading.Event()  # the first stop() has finished
        self._stopping_thread = 0  # the thread running the first stop()
        self._sweeper = threading.Thread(target=self._sweep, name="ra-sweeper", daemon=True)

    def start(self) -> TrunkServer:
        self._server.start()
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._sweeper.start()
        log.info(
            "trunk server listening on %s (device %s)", self.address, self.engine.runner.device
        )
        return self

    def stop(self, grace: float | None = 5.0) -> None:
        """Stop taking calls, let calls in flight finish for ``grace`` seconds, then close
        (saving a last checkpoint when the weights moved since the previous one). During the
        grace period health answers ``NOT_SERVING`` and new Trunk calls ``UNAVAILABLE``."""
        with self._stop_lock:
            first = not self._stopped.is_set()
            self._stopped.set()
            if first:
                self._stopping_thread = threading.get_ident()
        if not first:
            # Another caller stops it (a thread beside the program's own stop): return when
            # it has, last checkpoint written, not before. A signal handler that interrupted
            # the first stop() in this very thread cannot wait for it: it returns at once.
            if threading.get_ident() != self._stopping_thread:
                self._stop_done.wait()
            return
        try:
            self._stop(grace)
        finally:
            self._stop_done.set()

    def _stop(self, grace: float | None) -> None:
        self._health.enter_graceful_shutdown()
        if grace:  # health answers NOT_SERVING while the calls in flight drain
            started = time.monotonic()
            self._drain.close()
            self._drain.wait(grace)
            grace = max(0.5, grace - (time.monotonic() - started))
        self._server.stop(grace).wait()
        self._gate.close()
        if self.service.bulk is not None:
            self.service.bulk.close()
        self.engine.save_if_changed()
        log.info("trunk server on %s stopped", self.address)

    def wait(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)

    def stats(self) -> dict[str, int]:
        return self.service.stats()

    def _sweep(self) -> None:
        options, engine, bulk = self.options, self.engine, self.service.bulk
        period = max(0.05, min(5.0, options.context_ttl / 4, options.session_ttl / 4))
        if options.checkpoint_interval > 0:
            period = min(period, max(0.05, options.checkpoint_interval / 4))
        last_save = time.monotonic()
        while not self._stopped.wait(period):
            # One round's failure must not end the sweeping for every client: a session never
            # expiring, an adapter never offloaded, no checkpoint saved any more.
            try:
                engine.expire()
                if bulk is not None:
                    bulk.prune()
            except Exception:
                log.exception("a sweep of sessions and contexts failed; sweeping on")
            try:  # apart: a failing sweep must not stop the scheduled checkpoints
                due = time.monotonic() - last_save >= options.checkpoint_interval
                if options.checkpoint_interval > 0 and options.checkpoint_path and due:
                    last_save = time.monotonic()
                    engine.save_if_changed()
            except Exception:
                log.exception("a scheduled checkpoint failed; trying again on schedule")

    def __enter__(self) -> TrunkServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve(
    module: torch.nn.Module | TrunkEngine | AdapterEngine,
    address: str = "127.0.0.1:0",
    *,
    options: ServerOptions | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> TrunkServer:
    """Serve ``module`` at ``address`` (port 0 picks a free port) and return the running server.

    ``module`` may also be an engine (a :class:`~remote_autograd.adapters.AdapterEngine` for
    per-client adapters), which brings its own options.

    ``interceptors`` are standard ``grpc.ServerInterceptor`` objects (logging, auditing...)."""
    return TrunkServer(module, address, options, interceptors=interceptors).start()
