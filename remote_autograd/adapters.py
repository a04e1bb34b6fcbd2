"""Many clients, one frozen trunk: every client identity trains its own LoRA adapter.

:class:`AdapterEngine` is another engine behind the same service (service.py): it keeps one
copy of the base trunk's weights, frozen, and gives every authenticated identity (a bearer
token's fingerprint and, under mutual TLS, the certificate's name) an adapter of its own,
created on the identity's first call that needs it.

An adapter is a replica of the trunk's module tree that *shares* the base's parameters and
non-persistent buffers (no copy), holds its own copy of the persistent buffers (BatchNorm
statistics, which a training forward moves and LoadState may set: one client's must not reach
another's) and its own peft LoRA layers, served by its own
:class:`~remote_autograd.engine.TrunkEngine`: its own lock, weights version, step turns,
and its sessions' gradients, optimizers and step counters. So one client's Backward and Step
never touch another's adapter, a kept graph references only its own adapter's parameters,
and calls of different clients do not wait for one another's lock. Each identity's adapter
behaves exactly as a single-tenant server whose only client is that identity (every adapter
starts from the same initial weights, those a ``build_trunk`` with the same LoRA options and
seed draws).

What is shared, and bounded server-wide: the session table (``max_sessions``), the forward
contexts (``max_contexts``, ``max_context_bytes``, and their per-identity limits), the number of
adapters
(``AdapterOptions.max_adapters``). An adapter idle for ``offload_after`` seconds (or beyond
``max_resident_adapters``) moves with its gradients and optimizer state to
``offload_device`` and comes back on its next call; every adapter goes to disk with the
server's checkpoint.

Dropout draws from the process-wide generator: forwards in training mode of a trunk that
draws (dropout layers, Hugging Face's functional attention dropout, RReLU, stochastic depth:
each adapter's first training forward finds out, under the lock) take one lock
(``_random_lock``) so that each client's seeded masks stay its own, as does creating an
adapter (peft draws its initial weights); eval-mode forwards are not seeded. Without dropout,
or in eval mode, forwards of different clients run at the same time.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import cancellation, checkpoint_file
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
from .engine import ID_PATTERN, CheckpointPace, TrunkEngine, paced_checkpoint, saved_weights_id
from .errors import InvalidRequest, LimitExceeded, NotConfigured, TrunkError
from .fingerprint import batch_statistics, persistent_buffers, trunk_dtype, trunk_fingerprint
from .guard import StepBackup, check_finite_weights
from .options import ServerOptions
from .runner import TrunkRunner
from .sessions import Session, SessionTable, session_key
from .tree import flatten
from .validate import clone_tree

__all__ = [
    "ADAPTER_NAME",
    "AdapterEngine",
    "AdapterOptions",
    "from_peft_names",
    "to_peft_names",
]

log = logging.getLogger(__name__)

ADAPTER_NAME = "default"  # peft's adapter name on the server; downloads leave it out
_ADAPTER_KEY = re.compile(r"\.(lora_[A-Za-z_]+)\." + ADAPTER_NAME + r"\.")
_PEFT_KEY = re.compile(r"\.(lora_[A-Za-z_]+)\.(weight|bias)$")


@dataclass(frozen=True)
class AdapterOptions:
    """The adapters of a per-client server (``serve --adapters per-client``)."""

    rank: int = 8  # r of every client's LoRA adapters
    alpha: int = 16  # scaling numerator: updates are scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapters' input
    target_modules: tuple[str, ...] = ()  # names of the modules to adapt (required)
    seed: int = 0  # seed of the adapters' initial weights, the same for every client
    max_adapters: int = 64  # adapters (client identities) this server holds at most
    max_resident_adapters: int = 0  # adapters on the trunk's device at once (0: no limit);
    # idle ones beyond it move to offload_device
    offload_after: float = 300.0  # an adapter idle this many seconds moves to offload_device
    # with its gradients and optimizer state (0: never)
    offload_device: str = "cpu"  # where idle adapters wait
    # Whether training forwards take the random lock (docs/adapters.md, Concurrency): None
    # finds out, True always (a trunk that draws in a way neither seen nor watched), False never
    lock_forwards: bool | None = None

    def check(self) -> None:
        """Refuse options that cannot work, naming the option."""
        if self.rank < 1:
            raise ValueError(f"AdapterOptions.rank (--lora-rank) must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"AdapterOptions.alpha (--lora-alpha) must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(
                f"AdapterOptions.dropout (--lora-dropout) must be in [0, 1), got {self.dropout}"
            )
        if not self.target_modules:
            raise ValueError(
                "AdapterOptions.target_modules (--lora-targets) must name the modules to adapt"
            )
        if self.max_adapters < 1:
            raise ValueError(f"AdapterOptions.max_adapters must be >= 1, got {self.max_adapters}")
        if self.max_resident_adapters < 0 or self.offload_after < 0:
            raise ValueError(
                "AdapterOptions.max_resident_adapters and offload_after must be >= 0 "
                f"(0 turns them off), got {self.max_resident_adapters}, {self.offload_after}"
            )
        # Checked here, not at the first offload: that failed in another client's call. (No
        # tensor is made: that would start CUDA in whatever process builds the options.)
        try:
            device = torch.device(self.offload_device)
        except RuntimeError as exc:
            raise ValueError(
                f"AdapterOptions.offload_device must be a device, got {self.offload_device!r}: "
                f"{exc}"
            ) from exc
        backend: Any = getattr(torch, device.type, None)  # torch.cuda, torch.xpu, torch.mps...
        if device.type != "cpu" and (
            not hasattr(backend, "is_available")
            or not backend.is_available()
            or (device.index or 0) >= getattr(backend, "device_count", lambda: 1)()
        ):
            raise ValueError(
                f"AdapterOptions.offload_device must be a device this machine has, got "
                f"{self.offload_device!r}"
            )


def to_peft_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trunk's LoRA parameters under peft's saved names (the adapter name left out), as
    ``get_peft_model_state_dict`` writes them and ``set_peft_model_state_dict`` reads them."""
    return {_ADAPTER_KEY.sub(r".\1.", name): t for name, t in state.items() if "lora_" in name}


def from_peft_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's saved names back to the trunk's parameter names (the server's adapter name)."""
    renamed = {}
    for name, tensor in state.items():
        if not isinstance(name, str) or not _PEFT_KEY.search(name):
            raise InvalidRequest(
                f"an adapter state dict holds LoRA weights named like '...lora_A.weight' "
                f"(peft's saved names), got {str(name)[:80]!r}"
            )
        renamed[_PEFT_KEY.sub(rf".\1.{ADAPTER_NAME}.\2", name)] = tensor
    return renamed


class _AdapterRunner(TrunkRunner):
    """A runner over a replica whose base tensors are already on the device (they are the
    shared ones: moving them per replica would copy them), taking the process-wide random
    lock around training forwards of a trunk that draws from the process-wide generators.

    A trunk whose layers say they draw (:func:`_draws_randomness`) takes the lock for every
    training forward. Any other is watched: its first seeded training forward of a batch that
    is not empty runs under the lock, and looks whether the generators moved from where the
    seed put them (a layer of the user's that calls torch.rand). Looking alone would not do: a
    trunk that seeds its own dropout inside ``fork_rng`` (the trainer's GPT-2 trunk) leaves
    the generator where it found it. Forwards of a trunk that draws nothing are not seeded."""

    def __init__(
        self,
        module: nn.Module,
        device: torch.device,
        dtype: torch.dtype | None,
        random_lock: threading.Lock,
    ) -> None:
        self.device = device
        self.dtype = dtype
        self.module = module
        self.module_name = type(module).__name__
        self.params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self._random_lock = random_lock
        # Whether a training forward draws (None: not known yet, watched at the next one).
        self.draws: bool | None = True if _draws_randomness(module) else None
        self.lock: bool | None = None  # AdapterOptions.lock_forwards: forced either way
        if not module.training:
            module.eval()  # peft makes its layers (their dropout) in training mode under it
        self.note_modes()

    def forward(
        self,
        template: Any,
        leaves: list[torch.Tensor],
        training: bool,
        seed: int | None,
        **flags: Any,
    ) -> tuple[Any, list[torch.Tensor]]:
        locked = False
        if not training or (self.draws is False and self.lock is None):
            # Nothing to draw; seeding would set the process-wide generator under another
            # client's training forward, between two of its dropout layers.
            seed = None
        elif seed is not None and (self.lock or (self.lock is None and self.draws is not False)):
            locked = True
        with self._random_lock if locked else contextlib.nullcontext():
            return super().forward(template, leaves, training, seed, **flags)

    def _call_seeded(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        if self.draws is not None:
            return self.module(*args, **kwargs)
        seeded = _generator_states(self.device)
        result = self.module(*args, **kwargs)
        moved = _generator_states(self.device)
        if not all(map(torch.equal, seeded, moved)):
            self.draws = True
        elif any(t.numel() for t in flatten((args, kwargs))[1]):
            self.draws = False  # not from an empty batch, which dropout draws nothing for
        return result


# Config fields of the heads a split trunk does not hold (GPT-2's summary_first_dropout,
# GPT-NeoX's classifier_dropout): a dropout there is drawn by no trunk forward.
_HEAD_FIELDS = ("summary_", "classifier_")
_DROP_NAMES = ("dropout", "pdrop", "drop_prob", "drop_path")


def _draws_randomness(module: nn.Module) -> bool:
    """Whether a training forward surely draws from the process-wide generators: dropout layers
    with p > 0, RReLU, and the functional dropout or stochastic depth a layer applies from a
    float attribute of its own or of its config above 0 (Llama's ``attention_dropout``,
    GPT-2's ``attn_pdrop``, timm's ``drop_prob``)."""
    for layer in module.modules():
        if isinstance(layer, nn.RReLU):
            return True
        if isinstance(layer, nn.modules.dropout._DropoutNd):
            if layer.p > 0:
                return True
            continue
        config = getattr(layer, "config", None)
        for source in (vars(layer), vars(config) if hasattr(config, "__dict__") else {}):
            for key, value in source.items():
                if key.startswith(_HEAD_FIELDS) or type(value) is not float or value <= 0:
                    continue
                if any(name in key for name in _DROP_NAMES):
                    return True
    return False


def _adapted_attention(module: nn.Module) -> list[str]:
    """The nn.MultiheadAttention layers given an adapter, and their out_proj layers given one.

    peft adds an attention's adapter into the base weights before each forward and takes it
    out after, registering new weight tensors: every client would get its own copy of the
    base, drifting ((w + d) - d != w) and kept in no checkpoint. And the attention reads its
    out_proj's weight without calling the layer, so an adapter there would never run."""
    from peft.tuners.lora.layer import LoraLayer  # the hf extra

    names = []
    for name, layer in module.named_modules():
        if isinstance(layer, LoraLayer):
            if isinstance(layer.get_base_layer(), nn.MultiheadAttention):
                names.append(name)
        elif isinstance(layer, nn.MultiheadAttention) and isinstance(layer.out_proj, LoraLayer):
            names.append(f"{name}.out_proj")
    return names


def _generator_states(device: torch.device) -> list[torch.Tensor]:
    states = [torch.default_generator.get_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


@dataclass(eq=False)
class _Adapter:
    """One identity's adapter: its engine, calls in flight, where its tensors are."""

    identity: str
    engine: TrunkEngine
    last_used: float = dataclasses.field(default_factory=time.monotonic)
    calls: int = 0  # calls using it right now (it cannot move meanwhile)
    resident: bool = True  # on the trunk's device (False: on offload_device)


def _identity(session: Session) -> str:
    # A session key is "identity/session id", and a session id holds no "/".
    return session.key.rpartition("/")[0]


class AdapterEngine:
    """Serves one frozen ``nn.Module`` with a LoRA adapter per client identity.

    Speaks the same plain calls as :class:`~remote_autograd.engine.TrunkEngine`, so
    :class:`~remote_autograd.server.TrunkServer` and the service take either.
    """

    def __init__(
        self,
        module: nn.Module,
        options: ServerOptions | None = None,
        adapters: AdapterOptions | None = None,
    ) -> None:
        self.options = options = options or ServerOptions()
        self.adapter_options = adapters = adapters or AdapterOptions()
        adapters.check()
        self._device = torch.device(options.device)
        self._dtype = DTYPES[options.dtype] if options.dtype else None
        module.requires_grad_(False)
        # Drawn before the base is cast, as a single-tenant trunk's adapters are: every client
        # starts from these values (in the trunk's dtype), whatever the server's dtype.
        self._initial = self._initial_adapter(module)
        # The base, moved and cast once; replicas share its tensors from then on.
        self.runner = TrunkRunner(module, self._device, self._dtype)
        self.base = self.runner.module
        self.recipe = self._recipe()  # what the adapters' values mean, kept with them
        self._offload_device = torch.device(adapters.offload_device)
        self._sub_options = dataclasses.replace(
            options, checkpoint_path=None, checkpoint_every=0, checkpoint_interval=0.0
        )
        self.contexts = ContextCache(
            max_contexts=options.max_contexts,
            max_bytes=options.max_context_bytes,
            ttl=options.context_ttl,
            max_per_session=options.max_session_contexts,
            max_per_identity=options.max_identity_contexts,
            max_identity_bytes=options.max_identity_context_bytes,
            on_drop=self._context_dropped,
        )
        self.sessions = SessionTable(
            max_sessions=options.max_sessions,
            max_per_identity=options.max_sessions_per_identity,
            ttl=options.session_ttl,
            on_drop=self._end_session,
        )
        self.session_listeners: list[Callable[[str], None]] = []
        self.server_id = uuid.uuid4().hex[:16]
        self.saved_version: int | None = None
        self._adapters: dict[str, _Adapter] = {}
        self._lock = threading.Lock()  # the adapter table and residency
        self._random_lock = threading.Lock()  # forwards drawing from the global generator
        self._checkpoint_lock = threading.Lock()
        self.checkpoint_pace = CheckpointPace(options.min_checkpoint_interval)
        self._steps = 0  # Steps applied, all adapters together (for checkpoint_every)
        if not options.tokens and not options.client_ca:
            log.warning(
                "per-client adapters without tokens or mutual TLS: every client is "
                "'anonymous' and all of them train one adapter (serve --token-file)"
            )
        # Now, not when the service installs them: the replicas restored below copy the hooks.
        cancellation.install(self.base)
        if options.checkpoint_path:
            self._restore(options.checkpoint_path)

    def _recipe(self) -> dict[str, Any]:
        """The LoRA options a trained adapter's values depend on, and a digest of the frozen
        base they were trained on (of up to 4096 evenly spaced values per tensor, in the
        served dtype: cheap on any model, and another seed or checkpoint of the base differs)."""
        digest = hashlib.blake2b(digest_size=16)
        for name, tensor in [*self.base.named_parameters(), *persistent_buffers(self.base)]:
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)].cpu()
            if sample.is_quantized:
                sample = sample.dequantize()
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            digest.update(sample.contiguous().view(torch.uint8).numpy().tobytes())
        options = self.adapter_options
        return {
            "rank": options.rank,
            "alpha": options.alpha,
            "dropout": options.dropout,
            "target_modules": sorted(options.target_modules),
            "dtype": str(trunk_dtype(self.base)),  # the base as served (ServerOptions.dtype)
            "base": digest.hexdigest(),
        }

    # -- replicas -------------------------------------------------------------------------------

    def _replica(self, base: nn.Module) -> nn.Module:
        """The module tree of ``base`` again, sharing every parameter and non-persistent
        buffer; the persistent buffers are copied (the replica's own statistics)."""
        own = {id(t) for _, t in persistent_buffers(base)}
        shared: dict[int, Any] = {
            id(t): t for t in (*base.parameters(), *base.buffers()) if id(t) not in own
        }
        return copy.deepcopy(base, shared)

    def _inject(self, module: nn.Module) -> nn.Module:
        from peft import inject_adapter_in_model  # the hf extra

        from .hf.lora import lora_config

        options = self.adapter_options
        targets = set(options.target_modules)
        config = lora_config(
            module, targets, rank=options.rank, alpha=options.alpha, dropout=options.dropout
        )
        try:
            module = inject_adapter_in_model(config, module, adapter_name=ADAPTER_NAME)
        except ValueError as exc:
            what = (
                "a target module is not a layer LoRA adapts (Linear, Conv, Embedding...)"
                if "is not supported" in str(exc)
                else f"none of the target modules {sorted(targets)} is in the trunk"
            )
            raise ValueError(
                f"per-client adapters: {what} ({exc}); change AdapterOptions.target_modules "
                "(--lora-targets)"
            ) from exc
        attention = _adapted_attention(module)
        if attention:
            raise ValueError(
                f"per-client adapters cannot adapt nn.MultiheadAttention ({', '.join(attention)}):"
                " peft merges its adapter into the shared frozen weights at every forward, and "
                "the attention reads its out_proj's weight without calling it; adapt Linear "
                "layers in AdapterOptions.target_modules (--lora-targets)"
            )
        return module

    def _initial_adapter(self, base: nn.Module) -> dict[str, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.adapter_options.seed)
            replica = self._inject(self._replica(base))
        # What every client trains: the base with one adapter (the trainer's own trunk).
        self.fingerprint = trunk_fingerprint(replica)
        self._batch_statistics = batch_statistics(replica)  # what Info says (runner.py)
        return {n: p.detach().clone() for n, p in replica.named_parameters() if p.requires_grad}

    def _new_adapter(self, identity: str) -> _Adapter:
        # peft initialises the new layers from the process-wide generator (then overwritten
        # below): not while another client's forward draws its dropout masks from it.
        with self._random_lock, torch.random.fork_rng(devices=[]):
            module = self._inject(self._replica(self.base))
        named = dict(module.named_parameters())
        with torch.no_grad():
            for name, value in self._initial.items():
                param = named[name]
                param.data = value.to(self._device, self._dtype or value.dtype).clone()
        runner = _AdapterRunner(module, self._device, self._dtype, self._random_lock)
        runner.lock = self.adapter_options.lock_forwards
        engine = TrunkEngine(module, self._sub_options, runner=runner)
        engine.contexts = self.contexts  # one cache, bounded server-wide
        engine.sessions = self.sessions  # one table: a Step sees its session end
        engine.server_id = self.server_id  # what clients see in every reply
        log.info("adapter created for client %s (%d adapters)", identity, len(self._adapters) + 1)
        return _Adapter(identity, engine)

    # -- sessions and routing -------------------------------------------------------------------

    def session(self, identity: str, session_id: str) -> Session:
        """The session ``session_id`` of ``identity`` (its adapter is made on first need)."""
        if not ID_PATTERN.fullmatch(session_id):
            raise InvalidRequest(
                f"a session id must be 1-64 characters of [0-9A-Za-z_-], got {session_id[:80]!r}"
            )
        return self.sessions.get(session_key(identity, session_id))

    @property
    def module(self) -> nn.Module:
        """The frozen base; every adapter's replica is a copy of its module tree (hooks too)."""
        return self.base

    def end_session(self, identity: str, session_id: str) -> bool:
        """The client closed: drop its session now (False if it had none); its adapter stays."""
        return self.sessions.drop(session_key(identity, session_id))

    def _end_session(self, key: str) -> None:
        self.contexts.drop_session(key)
        adapter = self._adapters.get(key.rpartition("/")[0])
        if adapter is not None:
            adapter.engine.turns.forget(key)
        for listener in self.session_listeners:
            listener(key)

    def _context_dropped(self, context: ForwardContext) -> None:
        adapter = self._adapters.get(context.session.rpartition("/")[0])
        if adapter is not None:
            adapter.engine.turns.end_context(context)

    @contextmanager
    def _use(self, session: Session) -> Iterator[TrunkEngine]:
        """The engine of the session's identity, created or brought back to the device."""
        identity = _identity(session)
        with self._lock:
            adapter = self._adapters.get(identity)
            if adapter is None:
                limit = self.adapter_options.max_adapters
                if len(self._adapters) >= limit:
                    raise LimitExceeded(
                        f"server already holds max_adapters={limit} client adapters "
                        "(AdapterOptions.max_adapters, serve --max-adapters)"
                    )
                adapter = self._adapters[identity] = self._new_adapter(identity)
            if not adapter.resident:
                self._move(adapter, self._device, resident=True)
            adapter.calls += 1  # after the move: a move that fails leaves no call counted
            adapter.last_used = time.monotonic()
            try:
                self._offload_beyond_limit()
            except Exception:  # noqa: BLE001 - others' adapters: not this call's failure
                log.exception("moving idle adapters off the device failed; they stay on it")
        try:
            yield adapter.engine
        finally:
            with self._lock:
                adapter.calls -= 1
                adapter.last_used = time.monotonic()

    def _sessions_of(self, identity: str) -> list[Session]:
        return [s for s in self.sessions.values() if s.key.rpartition("/")[0] == identity]

    # -- residency ------------------------------------------------------------------------------

    def _move(self, adapter: _Adapter, device: torch.device, *, resident: bool) -> None:
        """Move an adapter with its sessions' gradients and optimizer state (caller: _lock,
        and no call of the adapter in flight but the caller's own)."""
        adapter.engine.step_backup.forget()  # `param.data =` below leaves no version behind
        with torch.no_grad():
            for _, param in adapter.engine.params:
                param.data = param.data.to(device)
            for _, buffer in persistent_buffers(adapter.engine.module):
                buffer.data = buffer.data.to(device)
        for session in self._sessions_of(adapter.identity):
            with session.lock:
                for name, grad in session.grads.items():
                    session.grads[name] = grad.to(device)
                if session.optimizer is not None:
                    for state in session.optimizer.state.values():
                        for key, value in state.items():
                            # Scalars (Adam's step) stay where the optimizer keeps them.
                            if isinstance(value, torch.Tensor) and value.dim() > 0:
                                state[key] = value.to(device)
        if not resident:  # the copies a Step takes: as large as the weights and their state
            adapter.engine.step_backup = StepBackup()
        adapter.resident = resident
        log.debug("adapter of %s moved to %s", adapter.identity, device)

    def _idle(self, adapter: _Adapter, busy: set[str]) -> bool:
        return adapter.resident and adapter.calls == 0 and adapter.identity not in busy

    def _busy_identities(self) -> set[str]:
        """Identities with a forward still waiting for its first Backward."""
        return {
            c.session.rpartition("/")[0] for c in self.contexts.snapshot() if c.backward_seq == 0
        }

    def _offload(self, adapter: _Adapter) -> None:
        # Contexts already answered still hold graphs on the device: drop them (a later
        # Backward on one is recomputed by the client, see ClientOptions.recover_contexts).
        for session in self._sessions_of(adapter.identity):
            self.contexts.drop_session(session.key, ended=False)
        self._move(adapter, self._offload_device, resident=False)

    def _offload_beyond_limit(self) -> None:
        limit = self.adapter_options.max_resident_adapters
        resident = [a for a in self._adapters.values() if a.resident]
        if not limit or len(resident) <= limit:
            return
        busy = self._busy_identities()
        for adapter in sorted(resident, key=lambda a: a.last_used):
            if len(resident) <= limit:
                break
            if self._idle(adapter, busy):
                self._offload(adapter)
                resident.remove(adapter)

    def offload_idle(self, *, older_than: float | None = None) -> int:
        """Move adapters idle for ``older_than`` seconds (default ``offload_after``) off the
        device; returns how many moved. The sweeper calls this through :meth:`expire`."""
        after = self.adapter_options.offload_after if older_than is None else older_than
        moved = 0
        with self._lock:
            busy = self._busy_identities()
            deadline = time.monotonic() - after
            for adapter in list(self._adapters.values()):
                if self._idle(adapter, busy) and adapter.last_used <= deadline:
                    self._offload(adapter)
                    moved += 1
        return moved

    # -- the calls of TrunkEngine ------------------------------------------------------------------

    def info(self, identity: str | None = None) -> TrunkInfo:
        """The trunk as ``identity``'s adapter makes it: its weights version is that adapter's
        (0 before it exists), so a new run meeting a trained adapter is warned
        (SteppedTrunkWarning), as on a single-tenant server."""
        # Not under the table's lock, which a new client's adapter holds while it waits for
        # another's dropout forward: one lookup is atomic.
        adapter = self._adapters.get(identity) if identity is not None else None
        return TrunkInfo(
            trainable_parameters=list(self._initial),
            trainable_numel=sum(t.numel() for t in self._initial.values()),
            device=str(self._device),
            module_name=type(self.base).__name__,
            server_id=self.server_id,
            fingerprint=self.fingerprint,
            weights_version=adapter.engine.weights_version if adapter is not None else 0,
            buffers=[name for name, _ in persistent_buffers(self.base)],  # each adapter's own
            dtype=trunk_dtype(self.base),
            batch_statistics=self._batch_statistics,
        )

    def compute(self, session: Session, call: ComputeCall, value: Any) -> ComputeResult:
        with self._use(session) as engine:
            return engine.compute(session, call, value)

    def backward(self, session: Session, call: BackwardCall, value: Any) -> BackwardResult:
        with self._use(session) as engine:
            return engine.backward(session, call, value)

    def release(self, session: Session, request_ids: list[str]) -> int:
        return self.contexts.release(session.key, request_ids) if request_ids else 0

    def configure_optimizer(
        self,
        session: Session,
        name: str,
        options: dict[str, Any],
        groups: list[dict[str, Any]] | None = None,
        optimizer_id: str = "",
    ) -> list[dict[str, Any]]:
        with self._use(session) as engine:
            return engine.configure_optimizer(session, name, options, groups, optimizer_id)

    def grad_norms(
        self, session: Session, call: GradNormCall
    ) -> tuple[list[float], list[torch.dtype]]:
        with self._use(session) as engine:
            return engine.grad_norms(session, call)

    def step(self, session: Session, call: StepCall) -> StepResult:
        with self._use(session) as engine:
            result = engine.step(session, call)
        if not result.replayed:
            with self._lock:
                self._steps += 1
                every = self.options.checkpoint_every
                due = every and self.options.checkpoint_path and self._steps % every == 0
            if due:
                self.checkpoint(on_error="log")
        return result

    def get_state(
        self, session: Session, *, parameters: bool, optimizer: bool, buffers: bool = False
    ) -> dict[str, Any]:
        with self._use(session) as engine:
            return engine.get_state(
                session, parameters=parameters, optimizer=optimizer, buffers=buffers
            )

    def load_state(self, session: Session, state: Any) -> tuple[int, bool, int]:
        with self._use(session) as engine:
            loaded = engine.load_state(session, state)
        if any(loaded) and self.options.checkpoint_every and self.options.checkpoint_path:
            # As a single trunk keeps what was loaded (its engine's _load_state): a restart
            # would otherwise go back to the adapter before the load.
            self.checkpoint(on_error="log")
        return loaded

    # -- checkpoints ------------------------------------------------------------------------------

    @property
    def weights_version(self) -> int:
        """Steps and loads applied, all adapters together (only ever grows)."""
        return sum(a.engine.weights_version for a in list(self._adapters.values()))

    def checkpoint(self, *, on_error: str = "raise") -> int:
        """Save every adapter with its sessions' optimizers to ``checkpoint_path``; each
        adapter is a consistent snapshot (no Step of it runs while it is copied)."""
        path = self.options.checkpoint_path
        if not path:
            raise NotConfigured("this server has no checkpoint path (serve --checkpoint FILE)")
        with self._checkpoint_lock:
            with self._lock:
                adapters = list(self._adapters.values())
            saved: dict[str, Any] = {}
            version = 0
            for adapter in adapters:
                engine = adapter.engine
                with engine._lock:  # no Step of this adapter between its tensors
                    sessions = engine.saved_sessions(self._sessions_of(adapter.identity))
                    saved[adapter.identity] = {
                        "weights_version": engine.weights_version,
                        "weights_id": engine.weights_id,
                        "parameters": {n: p.detach().cpu().clone() for n, p in engine.params},
                        "buffers": {
                            n: b.cpu().clone() for n, b in persistent_buffers(engine.module)
                        },
                        "sessions": clone_tree(sessions),
                    }
                    version += engine.weights_version
            state = {
                "kind": "adapters",
                "weights_version": version,
                "adapters": saved,
                "recipe": self.recipe,
            }
            try:
                for entry in saved.values():
                    check_finite_weights(entry["parameters"])
            except TrunkError as exc:
                if on_error == "raise":
                    raise
                log.error("checkpoint of the adapters to %s skipped: %s", path, exc)
                return self.saved_version or 0
            try:
                checkpoint_file.save_checkpoint(path, state)
            except OSError:
                if on_error == "raise":
                    raise
                log.exception("could not save the checkpoint to %s; training goes on", path)
                return self.saved_version or 0
            self.saved_version = version
        log.debug("checkpoint of %d adapters saved to %s", len(saved), path)
        return version

    def requested_checkpoint(self, session: Session) -> int:
        """The Checkpoint RPC (:func:`~remote_autograd.engine.paced_checkpoint`); the caller's
        own adapter's version, not all adapters' steps (what other clients did)."""
        paced_checkpoint(self)
        with self._lock:
            adapter = self._adapters.get(_identity(session))
        return adapter.engine.weights_version if adapter is not None else 0

    def save_if_changed(self) -> None:
        """A checkpoint when some adapter moved since the last one (and a path is set)."""
        if self.options.checkpoint_path and self.saved_version != self.weights_version:
            self.checkpoint(on_error="log")

    def _restore(self, path: str) -> None:
        checkpoint_file.remove_temporaries(path)  # left by writes killed mid-way
        state = checkpoint_file.load_checkpoint(path)
        if state is None:
            log.info("no checkpoint at %s yet: every client starts a new adapter", path)
            return
        if state.get("kind") != "adapters":
            raise ValueError(
                f"{path} is a single-trunk checkpoint, not one of per-client adapters; point "
                "--checkpoint elsewhere"
            )
        self._check_recipe(path, state.get("recipe"))
        saved_adapters = state["adapters"]
        if len(saved_adapters) > self.adapter_options.max_adapters:
            raise ValueError(
                f"{path} holds {len(saved_adapters)} adapters, more than max_adapters="
                f"{self.adapter_options.max_adapters}: raise --max-adapters"
            )
        try:  # all checked and built before anything is loaded, as a single trunk's
            self.sessions.check_room(
                k for saved in saved_adapters.values() for k in saved["sessions"]
            )
            built = [
                (identity, saved, *self._restored_adapter(path, identity, saved))
                for identity, saved in saved_adapters.items()
            ]
        except (InvalidRequest, TrunkError) as exc:
            raise ValueError(
                f"checkpoint {path} cannot be restored, and nothing of it was loaded: {exc}"
            ) from exc
        for identity, saved, adapter, sessions in built:
            buffers = dict(persistent_buffers(adapter.engine.module))
            named = dict(adapter.engine.params)
            with torch.no_grad():
                for name, value in saved["parameters"].items():
                    named[name].copy_(value)
                for name, value in saved.get("buffers", {}).items():  # none before session 7
                    if name in buffers:
                        buffers[name].copy_(value)
            adapter.engine.weights_version = int(saved["weights_version"])
            adapter.engine.weights_id = saved_weights_id(saved)
            for key, give in sessions.items():
                give(self.sessions.get(key))
            self._adapters[identity] = adapter
        self.saved_version = self.weights_version
        with self._lock:  # all were made resident: not beyond max_resident_adapters
            self._offload_beyond_limit()
        log.info("resumed %d client adapters from checkpoint %s", len(saved_adapters), path)

    def _restored_adapter(
        self, path: str, identity: str, saved: dict[str, Any]
    ) -> tuple[_Adapter, dict[str, Callable[[Session], None]]]:
        """A new adapter for a saved one, checked, and its sessions built (nothing loaded)."""
        adapter = self._new_adapter(identity)
        named = dict(adapter.engine.params)
        if set(saved["parameters"]) != set(named) or any(
            value.shape != named[name].shape for name, value in saved["parameters"].items()
        ):
            raise ValueError(
                f"{path}: the adapter of {identity} does not fit these LoRA options "
                "(other rank or target modules); start with the options it was saved with"
            )
        sessions = {
            key: adapter.engine.restored_session(entry) for key, entry in saved["sessions"].items()
        }
        return adapter, sessions

    def _check_recipe(self, path: str, saved: Any) -> None:
        """Refuse adapters trained with another alpha, rank or targets, or on another base:
        they would load (same shapes) and compute something else without a word."""
        if not isinstance(saved, dict):  # saved before session 11: shapes are all it checks
            log.warning("%s says nothing of the LoRA options or base it was trained with", path)
            return
        now = self.recipe
        keys = ("rank", "alpha", "target_modules", "dtype")
        differ = [key for key in keys if key in saved and saved[key] != now[key]]
        if differ:
            raise ValueError(
                f"{path}: its adapters were trained with "
                + ", ".join(f"{key}={saved.get(key)!r}" for key in differ)
                + ", this server has "
                + ", ".join(f"{key}={now[key]!r}" for key in differ)
                + ": start with the options they were trained with (--lora-rank, --lora-alpha, "
                "--lora-targets, --dtype)"
            )
        if saved.get("base") != now["base"]:
            raise ValueError(
                f"{path}: its adapters were trained on another base trunk (its weights differ "
                "from this server's): serve the base they were trained on"
            )
        if saved.get("dropout") != now["dropout"]:
            log.warning(
                "%s: adapters trained with LoRA dropout %s go on with %s",
                path,
                saved.get("dropout"),
                now["dropout"],
            )

    # -- housekeeping -----------------------------------------------------------------------------

    def expire(self) -> None:
        """Drop idle contexts and sessions, move idle adapters off the device (the sweeper)."""
        self.contexts.expire()
        self.sessions.expire()
        if self.adapter_options.offload_after > 0:
            self.offload_idle()

    def stats(self) -> dict[str, int]:
        """Counts for tests and operators: contexts, sessions, adapters (and resident ones)."""
        with self._lock:
            adapters = list(self._adapters.values())
        return {
            "contexts": len(self.contexts),
            "context_bytes": self.contexts.nbytes,
            "sessions": len(self.sessions),
            "weights_version": self.weights_version,
            "adapters": len(adapters),
            "resident_adapters": sum(a.resident for a in adapters),
        }
