"""A trunk on several processes under ``torchrun``: one front door, every rank computing.

Every rank runs the usual engine (engine.py) around a :class:`DistributedRunner`; rank 0 also
runs the gRPC server (service.py) and drives, the other ranks follow its commands
(follower.py) and never see the network.

- **The batch** is cut into one share per rank (shares.py); rank 0 hands each rank its share of
  every forward and backward and gathers outputs and input gradients back in order. Every
  tensor output must carry the batch as its first dimension when more than one rank ran.
- **``ddp``**: every rank holds the whole trunk and accumulates the gradients of its shares;
  at the session's next GradNorm or Step they are summed on every rank (one ``all_reduce`` of
  one flat buffer, :meth:`DistributedRunner.combine`): the loss is the client's, so the sum
  over the shares is the unsplit gradient, and accumulating k micro-batches costs one
  all-reduce, not k.
- **``fsdp``**: the trunk is sharded with FSDP2 (sharding.py: ``fully_shard`` on each layer of
  every ``nn.ModuleList`` / ``nn.Sequential``, then on the whole): each rank holds a shard of every
  parameter, gradient and optimizer state (``DTensor``), FSDP gathers the weights for each
  layer's forward and backward and reduce-scatters the gradients (summed, not averaged). Every
  rank takes part in every call, with an empty share if the batch is smaller than the world.
- **Session state on every rank.** Each rank's engine keeps every session's gradients and
  optimizer (whole in ``ddp``, its shards in ``fsdp``): rank 0 runs each engine operation that
  changes them (accumulating a Backward, GradNorm, ConfigureOptimizer, Step, LoadState, a
  checkpoint) on every rank at once (:meth:`DistributedRunner.mirrored`), so all replicas take
  the same step and no weights travel. The guard's verdicts (finite, max_weight_growth) and the
  norms are combined over the ranks (rank_wire.GroupRanks), so every rank keeps or refuses a
  step alike. Rank 0 alone keeps forward contexts, request ids, limits and authentication.
- **Checkpoints** are written by every rank with torch.distributed.checkpoint
  (sharded_checkpoint.py) and loaded by every rank at start.
- **Wire between ranks.** Commands and replies are codec frames over a gloo group
  (rank_wire.py); gradients, FSDP's gathers and the weights at start use the default group
  (NCCL on GPUs, gloo on CPUs).
- **Dropout.** Rank ``r`` seeds its share's forward with ``seed + r``: a recompute on the same
  rank draws the same masks; the masks differ from an unsplit run's.
- **Failures.** A rank that dies makes the next collective fail on rank 0, which answers that
  call and every later one with UNAVAILABLE (:class:`~remote_autograd.errors.ServerUnavailable`);
  torchrun then stops the group. Restart it with the same ``--checkpoint`` to continue.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import cancellation, sharded_checkpoint, sharding
from .errors import (
    CodecError,
    InvalidRequest,
    RemoteAutogradError,
    ServerUnavailable,
    TrunkError,
    named,
)
from .fingerprint import batch_statistics, trunk_fingerprint
from .follower import Follower
from .guard import buffer_snapshot, check_finite_buffers, floating_buffers, restore_buffers
from .options import Limits, ServerOptions
from .rank_wire import GroupRanks, RankWire
from .ranks import is_sharded, local
from .runner import TrunkRunner, check_dtype
from .sessions import ended_while_waiting
from .shares import Plan
from .tree import unflatten

__all__ = ["PARALLEL_MODES", "DistributedRunner", "serve_distributed"]

log = logging.getLogger(__name__)

PARALLEL_MODES = ("ddp", "fsdp")
DEFAULT_TIMEOUT = 600.0  # seconds a collective may wait (serve --dist-timeout)
_READS = {"get_state"}  # operations that change nothing: mirrored only where they gather (fsdp)
_UNLIMITED = 1 << 40  # a following rank's session limits: rank 0 enforces the real ones


class ShardedOutputs(list):
    """Rank 0's outputs of a forward whose shares' graphs the ranks keep under ``token``; when
    the engine drops it (its context released or expired), every rank frees its graph."""

    token: int
    plan: Plan
    leaves: list[torch.Tensor]
    batched_outputs: list[bool]


class DistributedRunner(TrunkRunner):
    """A :class:`TrunkRunner` whose forwards and gradients run on every rank of the default
    process group; rank 0's engine drives it, the other ranks follow (follower.py)."""

    def __init__(
        self,
        module: nn.Module,
        device: torch.device,
        dtype: torch.dtype | None,
        *,
        mode: str = "ddp",
        control: Any = None,
        limits: Limits | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if mode not in PARALLEL_MODES:
            raise ValueError(f"--parallel must be one of {PARALLEL_MODES}, got {mode!r}")
        check_dtype(dtype)  # before the cast below
        self.fingerprint = trunk_fingerprint(module)  # before the cast and the sharding
        name = type(module).__name__  # FSDP2 renames the class it shards
        self.mode = mode
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.wire = RankWire(control, limits)  # what rank 0 accepts, every rank reads
        self.ranks = GroupRanks(control, sharded=mode == "fsdp")
        uncast = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
        if dtype is not None:
            module = module.to(dtype)
        # Every rank starts from rank 0's weights, sent on the host before anything moves to
        # the device; fsdp then shards layer by layer onto it, so no rank's device ever holds
        # the whole trunk.
        self._broadcast_state(module)
        statistics = batch_statistics(module)  # fsdp renames the classes it shards, too
        if mode == "fsdp":
            sharding.shard(module)
        super().__init__(module, device, dtype)
        self.module_name = name
        self.batch_statistics = statistics
        self.uncast = uncast
        self.engine: Any = None  # this rank's engine (serve_distributed sets it)
        self.graphs: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._next_token = 0
        self._to_free: collections.deque[int] = collections.deque()
        self._forgotten: collections.deque[str] = collections.deque()
        self._combined: set[str] = set()  # ddp: sessions whose gradients are whole everywhere
        self.timeout = timeout  # --dist-timeout: how long a rank waits in any exchange
        self._last_command = time.monotonic()
        # Called (rank 0) when the group is lost or its ranks parted ways: the trunk can only
        # be restarted, so the server goes (serve's caller sets this).
        self.on_broken: Callable[[], None] | None = None
        self.stopped: threading.Event | None = None  # ends the keep-alive (rank 0)
        # A recomputed forward's buffers as they were before it, until its backward ran.
        self._recomputed: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.broken: str | None = None

    def _broadcast_state(self, module: nn.Module) -> None:
        with torch.no_grad():
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, 0, group=self.wire.group)

    # -- rank 0: the engine's calls ----------------------------------------------------------------

    def forward(
        self,
        template: Any,
        leaves: list[torch.Tensor],
        training: bool,
        seed: int | None,
        *,
        grad: bool,
        autocast: torch.dtype | None = None,
        recompute: bool = False,
        keeps: bool = False,
    ) -> tuple[Any, list[torch.Tensor]]:
        plan = Plan(leaves, self.world, everyone=self.mode == "fsdp")
        token = -1
        if grad:
            token = self._next_token = self._next_token + 1
        commands: dict[int, dict[str, Any]] = {}
        for rank in range(1, self.world):
            if rank not in plan.running:
                commands[rank] = {"op": "idle"}
                continue
            shares = [
                plan.stand_in(t.detach(), b, rank)
                for t, b in zip(leaves, plan.batched, strict=True)
            ]
            commands[rank] = {
                "op": "forward",
                "value": unflatten(template, shares),
                "needs": [t.requires_grad for t in leaves],
                "training": training,
                "seed": None if seed is None else (seed + rank) % (1 << 63),
                "grad": grad,
                "token": token,
                "autocast": None if autocast is None else str(autocast).removeprefix("torch."),
                "recompute": recompute,  # its buffer updates are undone, as rank 0's engine does
            }
        mine = [
            self.share_leaf(plan.share(t.detach(), b, 0), t.requires_grad)
            for t, b in zip(leaves, plan.batched, strict=True)
        ]
        replies, local_result, error = self._exchange(
            commands,
            self._unstoppable(
                "the trunk",
                lambda: self.forward_share(
                    template, mine, training, seed, grad, token, autocast, recompute, keeps
                ),
            ),
        )
        if error is not None:
            self._release(token)
            raise error
        out_template = local_result[0]
        per_rank = {0: local_result[1]}
        for rank in plan.active:
            if rank != 0:
                per_rank[rank] = replies[rank]["outputs"]
        try:
            batched_outputs, outputs = plan.gather(per_rank, self.device)
        except BaseException:  # every rank's kept graph goes, whatever went wrong
            self._release(token)
            raise
        if not grad:
            return out_template, outputs
        result = ShardedOutputs(outputs)
        result.token, result.plan, result.leaves = token, plan, leaves
        result.batched_outputs = batched_outputs
        weakref.finalize(result, self._to_free.append, token)
        return out_template, result

    def gradients(
        self,
        outputs: list[torch.Tensor],
        grads: list[Any],
        inputs: list[torch.Tensor],
        *,
        retain_graph: bool,
        parameters: bool = True,
        training: bool | None = None,
    ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        if not isinstance(outputs, ShardedOutputs):
            raise TypeError("DistributedRunner.gradients needs the outputs of its own forward")
        if len(grads) != len(outputs):
            raise InvalidRequest(
                f"Backward got {len(grads)} gradients for a forward with {len(outputs)} outputs"
            )
        plan, token = outputs.plan, outputs.token
        wanted = [next(i for i, leaf in enumerate(outputs.leaves) if leaf is x) for x in inputs]
        commands: dict[int, Any] = {}
        for rank in range(1, self.world):
            if rank not in plan.running:
                commands[rank] = {"op": "idle_backward"}
                continue
            commands[rank] = {
                "op": "backward",
                "token": token,
                "grads": plan.grad_shares(outputs, outputs.batched_outputs, grads, rank)
                if rank in plan.active
                else None,
                # A rank that ran only for FSDP's collectives back-propagates zeros, from the
                # outputs rank 0 back-propagates from, so that all reach the same layers.
                "zeros_for": [i for i, g in enumerate(grads) if g is not None],
                "wanted": wanted,
                "retain": retain_graph,
                "parameters": parameters,
                "training": training,
            }
        mine = plan.grad_shares(outputs, outputs.batched_outputs, grads, 0)
        replies, result, error = self._exchange(
            commands,
            self._unstoppable(
                "the trunk's backward",
                lambda: self.backward_share(
                    token, mine, wanted, retain_graph, parameters, [], training
                ),
            ),
            after_backward=True,
        )
        if not retain_graph:
            self._release(token)
        if error is not None:
            raise error
        per_rank = {0: result[0]}
        for rank in plan.active:
            if rank != 0:
                per_rank[rank] = replies[rank]["grads"]
        return plan.input_grads(outputs.leaves, wanted, per_rank, self.device), result[1]

    # -- the trunk's state on every rank -----------------------------------------------------------

    @contextlib.contextmanager
    def mirrored(self, op: str, session: Any, **args: Any) -> Iterator[None]:
        """Rank 0: have every other rank run engine operation ``op`` on its copy of ``session``
        while this rank runs it, then check that all ended alike (a rank that failed where rank
        0 did not, or the reverse, has parted ways: the trunk goes out of service)."""
        if self.rank != 0 or self.world == 1 or (op in _READS and self.mode != "fsdp"):
            yield
            return
        key = session.key if session is not None else ""
        command = {"op": "mirror", "name": op, "key": key, "args": args}
        self._send_all({rank: command for rank in range(1, self.world)})
        failed: BaseException | None = None
        try:
            # A session that ended while this call waited (EndSession, expiry) fails here on
            # every rank, before anything changes or any collective of the operation runs.
            self.agree_on_session(op, key, session is None or self.engine.sessions.holds(session))
            yield
        except dist.DistBackendError as exc:  # a collective of the operation failed
            failed = self._lost(exc)
            raise failed from exc
        except BaseException as exc:
            failed = exc
            raise
        finally:
            replies = self._receive_all(range(1, self.world), raise_now=failed is None)
            for rank, reply in sorted(replies.items()):
                if (reply.get("error") is None) != (failed is None):
                    self._out_of_service_now(
                        f"rank {rank} and rank 0 parted ways on {op}: rank {rank} said "
                        f"{reply.get('error')!r}, rank 0 {failed!r}"
                    )
            # The group lost here (a collective or the wire timed out: gloo raises a plain
            # RuntimeError) answers UNAVAILABLE, as every later call does, not INTERNAL.
            if self.broken is not None and not isinstance(failed, RemoteAutogradError):
                raise ServerUnavailable(self._out_of_service()) from failed

    def agree_on_session(self, op: str, key: str, here: bool) -> None:
        """Every rank says whether it holds the session as the operation needs it; unless all
        do, all refuse alike."""
        if self.ranks.any(not here):
            raise ended_while_waiting(op, key)

    def forget_session(self, key: str) -> None:
        if self.rank == 0:  # any thread (the sweeper too): applied with the next command
            self._forgotten.append(key)
        else:
            self._combined.discard(key)

    def assign(self, param: torch.Tensor, value: torch.Tensor) -> None:
        if not is_sharded(param):
            param.copy_(value)
            return
        local(param).copy_(sharding.distribute(value.to(param.dtype), param).to_local())

    def full(self, tree: Any) -> Any:
        if self.mode != "fsdp":
            return tree
        return sharding.full(tree)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: Any) -> None:
        if self.mode == "fsdp":
            state = sharding.place_optimizer_state(optimizer, state)
        optimizer.load_state_dict(state)

    def save_checkpoint(self, path: str, state: dict[str, Any]) -> None:
        sharded_checkpoint.save(path, state, self.wire.group)

    def load_checkpoint(self, path: str) -> dict[str, Any] | None:
        live = {f"/module/{name}": t for name, t in self.module.state_dict().items()}
        return sharded_checkpoint.load(path, live, self._allocate)

    def _allocate(self, shape: list[int], dtype: torch.dtype, sharded: bool) -> torch.Tensor:
        return sharding.room(self.params, self.device, shape, dtype, sharded)

    def keep_alive(self, stopped: threading.Event) -> None:
        """Rank 0, on a thread of its own until ``stopped``: a command to every rank whenever
        none went for a quarter of ``timeout``. The other ranks wait for the next command in
        an exchange that --dist-timeout bounds: without it an idle trunk ended its group
        after 10 minutes (and its last checkpoint with it). A call running holds the trunk
        lock and exchanges itself: then nothing is sent."""
        period = self.timeout / 4
        while not stopped.wait(max(0.05, period - (time.monotonic() - self._last_command))):
            if self.broken is not None:
                return
            if time.monotonic() - self._last_command < period:
                continue
            lock = self.engine.lock
            if not lock.acquire(blocking=False):
                continue
            try:
                commands = {rank: {"op": "alive"} for rank in range(1, self.world)}
                self._send_all(commands)
                self._receive_all(list(commands))
            except ServerUnavailable:
                return  # out of service: on_broken said so
            except Exception:  # an unreadable reply (every reply was taken): go on
                log.exception("a keep-alive exchange with the other ranks failed")
            finally:
                lock.release()

    def close(self) -> None:
        """Let the other ranks leave :meth:`follow` (rank 0, when the server stops), once no
        call is in an exchange with them (waiting at most 30 s for one that still is)."""
        lock = self.engine.lock if self.engine is not None else None
        held = lock.acquire(timeout=30) if lock is not None else False
        try:
            self._stop_followers()
        finally:
            if held and lock is not None:
                lock.release()

    def _stop_followers(self) -> None:
        if self.stopped is not None:
            self.stopped.set()
        if self.broken is None:
            for rank in range(1, self.world):
                try:
                    self.wire.send({"op": "stop"}, rank)
                except RuntimeError as exc:  # that rank is gone already
                    log.info("rank %d is gone already: %s", rank, exc)
        self.broken = "the server stopped"

    # -- the exchange ------------------------------------------------------------------------------

    def _out_of_service(self) -> str:
        return (
            f"the distributed trunk is out of service ({self.broken}): restart the torchrun "
            "server (with --checkpoint it resumes from its last checkpoint)"
        )

    def _out_of_service_now(self, why: str) -> None:
        if self.broken is None:
            self.broken = why
            log.error("the distributed trunk is out of service: %s", why)
            if self.on_broken is not None:
                self.on_broken()

    def _lost(self, exc: RuntimeError) -> ServerUnavailable:
        self._out_of_service_now(f"a rank failed: {exc}")
        return ServerUnavailable(
            f"a rank of the distributed trunk failed ({exc}); restart the torchrun server "
            "(with --checkpoint it resumes from its last checkpoint)"
        )

    def _send_all(self, commands: dict[int, Any]) -> None:
        if self.broken is not None:
            raise ServerUnavailable(self._out_of_service())
        # What rank 0 dropped since the last command travels with the next one.
        free = list(self._drain(self._to_free))
        forget = list(self._drain(self._forgotten))
        self._combined.difference_update(forget)
        try:
            for rank, command in commands.items():
                self.wire.send({**command, "free": free, "forget": forget}, rank)
        except RuntimeError as exc:
            raise self._lost(exc) from exc
        self._last_command = time.monotonic()
        self.free(free)

    def _receive_all(self, ranks: Sequence[int], *, raise_now: bool = True) -> dict[int, Any]:
        replies: dict[int, Any] = {}
        unreadable: CodecError | None = None
        try:
            for rank in ranks:
                try:
                    replies[rank] = self.wire.recv(rank)
                except CodecError as exc:  # received whole, but not readable: the next rank's
                    # reply must still be taken, or it would answer the next command
                    unreadable = unreadable or CodecError(f"rank {rank}'s reply: {exc}")
        except RuntimeError as exc:
            error = self._lost(exc)
            if raise_now:
                raise error from exc
            return {}
        if unreadable is not None:
            raise unreadable
        return replies

    def _unstoppable(self, where: str, share: Callable[[], Any]) -> Callable[[], Any]:
        """Rank 0's ``share`` of a forward or backward, as ``_exchange`` runs it.

        fsdp: each layer gathers its shards from every rank, in a backward too (a layer
        checkpointed inside the trunk runs its forward again there), so rank 0 may not stop
        between layers when its caller leaves (cancellation.py), as a one-process trunk does:
        the other ranks would wait in the next collective until the group's timeout. An
        abandoned call stops here, before any rank starts, or runs to its end. ddp: a share
        has no collectives, and stops between layers."""
        if self.mode != "fsdp":
            return share
        cancellation.check(where)

        def run() -> Any:
            with cancellation.suspended():
                return share()

        return run

    def _exchange(self, commands: dict[int, Any], run_local, *, after_backward: bool = False):
        """Send each rank its command, run rank 0's share, (sum the parameter gradients,) and
        collect the replies; returns (replies, rank 0's result, the first error or None)."""
        self._send_all(commands)
        error: BaseException | None = None
        try:
            result = run_local()
        except Exception as exc:  # noqa: BLE001 - the other ranks still wait for the reduce
            error, result = exc, None
        failed = False
        try:
            if after_backward:
                failed = self.failed_somewhere(error is not None)
        except RuntimeError as exc:
            raise self._lost(exc) from exc
        try:
            replies = self._receive_all(list(commands))
        except CodecError as exc:  # every reply was taken; the caller's error path runs
            replies, error = {}, error or exc
        for rank in sorted(replies):
            message = replies[rank].get("error")
            if message is not None and error is None:
                # A refusal keeps its class; the trunk's own failure there is a TrunkError
                # (INTERNAL), as the same failure on rank 0 is: the client sent nothing wrong.
                kind = named(replies[rank].get("kind")) or TrunkError
                error = kind(f"rank {rank}: {message}")
        if failed and error is None:
            error = TrunkError("the backward failed on another rank")
        return replies, result, error

    def failed_somewhere(self, failed: bool) -> bool:
        """After a Backward on every rank: whether it failed on some rank (then no rank
        accumulates anything)."""
        return self.ranks.any(failed)

    def combine(self, session: Any) -> None:
        # ddp: each rank holds the gradients of its shares since the last combine; one
        # all-reduce of one flat buffer makes them the whole batch's on every rank, which then
        # all take the same step. fsdp: FSDP reduce-scattered them in each backward already.
        if self.mode != "ddp" or session.key in self._combined:
            return
        present = [float(name in session.grads) for name, _ in self.params]
        union = self.ranks.max(present) if present else []
        needed = [i for i, flag in enumerate(union) if flag > 0]
        parts = []
        for i in needed:
            name, param = self.params[i]
            held = session.grads.get(name)
            parts.append(torch.zeros_like(param) if held is None else held)
        groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for position, part in enumerate(parts):  # one flat buffer per dtype and device
            groups.setdefault((part.dtype, part.device), []).append(position)
        for positions in groups.values():
            group = [parts[p] for p in positions]
            flat = torch._utils._flatten_dense_tensors(group)
            dist.all_reduce(flat)
            values = torch._utils._unflatten_dense_tensors(flat, group)
            for position, value in zip(positions, values, strict=True):
                session.grads[self.params[needed[position]][0]] = value
        self._combined.add(session.key)

    def split(self, session: Any) -> None:
        # After a combine every rank holds the whole sum; rank 0 keeps it as its part and the
        # others start again from zero, so the next combine adds each part once.
        if session.key not in self._combined:
            return
        self._combined.discard(session.key)
        if self.rank != 0:
            for grad in session.grads.values():
                grad.zero_()

    def _release(self, token: int) -> None:
        if token >= 0:
            self._to_free.append(token)

    @staticmethod
    def _drain(queue: collections.deque) -> Iterator[Any]:
        while queue:
            yield queue.popleft()

    def free(self, tokens: Sequence[int]) -> None:
        """Drop the kept graphs of these forwards (and put back a recompute's buffers)."""
        for token in tokens:
            self.graphs.pop(token, None)
            restore_buffers(self._recomputed.pop(token, []))

    # -- every rank: its share (rank 0 in its calls, the others through follower.py) ----------

    def share_leaf(self, tensor: torch.Tensor, need: bool) -> torch.Tensor:
        # detach(): a leaf of its own, not part of rank 0's input's graph.
        return tensor.to(self.device).detach().requires_grad_(need)

    def forward_share(
        self, template, leaves, training, seed, grad, token, autocast, recompute, keeps=False
    ):
        # Rank 0's engine guards its own buffers (BatchNorm statistics) and puts them back
        # after a recompute; the other ranks do the same for theirs here.
        guarded = self.rank != 0 and (training or recompute)
        kept = buffer_snapshot(self.module) if guarded else []
        try:
            # Rank 0's share views the inputs its engine keeps (``keeps``, a recompute).
            run = TrunkRunner.forward
            out_template, outputs = run(
                self,
                template,
                leaves,
                training,
                seed,
                grad=grad,
                autocast=autocast,
                recompute=recompute,
                keeps=keeps,
            )
            if guarded and not recompute:
                check_finite_buffers(floating_buffers(self.module))
        except Exception:
            restore_buffers(kept)
            raise
        if recompute:  # put back once its backward ran: the graph may have saved them
            self._recomputed[token] = kept
        if grad:
            self.graphs[token] = (outputs, leaves)
        return out_template, outputs

    def backward_share(self, token, grads, wanted, retain, parameters, zeros_for, training=None):
        self.set_mode(training)  # the forward's (see TrunkRunner.gradients)
        try:
            return self._backward_of(token, grads, wanted, retain, parameters, zeros_for)
        finally:
            if not retain:
                restore_buffers(self._recomputed.pop(token, []))

    def _backward_of(self, token, grads, wanted, retain, parameters, zeros_for):
        entry = self.graphs.get(token)
        if entry is None:
            raise InvalidRequest(f"no kept forward {token} on rank {self.rank}")
        outputs, leaves = entry
        if not retain:
            del self.graphs[token]
        if grads is None:  # FSDP: this rank ran only for the collectives
            grads = [None] * len(outputs)
            for index in zeros_for:
                grads[index] = torch.zeros_like(outputs[index])
        inputs = [leaves[i] for i in wanted]
        if self.mode != "fsdp":
            return TrunkRunner.gradients(
                self, outputs, grads, inputs, retain_graph=retain, parameters=parameters
            )
        # FSDP gathers each layer's weights for its backward and reduce-scatters the gradients
        # of those gathered weights into the sharded parameters' .grad: only backward() (not
        # autograd.grad) accumulates them.
        targets, grad_outputs = self._grad_pairs(outputs, grads)
        if targets:
            torch.autograd.backward(targets, grad_outputs, retain_graph=retain)
        input_grads = [leaf.grad for leaf in inputs]
        for leaf in leaves:
            leaf.grad = None
        param_grads = [p.grad if parameters else None for _, p in self.params]
        for _, param in self.params:
            param.grad = None
        return input_grads, param_grads


def _device(options: ServerOptions) -> torch.device:
    device = torch.device(options.device)
    if device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def serve_distributed(
    module: nn.Module,
    address: str,
    options: ServerOptions,
    mode: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> Any:
    """Under torchrun: join the process group; rank 0 starts and returns the trunk server,
    the other ranks follow its commands and return None once it stops."""
    from .codec import DTYPES
    from .engine import TrunkEngine
    from .server import TrunkServer

    if mode not in PARALLEL_MODES:
        raise SystemExit(f"--parallel must be one of {', '.join(PARALLEL_MODES)}, got {mode!r}")
    if "RANK" not in os.environ:
        raise SystemExit(
            "--parallel needs torchrun: torchrun --nproc-per-node N -m remote_autograd serve ..."
        )
    device = _device(options)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not timeout > 0:
        raise SystemExit(f"--dist-timeout must be a positive number of seconds, got {timeout}")
    delta = datetime.timedelta(seconds=timeout)
    dist.init_process_group(backend, timeout=delta)
    control = dist.new_group(backend="gloo", timeout=delta) if backend != "gloo" else None
    dtype = DTYPES[options.dtype] if options.dtype else None
    runner = DistributedRunner(
        module, device, dtype, mode=mode, control=control, limits=options.limits, timeout=timeout
    )
    if runner.rank != 0:
        # Rank 0 enforces the limits and drops sessions; this rank keeps what it is told to.
        options = dataclasses.replace(
            options,
            max_sessions=_UNLIMITED,
            max_sessions_per_identity=_UNLIMITED,
            session_ttl=float(_UNLIMITED),
        )
    runner.engine = engine = TrunkEngine(module, options, runner=runner)  # loads the checkpoint
    if runner.rank != 0:
        log.info("rank %d of %d following rank 0", runner.rank, runner.world)
        # torchrun passes a stop to every rank at once; rank 0 ends the group itself (after a
        # last checkpoint, which needs every rank), so the others wait for its word.
        for stop in (signal.SIGTERM, signal.SIGINT):
            signal.signal(stop, signal.SIG_IGN)
        try:
            Follower(runner).serve()
        finally:
            dist.destroy_process_group()
        return None
    server = TrunkServer(engine, address).start()
    stopped = threading.Event()
    keeper = threading.Thread(target=runner.keep_alive, args=(stopped,), name="ra-keep-alive")
    keeper.daemon = True
    keeper.start()
    runner.stopped = stopped  # close() ends the keep-alive
    log.info("rank 0 of %d serves the trunk (%s, %s)", runner.world, mode, backend)
    return server
