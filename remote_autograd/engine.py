"""The trunk engine: the one object that owns the trunk and everything that changes it.

:class:`TrunkEngine` holds the module (through its :class:`~remote_autograd.runner.TrunkRunner`),
the trainable parameters, the trunk lock, the weights version, the forward contexts, the
sessions with their gradients and optimizers, and the checkpoints. It speaks plain Python
values (calls.py): the gRPC service around it authenticates, moves frames and maps errors to
status codes, and nothing here knows of gRPC.

Locks, always taken in this order: a context's lock, then a session's lock, then the trunk
lock (``_lock``, held while the module runs or its weights change).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .calls import (
    BackwardCall,
    BackwardResult,
    ComputeCall,
    ComputeResult,
    GradNormCall,
    StepCall,
    StepResult,
    TrunkInfo,
)
from .codec import DTYPES
from .contexts import ContextCache, ForwardContext
from .errors import (
    SESSION_GONE,
    InvalidRequest,
    LimitExceeded,
    NotConfigured,
    ServerUnavailable,
    StaleContext,
    TrunkError,
)
from .fingerprint import persistent_buffers, state_order, trunk_dtype, trunk_fingerprint
from .footprint import Footprint, plain_bytes
from .guard import (
    StepBackup,
    accumulate,
    buffer_snapshot,
    check_finite_buffers,
    check_finite_weights,
    check_grad_scale,
    check_hyperparameters,
    check_updates,
    floating_buffers,
    guarded_step,
    keep_configured_flags,
    pending_grads,
    restore_buffers,
)
from .optimizer_groups import resolve_groups, torch_groups
from .options import ServerOptions
from .ranks import local
from .runner import TrunkRunner
from .sessions import Session, SessionTable, ended_while_waiting, session_key
from .tree import flatten, unflatten
from .turns import StepTurns
from .validate import (
    check_buffers,
    check_finite_grads,
    check_finite_groups,
    check_finite_tree,
    check_grad_outputs,
    check_module_state,
    check_optimizer_state,
    check_parameters,
    clone_tree,
    describe,
    optimizer_class,
    plain_group,
    plain_map,
    step_groups,
)

__all__ = ["ID_PATTERN", "CheckpointPace", "TrunkEngine", "paced_checkpoint"]

# Optimizers of torch.optim whose step fails on FSDP2's sharded parameters (DTensor
# placement changes in Adafactor's pow_, Rprop's index_put_), tried on torch 2.13.
# What a kept forward's plain values (its arguments' tree beside the tensors) may take before
# they count against max_context_bytes: an ordinary call's tree is a few hundred bytes.
_TREE_ALLOWANCE = 4096

_NOT_SHARDED = frozenset({"Adafactor", "Rprop"})
# Their fused kernels have no sharding rule for DTensors (torch refuses every such Step); Adam
# and AdamW's have one.
_NOT_FUSED_SHARDED = frozenset({"SGD", "Adagrad"})

# What a client that did create its optimizer is told when the session holds none.
_SESSION_GONE = f"; if you did, {SESSION_GONE}"

log = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"[0-9a-zA-Z_-]{1,64}")  # request and session ids, matched whole


class CheckpointPace:
    """The Checkpoint RPC's pace: at most one save per ``interval`` seconds, all clients
    together; a refusal (``LimitExceeded``) says how long to wait. Its own lock, not the trunk
    lock: a refusal does not wait for a save in progress."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._asked = -float("inf")  # when a checkpoint was last granted (monotonic)
        self._lock = threading.Lock()
        self.answered: tuple[int, int, int] | None = None  # what the last granted one held

    def ask(self) -> None:
        with self._lock:
            now = time.monotonic()
            wait = self._asked + self.interval - now
            if wait > 0:
                raise LimitExceeded(
                    f"a checkpoint was asked for {now - self._asked:.1f} s ago; ask again in "
                    f"{wait:.1f} s (min_checkpoint_interval={self.interval:g})"
                )
            self._asked = now


def saved_weights_id(state: dict[str, Any]) -> str:
    """The id of the weights a checkpoint holds (a fresh one if it names none: it was written
    before ids, and no client holds one of its forwards)."""
    saved = state.get("weights_id")
    return saved if isinstance(saved, str) and 0 < len(saved) <= 64 else secrets.token_hex(8)


def paced_checkpoint(engine: Any) -> int:
    """A checkpoint asked for by a client (either engine): at most once per
    min_checkpoint_interval seconds for all clients together (each fsyncs the whole trunk).
    One asked within the wait with the weights unmoved since the last save (a retry of a
    Checkpoint whose reply was lost, say) is answered with that save, not refused."""
    if engine.options.checkpoint_path:  # else checkpoint() says NotConfigured
        try:
            engine.checkpoint_pace.ask()
        except LimitExceeded:
            if engine.checkpoint_pace.answered == _saved_marker(engine):
                return engine.weights_version
            raise
    version = engine.checkpoint()
    engine.checkpoint_pace.answered = _saved_marker(engine)
    return version


def _saved_marker(engine: Any) -> tuple[int, int, int]:
    """What a checkpoint holds, in brief: the weights version, and the sessions with an
    optimizer and their steps (a new session, a step or a load moves it)."""
    steps = [s.last_step for s in engine.sessions.values() if s.optimizer is not None]
    return engine.weights_version, len(steps), sum(steps)


class TrunkEngine:
    """Serves one ``nn.Module`` to any number of sessions."""

    def __init__(
        self,
        module: torch.nn.Module,
        options: ServerOptions | None = None,
        *,
        runner: TrunkRunner | None = None,  # another one (distributed.py, adapters.py), or None
    ) -> None:
        self.options = options = options or ServerOptions()
        dtype = DTYPES[options.dtype] if options.dtype else None
        # Before ServerOptions.dtype casts it (a sharding runner computed it before sharding).
        self.fingerprint = getattr(runner, "fingerprint", None) or trunk_fingerprint(module)
        self.runner = runner or TrunkRunner(module, torch.device(options.device), dtype)
        self.turns = StepTurns(options.step_wait)
        self.contexts = ContextCache(
            max_contexts=options.max_contexts,
            max_bytes=options.max_context_bytes,
            ttl=options.context_ttl,
            max_per_session=options.max_session_contexts,
            max_per_identity=options.max_identity_contexts,
            max_identity_bytes=options.max_identity_context_bytes,
            on_drop=self.turns.end_context,
        )
        self.sessions = SessionTable(
            max_sessions=options.max_sessions,
            max_per_identity=options.max_sessions_per_identity,
            ttl=options.session_ttl,
            on_drop=self._end_session,
        )
        # Called with a session's key when it ends (the service drops its bulk connections).
        self.session_listeners: list[Callable[[str], None]] = []
        self.weights_version = 0  # optimizer steps (and loads) applied to the weights
        # Names the weights: new at every change, kept in checkpoints. A restart from an older
        # checkpoint counts its versions again, so a version alone may name other weights.
        self.weights_id = secrets.token_hex(8)
        self.saved_version: int | None = None  # weights_version of the last checkpoint
        self.server_id = uuid.uuid4().hex[:16]  # a restarted server is a different process
        self._lock = threading.RLock()
        self.checkpoint_pace = CheckpointPace(options.min_checkpoint_interval)
        self.step_backup = StepBackup()  # what a Step changes is copied here (guard.py)
        if options.checkpoint_path:
            self._restore(options.checkpoint_path)

    @property
    def lock(self) -> threading.RLock:
        """The trunk lock: held while the module runs or its weights change."""
        return self._lock

    @property
    def module(self) -> torch.nn.Module:
        return self.runner.module

    @property
    def params(self) -> list[tuple[str, torch.nn.Parameter]]:
        return self.runner.params

    # -- sessions -----------------------------------------------------------------------------

    def session(self, identity: str, session_id: str) -> Session:
        """The session ``session_id`` of the authenticated ``identity`` (created on first use)."""
        if not ID_PATTERN.fullmatch(session_id):
            raise InvalidRequest(
                f"a session id must be 1-64 characters of [0-9A-Za-z_-], got {session_id[:80]!r}"
            )
        return self.sessions.get(session_key(identity, session_id))

    def end_session(self, identity: str, session_id: str) -> bool:
        """The client closed: drop its session now (False if it had none)."""
        return self.sessions.drop(session_key(identity, session_id))

    def _end_session(self, key: str) -> None:
        self.contexts.drop_session(key)
        self.turns.forget(key)
        self.runner.forget_session(key)
        for listener in self.session_listeners:
            listener(key)

    def info(self, identity: str | None = None) -> TrunkInfo:
        """What the Info RPC tells a client (``identity``: the caller's, for engines that keep
        something per identity)."""
        return TrunkInfo(
            trainable_parameters=[name for name, _ in self.params],
            trainable_numel=sum(p.numel() for _, p in self.params),
            device=str(self.runner.device),
            module_name=self.runner.module_name,
            server_id=self.server_id,
            fingerprint=self.fingerprint,
            weights_version=self.weights_version,
            buffers=[name for name, _ in persistent_buffers(self.module)],
            dtype=trunk_dtype(self.module),
            world_size=self.runner.world,
            parallel=self.runner.mode,
            batch_statistics=self.runner.batch_statistics,
        )

    # -- Compute and Backward -----------------------------------------------------------------

    def compute(self, session: Session, call: ComputeCall, value: Any) -> ComputeResult:
        """Run the trunk on ``value`` ({'args': list, 'kwargs': dict}); for training, keep
        the graph under the request id for a Backward (or only the inputs, to recompute)."""
        if (
            not isinstance(value, dict)
            or value.keys() != {"args", "kwargs"}
            or not isinstance(value.get("args"), list)
            or not isinstance(value.get("kwargs"), dict)
            or not all(isinstance(k, str) for k in value["kwargs"])
        ):
            raise InvalidRequest("Compute expects a map {'args': list, 'kwargs': {str: value}}")
        template, tensors = flatten((value["args"], value["kwargs"]))
        needs = call.needs_input_grad or [False] * len(tensors)
        if len(needs) != len(tensors):
            raise InvalidRequest(
                f"needs_input_grad has {len(needs)} flags for {len(tensors)} input tensors"
            )
        keep = call.keep_context or call.recompute
        if keep and not ID_PATTERN.fullmatch(call.request_id):
            raise InvalidRequest(
                f"request id must match {ID_PATTERN.pattern}, got {call.request_id!r}"
            )
        seed = call.rng_seed or secrets.randbits(63) or 1
        leaves = self.runner.leaves(tensors, needs)
        # A kept forward holds a lease until its Backward: no other session's Step lands in
        # between (see StepTurns). The context carries it once cached.
        lease = self.turns.lease(session.key) if keep else -1
        try:
            outputs, out_template, (version, weights_id), seconds = self._run_compute(
                session, call, template, leaves, tensors, seed, lease
            )
        except BaseException:
            self.turns.end(session.key, lease)
            raise
        log.debug(
            "Compute %s (session %s): %d inputs, keep=%s, weights v%d",
            call.request_id[:12],
            session.key,
            len(tensors),
            keep,
            version,
        )
        # Known where the forward ran with its graph on this process: which outputs need
        # no gradient (the client marks them so, as they are locally).
        graphed = keep and not (call.recompute or self.options.recompute)
        without_grad = (
            [not o.requires_grad for o in outputs]
            if graphed and outputs is not None and self.runner.world == 1
            else []
        )
        return ComputeResult(
            # None for a re-created context: the client has the outputs already.
            value=None
            if outputs is None
            else unflatten(out_template, [o.detach() for o in outputs]),
            weights_version=version,
            seed=seed,
            recomputed=call.recompute,
            compute_seconds=seconds,
            weights_id=weights_id,
            without_grad=without_grad if any(without_grad) else [],
        )

    def _run_compute(self, session, call, template, leaves, tensors, seed, lease):
        """The forward, and the context it leaves for Backward; returns (outputs or None,
        their template, (weights version, weights id), seconds in the trunk)."""
        keep = call.keep_context or call.recompute
        out_template = None
        # Kept for recompute (the server's option, or a client re-creating a lost context):
        # no graph is held; Backward runs the forward again with the same seed.
        lazy = call.recompute or (call.keep_context and self.options.recompute)
        outputs: list[torch.Tensor] | None = None
        with self._lock:
            # Timed from here: the time waiting for the lock is another call's compute (the
            # slices of one micro_batches call, the micro-batches of a pipelined step).
            started = time.perf_counter()
            version, weights_id = self.weights_version, self.weights_id
            if call.recompute and call.weights_version != version:
                raise StaleContext(
                    f"cannot re-create the forward of request {call.request_id[:12]}: it ran "
                    f"on weights version {call.weights_version}, the trunk is now at "
                    f"{version}; run the step's forward and backward again"
                )
            if call.recompute and call.weights_id and call.weights_id != weights_id:
                raise StaleContext(
                    f"cannot re-create the forward of request {call.request_id[:12]}: the "
                    f"trunk's weights of version {version} are not those it ran on (the server "
                    "resumed from an older checkpoint, and was stepped since); run the step's "
                    "forward and backward again"
                )
            # A kept graph's inputs, outputs and saved activations count against
            # max_context_bytes; the trunk's own weights, which every forward saves, do not.
            graph = keep and not lazy
            shared = [*self.module.parameters(), *self.module.buffers()] if graph else []
            footprint = Footprint(shared)

            def context_bytes(held: list[torch.Tensor]) -> int:
                # What the kept context counts: its tensors, its plain values beyond a few KiB.
                footprint.add(held)
                return footprint.nbytes + max(0, plain_bytes(template) - _TREE_ALLOWANCE)

            if not call.recompute:
                # A training forward moves the trunk's buffers (BatchNorm statistics), which
                # every session shares: they must stay finite, or come back as they were.
                moved = floating_buffers(self.module) if call.training else []
                before = buffer_snapshot(self.module) if moved else []  # counters too
                # A retry of a kept forward whose reply was lost (its context is here): it
                # runs again, as its first try did, but moves the buffers only once (on one
                # process: the ranks of a distributed trunk run the retry as a forward).
                again = (
                    keep
                    and self.runner.world == 1
                    and self.contexts.holds(session.key, call.request_id)
                )
                try:
                    with footprint.saved() if graph else contextlib.nullcontext():
                        out_template, outputs = self.runner.forward(
                            template,
                            leaves,
                            call.training,
                            # Kept, or in training mode: a torch.utils.checkpoint of the client
                            # may run it again (under no_grad first, if reentrant) with this seed.
                            seed if keep or call.training else None,
                            grad=graph,
                            autocast=call.autocast,
                            keeps=lazy,  # kept to run again at Backward: as it came
                        )
                    check_finite_buffers(moved)
                    if keep:  # refused below, it must not have moved them: refused here
                        nbytes = context_bytes([*leaves, *(outputs if graph else ())])
                        self.contexts.check_size(session.key, nbytes)
                        self._check_alive(session)
                except Exception:
                    # Refused here or by another rank of a distributed trunk: as they were.
                    restore_buffers(before)
                    raise
                if again:
                    restore_buffers(before)
            seconds = time.perf_counter() - started
        if keep:
            kept = None if lazy else outputs
            answered: dict[str, Any] = {}
            if call.recompute:
                nbytes = context_bytes(leaves)  # nothing ran: only the inputs are kept
                # The context this one re-creates may have answered a Backward whose reply was
                # lost, and that Backward is retried on this one: not added twice.
                seq, nonfinite = self.contexts.answered(session.key, call.request_id)
                answered = {"answered": seq, "answered_nonfinite": nonfinite}
            # The cache ends the lease when the context goes away (evicted, released...).
            self.contexts.put(
                ForwardContext(
                    request_id=call.request_id,
                    session=session.key,
                    inputs=leaves,
                    input_dtypes=[t.dtype for t in tensors],
                    outputs=kept,
                    nbytes=nbytes,
                    weights_version=version,
                    seed=seed,
                    template=template,
                    training=call.training,
                    autocast=call.autocast,
                    backward_seq=call.backward_seq if call.recompute else 0,
                    lease=lease,
                    **answered,
                )
            )
            if not self.sessions.holds(session):
                # Ended just after the check above: this one would be kept, with its lease,
                # for no one.
                self.contexts.release(session.key, [call.request_id])
                self._check_alive(session)
        return outputs, out_template, (version, weights_id), seconds

    def _check_alive(self, session: Session) -> None:
        """Refuse to keep a forward of a session that ended (EndSession, expiry) while it
        ran, after its contexts were dropped."""
        if not self.sessions.holds(session):
            raise InvalidRequest(
                f"Compute: session {session.key.rpartition('/')[2]!r} ended while its "
                "forward ran (its client closed, or it was idle past session_ttl); the "
                "forward's context is not kept: open a new session"
            )

    def backward(self, session: Session, call: BackwardCall, value: Any) -> BackwardResult:
        """Gradients of the kept forward ``call.request_id`` given its outputs' gradients
        (``value``: {'grads': [tensor or None per output]}): parameter gradients accumulate in
        the session, input gradients are returned. A repeated ``seq`` is a retry: answered
        again, nothing accumulates twice."""
        check_grad_scale(call.grad_scale, self.options, "Backward")
        if call.seq < 1:  # 0 would read as a retry of a Backward that never ran
            raise InvalidRequest(f"Backward: backward_seq must be 1 or more, got {call.seq}")
        context = self.contexts.get(session.key, call.request_id)
        with context.lock:
            if call.seq == context.backward_seq and context.last_reply is not None:
                log.debug(
                    "Backward %s #%d: a retry, answered again", call.request_id[:12], call.seq
                )
                return context.last_reply
            if call.seq == context.backward_seq:  # a retry, whose answer was not kept
                raise StaleContext(
                    f"Backward #{call.seq} for request {call.request_id[:12]}: answered "
                    "already (its gradients were added), and its answer was not kept for a "
                    "retry (it did not fit in max_context_bytes or max_identity_context_bytes)"
                    ": call zero_grad() and redo the step from its first forward"
                )
            if call.seq != context.backward_seq + 1:
                raise StaleContext(
                    f"Backward #{call.seq} for request {call.request_id[:12]}: "
                    f"expected #{context.backward_seq + 1}"
                )
            grads = value.get("grads") if isinstance(value, dict) else None
            if not isinstance(grads, list):
                raise InvalidRequest("Backward expects {'grads': [one tensor or None per output]}")
            needs = call.needs_input_grad
            if len(needs) != len(context.inputs):
                raise InvalidRequest(
                    f"needs_input_grad has {len(needs)} flags for {len(context.inputs)} inputs"
                )
            for index, need in enumerate(needs):
                if need and not context.inputs[index].requires_grad:
                    raise InvalidRequest(f"input {index} was not sent as requiring a gradient")
            check_grad_outputs(grads, finite=not call.report_nonfinite)
            wanted = [i for i, need in enumerate(needs) if need]
            with session.lock, self._lock:
                started = time.perf_counter()  # not the wait: see compute()
                if context.weights_version != self.weights_version:
                    self.turns.end_context(context)
                    raise StaleContext(
                        f"Backward for request {call.request_id[:12]}: the trunk's weights "
                        f"were stepped (version {context.weights_version} -> "
                        f"{self.weights_version}) since its forward; run the forward again"
                    )
                outputs = context.outputs
                # A recompute must not move the buffers again (BatchNorm statistics): the
                # forward it repeats updated them already. Restored once the graph is used.
                kept = buffer_snapshot(self.module) if outputs is None else None
                try:
                    if outputs is None:
                        _, outputs = self.runner.forward(
                            context.template,
                            context.inputs,
                            context.training,
                            context.seed,
                            grad=True,
                            autocast=context.autocast,
                            recompute=True,
                        )
                    # Answered by the context this one re-created: its gradients are in the
                    # session already (its reply was lost); the inputs' are computed again.
                    again = call.seq <= context.answered
                    input_grads, param_grads = self.runner.gradients(
                        outputs,
                        grads,
                        [context.inputs[i] for i in wanted],
                        retain_graph=context.outputs is not None,
                        parameters=not call.freeze_parameters and not again,
                        training=context.training,
                    )
                finally:
                    if kept is not None:
                        restore_buffers(kept)
                pending: dict[str, Any] = {
                    "zero_grad": int(call.zero_grad),
                    "grad_scale": call.grad_scale,
                    "report_nonfinite": call.report_nonfinite,
                }
                if again:
                    nonfinite = context.answered_nonfinite
                else:
                    with self.runner.mirrored("account", session, **pending):
                        nonfinite = self.account(session, param_grads, **pending)
                computed = time.perf_counter()
            returned: list[torch.Tensor | None] = [None] * len(context.inputs)
            for i, grad in zip(wanted, input_grads, strict=True):
                returned[i] = None if grad is None else grad.to(context.input_dtypes[i])
            result = BackwardResult(
                grads=returned,
                weights_version=context.weights_version,
                recomputed=context.outputs is None,
                compute_seconds=computed - started,
                nonfinite=nonfinite,
            )
            context.backward_seq = call.seq
            reply_bytes = sum(g.numel() * g.element_size() for g in returned if g is not None)
            self.contexts.keep_reply(context, result, reply_bytes)
            self.turns.end_context(context)
            log.debug(
                "Backward %s #%d (session %s): accumulated",
                call.request_id[:12],
                call.seq,
                session.key,
            )
            return result

    def account(
        self,
        session: Session,
        param_grads: list[torch.Tensor | None],
        zero_grad: int,
        grad_scale: float,
        report_nonfinite: bool,
    ) -> bool:
        """Accumulate one Backward's parameter gradients in the session, after its deferred
        zero_grad and scale; returns True when they were not finite and ``report_nonfinite``
        asked to skip them (an overflowed GradScaler step) rather than to refuse."""
        ranks = self.runner.ranks
        self.runner.split(session)
        named_grads = {
            name: grad
            for (name, _), grad in zip(self.params, param_grads, strict=True)
            if grad is not None
        }
        try:
            check_finite_grads(self.params, param_grads, ranks)
            # Refused with nothing changed if a sum overflows: with the held gradients, or
            # (ddp) with the other ranks' parts.
            accumulate(session, named_grads, zero_grad, grad_scale, ranks, self.params)
            return False
        except InvalidRequest:
            if not report_nonfinite:
                raise
        # The client's GradScaler skips this step, as it would a local .grad gone inf: the
        # deferred zero_grad and scale apply, nothing of this Backward is added.
        accumulate(session, {}, zero_grad, grad_scale, ranks, self.params)
        return True

    def release(self, session: Session, request_ids: list[str]) -> int:
        """Forget contexts the client no longer needs; returns how many were found."""
        return self.contexts.release(session.key, request_ids) if request_ids else 0

    # -- the session's optimizer ----------------------------------------------------------------

    def configure_optimizer(
        self,
        session: Session,
        name: str,
        options: dict[str, Any],
        groups: list[dict[str, Any]] | None = None,
        optimizer_id: str = "",
    ) -> list[dict[str, Any]]:
        """Give the session its optimizer: a class of torch.optim by name, plain kwargs, and
        parameter groups by parameter name (optimizer_groups.py); returns each group's
        resolved hyperparameters with "params": its parameter names. ``optimizer_id`` (the
        client's name for this configuration) is what its Steps say they step."""
        cls = optimizer_class(name)
        if self.runner.mode == "fsdp" and name in _NOT_SHARDED:
            raise InvalidRequest(
                f"{name} cannot step a trunk sharded with --parallel fsdp: its step mixes "
                "the shards with whole tensors (torch refuses it on every Step); use another "
                "optimizer (AdamW, Adam, SGD, RMSprop, Adagrad, ...), or --parallel ddp"
            )
        kwargs = plain_map(options, "optimizer options")
        fused = [
            kwargs.get("fused"),
            *(g.get("fused") for g in groups or () if isinstance(g, dict)),
        ]
        if self.runner.mode == "fsdp" and name in _NOT_FUSED_SHARDED and any(fused):
            raise InvalidRequest(
                f"{name}(fused=True) cannot step a trunk sharded with --parallel fsdp: torch "
                "has no sharded form of its fused kernel (it refuses every Step); leave fused "
                "unset (the foreach kernels), use AdamW or Adam, or --parallel ddp"
            )
        if not self.params:
            raise InvalidRequest("the trunk has no trainable parameters to optimize")
        named = resolve_groups(groups, self.params)
        with (
            session.lock,
            self._lock,
            self.runner.mirrored(
                "configure",
                session,
                name=name,
                options=options,
                groups=groups,
                optimizer_id=optimizer_id,
            ),
        ):
            try:
                optimizer = cls(torch_groups(named, self.params), **kwargs)
            except (TypeError, ValueError) as exc:
                raise InvalidRequest(f"{name}(**{kwargs!r}): {exc}") from exc
            check_hyperparameters(name, optimizer.param_groups, self.options)
            # What the session holds goes into checkpoints, which restore only what a
            # LoadState would take: held to the same bounds.
            check_finite_groups({"param_groups": optimizer.param_groups}, f"{name} options")
            session.optimizer = optimizer
            session.optimizer_name = name
            session.optimizer_options = kwargs
            session.optimizer_groups = named if groups else None
            session.last_step = 0
            session.optimizer_id = optimizer_id
        return [
            {
                **plain_group({k: v for k, v in group.items() if k != "params"}),
                "params": spec["params"],
            }
            for group, spec in zip(optimizer.param_groups, named, strict=True)
        ]

    def grad_norms(
        self, session: Session, call: GradNormCall
    ) -> tuple[list[float], list[torch.dtype]]:
        """Per-parameter norms of the session's gradients, in the trunk's parameter order,
        and each gradient's dtype."""
        check_grad_scale(call.grad_scale, self.options, "GradNorm")
        self._check_gradients_here(call.server_id, "GradNorm")
        args = dataclasses.asdict(call)
        with session.lock, self._lock, self.runner.mirrored("grad_norms", session, **args):
            return self.norms(session, call)

    def norms(self, session: Session, call: GradNormCall) -> tuple[list[float], list[torch.dtype]]:
        """:meth:`grad_norms` once checked (the caller holds the locks)."""
        norm_type = call.norm_type
        self.runner.combine(session)
        if not call.ops_id or call.ops_id != session.last_ops_id:  # a retry's: applied already
            session.apply_pending(call.zero_grad, call.grad_scale)
            session.last_ops_id = call.ops_id
        grads = [local(session.grads[n]) for n, _ in self.params if n in session.grads]
        if not grads:
            return [], []
        # A rank's shard may be empty (fsdp: a first dimension smaller than the world), and
        # torch refuses the inf-norm of an empty tensor: on that rank only, which would leave
        # the others waiting in the collective. An empty shard's norm is the value that leaves
        # the ranks' combination as it is: 0 (sums, max), or inf for p < 0 (min, sums of x**p).
        whole = [g for g in grads if g.numel()]
        # A shard's norm in its own dtype would be rounded, then rounded again once the ranks'
        # are combined (a bfloat16 norm one unit off torch's): shards' norms in float64, cast
        # to the gradient's dtype once, on the client.
        wide = torch.float64 if self.runner.mode == "fsdp" else None
        computed = iter(torch._foreach_norm(whole, norm_type, dtype=wide) if whole else ())
        empty = math.inf if norm_type < 0 else 0.0
        values = [float(next(computed)) if g.numel() else empty for g in grads]
        return self.runner.ranks.norms(values, norm_type), [g.dtype for g in grads]

    def weights_moved(self) -> None:
        """Count a change of the weights (a Step, a load), and name the new ones."""
        self.weights_version += 1
        self.weights_id = secrets.token_hex(8)

    def _check_gradients_here(self, server_id: str, what: str) -> None:
        """Refuse a call about gradients that another server process accumulated."""
        if server_id and server_id != self.server_id:
            raise StaleContext(
                f"{what}: its gradients were accumulated by server process {server_id}, which "
                f"is gone (this is {self.server_id}: a restart); they are lost, so run this "
                "step's forward and backward again"
            )

    def step(self, session: Session, call: StepCall) -> StepResult:
        """Apply the session's optimizer once per step number (a repeat is a replay)."""
        with session.lock:
            optimizer = session.optimizer
            if optimizer is None:
                raise NotConfigured(
                    "Step before ConfigureOptimizer: create a RemoteOptimizer for this trunk "
                    f"first{_SESSION_GONE}"
                )
            # Before the replay test: a new optimizer's step #1 is no replay of the old one's.
            if call.optimizer_id and session.optimizer_id not in ("", call.optimizer_id):
                raise StaleContext(
                    f"Step #{call.step}: this session's optimizer on the server is not the one "
                    "the client configured last (the server resumed from a checkpoint taken "
                    f"before it: {session.optimizer_name} of then); create the RemoteOptimizer "
                    "again (then load_state_dict() into it to resume a saved state) and redo "
                    "the step"
                )
            if call.step == session.last_step and call.step > 0:
                return StepResult(call.step, self.weights_version, replayed=True)
            if call.step != session.last_step + 1:
                raise StaleContext(
                    f"Step #{call.step} does not follow this session's last step "
                    f"#{session.last_step} (a server restarted from an older checkpoint "
                    f"resumes at step #{session.last_step}: continue training from there; "
                    "a client that skipped step numbers has a fault of its own)"
                )
            self._check_gradients_here(call.server_id, f"Step #{call.step}")
            check_grad_scale(call.grad_scale, self.options, "Step")
            groups = step_groups(call.param_groups, optimizer)
            check_updates(optimizer, groups, self.options)
            waiting = self.turns.others_holding(session.key)
            if waiting:
                log.debug(
                    "Step #%d (session %s) waits for %d forwards of other sessions",
                    call.step,
                    session.key,
                    waiting,
                )
            wait = self.turns.begin_step(session.key)
            stepped = False
            try:
                # Ended (EndSession, expiry) while it waited: its client is gone, and the
                # trunk that every session shares must not move for it.
                if not self.sessions.holds(session):
                    raise ended_while_waiting("Step", session.key)
                version = self.apply_step(session, optimizer, call, groups)
                stepped = True
            finally:
                self.turns.end_step(stepped=stepped)
            log.debug("Step #%d (session %s) applied: weights v%d", call.step, session.key, version)
            return StepResult(call.step, version, wait=wait)

    def apply_step(
        self,
        session: Session,
        optimizer: torch.optim.Optimizer,
        call: StepCall,
        groups: list[dict[str, Any]],
    ) -> int:
        """Apply the session's gradients (the caller holds the session lock and its turn)."""
        mirror = {
            "step": call.step,
            "zero_grad": int(call.zero_grad),
            "grad_scale": call.grad_scale,
            "groups": groups,
        }
        ranks = self.runner.ranks
        with self._lock, self.runner.mirrored("step", session, **mirror):
            # Applied only if all it produces is finite and sane; else rolled back and refused
            # with the session's gradients and deferred zero_grad/scale untouched (guard.py).
            self.runner.combine(session)
            grads = pending_grads(session, call.zero_grad, call.grad_scale, ranks)
            guarded_step(
                optimizer, self.params, grads, groups, self.options, self.step_backup, ranks
            )
            session.grads.clear()
            session.grads.update(grads)
            self.weights_moved()
            session.last_step = call.step
            every = self.options.checkpoint_every
            if every and self.options.checkpoint_path and self.weights_version % every == 0:
                self.write_checkpoint(on_error="log")  # every rank is here: no mirror of its own
            return self.weights_version

    # -- state ----------------------------------------------------------------------------------

    def get_state(
        self, session: Session, *, parameters: bool, optimizer: bool, buffers: bool = False
    ) -> dict[str, Any]:
        """Copies of the trainable parameters, the persistent buffers and/or the session's
        optimizer state."""
        state: dict[str, Any] = {"step": session.last_step, "parameters": None, "optimizer": None}
        asked = {"parameters": parameters, "optimizer": optimizer, "buffers": buffers}
        full = self.runner.full
        with session.lock, self._lock, self.runner.mirrored("get_state", session, **asked):
            if parameters:
                state["parameters"] = clone_tree(full({n: p.detach() for n, p in self.params}))
            if buffers:
                state["buffers"] = {n: b.clone() for n, b in persistent_buffers(self.module)}
            if parameters and buffers:  # for a client's state_dict(), in the module's order
                state["order"] = state_order(self.module)
            if optimizer and session.optimizer is not None:
                state["optimizer"] = clone_tree(full(session.optimizer.state_dict()))
        return state

    def load_state(self, session: Session, state: Any) -> tuple[int, bool, int]:
        """Load trainable parameters, persistent buffers and/or the session's optimizer state,
        all checked first; returns (parameters loaded, whether optimizer state was loaded,
        buffers loaded)."""
        if not isinstance(state, dict):
            raise InvalidRequest("LoadState expects a map with 'parameters', 'optimizer', 'step'")
        with session.lock, self._lock, self.runner.mirrored("load_state", session, state=state):
            return self._load_state(session, state)

    def _load_state(self, session: Session, state: dict[str, Any]) -> tuple[int, bool, int]:
        parameters = state.get("parameters")
        optimizer_state = state.get("optimizer")
        step = state.get("step")
        if step is not None and (type(step) is not int or step < 0):
            raise InvalidRequest(f"LoadState: 'step' must be a whole number >= 0, got {step!r}")
        if parameters is not None:
            check_parameters(parameters, dict(self.params))
        buffers = state.get("buffers")
        named_buffers = dict(persistent_buffers(self.module))
        if buffers is not None:
            check_buffers(buffers, named_buffers)
        with session.lock:
            # The copy the last step began for the next one (guard.py) reads these tensors
            # on a thread of its own: it ends first, and is dropped.
            self.step_backup.forget()
            if optimizer_state is not None:
                if session.optimizer is None:
                    raise NotConfigured(
                        "LoadState with optimizer state before ConfigureOptimizer: create the "
                        f"RemoteOptimizer first{_SESSION_GONE}"
                    )
                optimizer_state = self._checked_optimizer_state(
                    session.optimizer_name,
                    optimizer_state,
                    session.optimizer,
                    "a LoadState",
                    current=session.optimizer.param_groups,
                )
                with self._lock:
                    # torch puts the new groups and state in place before it can fail (an
                    # optimizer's __setstate__): a refused load puts the old ones back.
                    before = session.optimizer.state_dict()
                    try:
                        self.runner.load_optimizer_state(session.optimizer, optimizer_state)
                        missing = {
                            key
                            for group, was in zip(
                                session.optimizer.param_groups, before["param_groups"], strict=True
                            )
                            for key in set(was) - set(group)
                        }
                        if missing:  # every later step would fail (Adam without its betas)
                            raise ValueError(f"its param groups lack {sorted(missing)}")
                    except (KeyError, TypeError, ValueError) as exc:
                        session.optimizer.load_state_dict(before)
                        raise InvalidRequest(f"optimizer state does not fit: {exc}") from exc
            if parameters is not None or buffers:
                with self._lock, torch.no_grad():
                    named = dict(self.params)
                    for name, value in (parameters or {}).items():
                        self.runner.assign(named[name], value)
                    for name, value in (buffers or {}).items():
                        named_buffers[name].copy_(value)
                    self.weights_moved()
            if step is not None:
                session.last_step = step
            loaded = parameters is not None or buffers or optimizer_state is not None
            if loaded and self.options.checkpoint_every and self.options.checkpoint_path:
                # A server checkpointing every few steps keeps what was loaded as it keeps a
                # step: a restart would otherwise go back to the weights before the load.
                self.write_checkpoint(on_error="log")  # every rank is here (see apply_step)
        return len(parameters or {}), optimizer_state is not None, len(buffers or {})

    # -- checkpoints ------------------------------------------------------------------------------

    def checkpoint(self, *, on_error: str = "raise") -> int:
        """Save the trunk and every session's optimizer to ``checkpoint_path``; return the
        weights version saved. A consistent snapshot: no Step runs while it is written."""
        if not self.options.checkpoint_path:
            raise NotConfigured("this server has no checkpoint path (serve --checkpoint FILE)")
        with self._lock, self.runner.mirrored("checkpoint", None, on_error=on_error):
            return self.write_checkpoint(on_error)

    def write_checkpoint(self, on_error: str) -> int:
        path = self.options.checkpoint_path
        assert path, "the caller checked checkpoint_path"
        with self._lock:
            version = self.weights_version
            sessions = self.saved_sessions(self.sessions.values())
            module_state = dict(self.module.state_dict())
            state = {
                "weights_version": version,
                "weights_id": self.weights_id,
                "module": module_state,
                "sessions": sessions,
            }
            try:
                check_finite_weights(module_state, self.runner.ranks)
            except TrunkError as exc:
                if on_error == "raise":
                    raise
                log.error("checkpoint of weights v%d to %s skipped: %s", version, path, exc)
                return self.saved_version or 0
            try:
                self.runner.save_checkpoint(path, state)
            except OSError:
                if on_error == "raise":
                    raise
                log.exception("could not save the checkpoint to %s; training goes on", path)
                return self.saved_version or 0
            self.saved_version = version
        log.debug("checkpoint of weights v%d saved to %s", version, path)
        return version

    @staticmethod
    def saved_sessions(sessions: Iterable[Session]) -> dict[str, Any]:
        """What a checkpoint keeps of each session with an optimizer (the caller holds the
        trunk lock: no Step moves the state while it is read)."""
        return {
            session.key: {
                "step": session.last_step,
                "optimizer": session.optimizer_name,
                "optimizer_id": session.optimizer_id,
                "options": session.optimizer_options,
                "groups": session.optimizer_groups,
                "state": session.optimizer.state_dict(),
            }
            for session in sessions
            if session.optimizer is not None
        }

    def _checked_optimizer_state(
        self,
        name: str,
        state: dict[str, Any],
        optimizer: torch.optim.Optimizer,
        call: str,
        current: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """An optimizer state to load into ``optimizer`` (a LoadState's, a checkpoint's),
        checked: finite, within the server's bounds, no larger than the parameters; with the
        flags of the ``current`` groups kept. On a CPU trunk its tensors are copies: torch
        keeps loaded tensors as given there, and one that views its frame (or file) would keep
        every byte of it alive as long as the session. (A GPU trunk's load copies anyway.)"""
        check_finite_groups(state)
        if current is not None:
            keep_configured_flags(state["param_groups"], current)
        check_hyperparameters(name, state["param_groups"], self.options, current=current, call=call)
        check_optimizer_state(state, optimizer)
        check_finite_tree(state.get("state"), "optimizer state")
        if self.runner.device.type == "cpu":
            state = {**state, "state": clone_tree(state["state"])}
        return state

    def restore_session(self, session: Session, saved: Any) -> None:
        """Give ``session`` back the optimizer (and step) a checkpoint kept of it."""
        self.restored_session(saved)(session)

    def restored_session(self, saved: Any) -> Callable[[Session], None]:
        """The optimizer (and step) a checkpoint kept of a session, checked as a LoadState is
        and built apart (InvalidRequest if it does not hold): a function that gives it to a
        session."""
        if not isinstance(saved, dict):
            raise InvalidRequest(f"a session's entry is {describe(saved)}, not a map")
        name, step, state = saved.get("optimizer"), saved.get("step"), saved.get("state")
        if not isinstance(name, str) or type(step) is not int or step < 0:
            raise InvalidRequest("a session's entry needs an optimizer name and a step >= 0")
        if not isinstance(state, dict) or not isinstance(state.get("param_groups"), list):
            raise InvalidRequest("a session's optimizer state is not a torch state_dict")
        cls = optimizer_class(name)
        options = plain_map(saved.get("options"), "optimizer options")
        groups = saved.get("groups")
        optimizer_id = saved.get("optimizer_id", "")  # none before session 13
        if not isinstance(optimizer_id, str) or len(optimizer_id) > 64:
            raise InvalidRequest("a session's optimizer_id is not a short string")
        try:
            optimizer = cls(
                torch_groups(groups, self.params) if groups else [p for _, p in self.params],
                **options,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRequest(f"{name} with the saved options and groups: {exc}") from exc
        if self.runner.world == 1:  # a sharded trunk's state is checked as it is placed
            state = self._checked_optimizer_state(name, state, optimizer, "a checkpoint")
        try:
            optimizer.load_state_dict(state)
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRequest(f"optimizer state does not fit: {exc}") from exc

        def give(session: Session) -> None:
            session.optimizer = optimizer
            session.optimizer_groups = groups
            session.optimizer_name = name
            session.optimizer_options = options
            session.last_step = step
            session.optimizer_id = optimizer_id

        return give

    def requested_checkpoint(self, session: Session) -> int:
        """The Checkpoint RPC: :func:`paced_checkpoint`; the weights version saved."""
        return paced_checkpoint(self)

    def save_if_changed(self) -> None:
        """A checkpoint when the weights moved since the last one (and a path is set)."""
        if self.options.checkpoint_path and self.saved_version != self.weights_version:
            try:
                self.checkpoint(on_error="log")
            except ServerUnavailable as exc:  # a distributed trunk out of service
                log.error("no checkpoint of weights v%d: %s", self.weights_version, exc)

    def _restore(self, path: str) -> None:
        state = self.runner.load_checkpoint(path)
        if state is None:
            log.info("no checkpoint at %s yet: starting from the module's weights", path)
            return
        if state.get("kind") == "adapters":
            raise ValueError(
                f"{path} is a checkpoint of per-client adapters, not of a single trunk; serve "
                "it with --adapters per-client and its LoRA options, or point --checkpoint "
                "elsewhere"
            )
        try:  # all checked and built before anything is loaded
            version, sessions = state.get("weights_version"), state.get("sessions")
            if type(version) is not int or version < 0 or not isinstance(sessions, dict):
                raise InvalidRequest("it needs a weights_version >= 0 and a map of sessions")
            if self.runner.world == 1:
                check_module_state(state.get("module"), self.module)
            self.sessions.check_room(sessions)
            restored = {key: self.restored_session(saved) for key, saved in sessions.items()}
        except (InvalidRequest, TrunkError) as exc:
            raise ValueError(
                f"checkpoint {path} cannot be restored, and nothing of it was loaded: {exc}"
            ) from exc
        with torch.no_grad():
            self.module.load_state_dict(state["module"])
        self.weights_version = self.saved_version = version
        self.weights_id = saved_weights_id(state)
        for key, give in restored.items():
            give(self.sessions.get(key))
        log.info(
            "resumed from checkpoint %s: weights v%d, %d sessions",
            path,
            self.weights_version,
            len(state["sessions"]),
        )

    # -- housekeeping -----------------------------------------------------------------------------

    def expire(self) -> None:
        """Drop idle contexts and sessions (the server's sweeper calls this)."""
        self.contexts.expire()
        self.sessions.expire()

    def stats(self) -> dict[str, int]:
        """Counts for tests and operators: cached contexts, their bytes, sessions."""
        return {
            "contexts": len(self.contexts),
            "context_bytes": self.contexts.nbytes,
            "sessions": len(self.sessions),
            "weights_version": self.weights_version,
            "step_waits_expired": self.turns.expired_steps,
        }
