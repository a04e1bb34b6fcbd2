"""The trunk ``nn.Module`` on its device: forwards (seeded, cast) and their gradients.

:class:`TrunkRunner` is the part of the engine that touches the module itself; the engine
(engine.py) decides when it runs, under which lock, and what is kept. A trunk sharded or
replicated over several processes is another runner with the same methods.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from . import checkpoint_file, memory
from .errors import InvalidRequest
from .fingerprint import batch_statistics
from .ranks import ONE, Ranks
from .tree import flatten, unflatten
from .validate import describe

__all__ = ["TrunkRunner", "check_dtype"]

_UNCHANGED = contextlib.nullcontext()


def _grad_mode(enabled: bool) -> contextlib.AbstractContextManager:
    """enable_grad()/no_grad(), or nothing when the thread is in that mode already (gRPC's
    worker threads run in grad mode: a training forward needs no switch)."""
    if torch.is_grad_enabled() == enabled:
        return _UNCHANGED
    return torch.set_grad_enabled(enabled)


def check_dtype(dtype: torch.dtype | None) -> None:
    """Refuse a ServerOptions.dtype the trunk cannot be cast to."""
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"ServerOptions.dtype must be floating, got {dtype}")


class TrunkRunner:
    """Runs one module on one device, optionally cast to ``dtype`` (inputs cast in, floating
    outputs cast back to the inputs' dtype).

    Besides forwards and gradients, a runner says how the trunk's state is spread over
    processes: :attr:`ranks`, :meth:`mirrored`, :meth:`assign`, :meth:`full` and the checkpoint
    methods. Here there is one process, and each of them is the plain local operation; a trunk
    on several processes (distributed.py) overrides them.
    """

    ranks: Ranks = ONE  # how the engine's checks combine over the trunk's processes
    world = 1  # processes computing the trunk
    uncast: torch.dtype | None = None  # the module's floating dtype before ServerOptions.dtype
    mode = ""  # how they share it ("ddp", "fsdp"; "" for one process)

    def __init__(
        self, module: torch.nn.Module, device: torch.device, dtype: torch.dtype | None
    ) -> None:
        check_dtype(dtype)
        self.device = device
        self.dtype = dtype
        self.module_name = type(module).__name__  # FSDP2 renames the class it shards
        # Outputs in the served dtype go back in the uncast module's where no floating input
        # says which (a trunk taking token ids only).
        self.uncast = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
        self.module = module.to(device)
        if dtype is not None:
            self.module = self.module.to(dtype)
        # The trainable parameters, in module order: the order of every gradient list.
        self.params = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        self.note_modes()

    def note_modes(self) -> None:
        """Remember the modes the trunk is served in. Submodules in eval mode inside a trunk
        in training mode (a frozen BatchNorm, ``trunk.train(); trunk.bn.eval()``) stay so in
        training forwards, as the trunk's owner set them: an eval forward in between would
        otherwise end it, as ``train(True)`` walks every submodule."""
        module = self.module
        self.kept_in_eval = (
            [m for m in module.modules() if not m.training] if module.training else []
        )
        self.batch_statistics = batch_statistics(module)  # what Info says (see there)

    def leaves(self, tensors: Sequence[torch.Tensor], needs: Sequence[bool]) -> list[torch.Tensor]:
        """The received inputs on the trunk's device, requiring a gradient where asked."""
        leaves = []
        for index, (tensor, need) in enumerate(zip(tensors, needs, strict=True)):
            leaf = memory.to_device(tensor, self.device)
            if need:
                if not leaf.is_floating_point():
                    raise InvalidRequest(f"input {index} is {leaf.dtype}: it cannot need a grad")
                leaf.requires_grad_(True)
            leaves.append(leaf)
        return leaves

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
        """Run the trunk (the caller holds the trunk lock), its RNG seeded by ``seed`` if
        given, under ``torch.autocast`` with ``autocast`` if given (the client's); returns the
        outputs' template and tensors. ``recompute``: a forward run again for its Backward,
        whose buffer updates the caller undoes (as other processes of the trunk must).
        ``keeps``: the caller keeps ``leaves`` to run this forward again from."""
        given = [self._given(t, grad, copy=keeps or recompute) for t in leaves]
        args, kwargs = unflatten(template, given)
        self.set_mode(training)
        with _grad_mode(grad), self._autocast(autocast):
            if seed is None:  # nothing will recompute this forward: no need to pin its RNG
                result = self.module(*args, **kwargs)
            else:
                result = self._seeded(seed, args, kwargs)
        out_template, outputs = flatten(result)
        if self.dtype is not None:
            # Outputs back in the caller's dtype: those in the served dtype only (one the trunk
            # makes on purpose, a .half(), stays), in the first floating input's dtype. With
            # none (token ids in), in the uncast module's where the served dtype is narrower
            # (a float32 model served in bfloat16); a wider one (a float16 checkpoint served
            # in float32) keeps the precision it was chosen for.
            floating = (t.dtype for t in leaves if t.is_floating_point())
            back = next(floating, None)
            uncast = self.uncast
            if back is None and uncast is not None and uncast.itemsize > self.dtype.itemsize:
                back = uncast
            if back is not None and back != self.dtype:
                outputs = [o.to(back) if o.dtype == self.dtype else o for o in outputs]
        return out_template, outputs

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
        """Gradients of ``inputs`` and of the trainable parameters (all None without
        ``parameters``: a frozen trunk), given the gradients of the outputs (one tensor or
        None each). ``training``: the mode of the forward, which a checkpointed block inside
        the trunk runs again in (another session's forward may have switched it since)."""
        self.set_mode(training)
        targets, grad_outputs = self._grad_pairs(outputs, grads)
        wrt = [*inputs, *(p for _, p in self.params if parameters)]
        results: Sequence[torch.Tensor | None]
        if targets and wrt:
            results = torch.autograd.grad(
                targets, wrt, grad_outputs, retain_graph=retain_graph, allow_unused=True
            )
        else:
            results = (None,) * len(wrt)
        param_grads = list(results[len(inputs) :]) or [None] * len(self.params)
        return _own_memory(list(results[: len(inputs)]), param_grads)

    def _grad_pairs(self, outputs: list[torch.Tensor], grads: list[Any]):
        if len(grads) != len(outputs):
            raise InvalidRequest(
                f"Backward got {len(grads)} gradients for a forward with {len(outputs)} outputs"
            )
        targets, grad_outputs = [], []
        for index, (output, grad) in enumerate(zip(outputs, grads, strict=True)):
            if grad is None:
                continue
            if grad.shape != output.shape:
                raise InvalidRequest(
                    f"gradient {index}: expected a tensor of shape {list(output.shape)}, "
                    f"got {describe(grad)}"
                )
            if output.requires_grad:
                targets.append(output)
                grad_outputs.append(memory.to_device(grad, self.device, output.dtype))
        return targets, grad_outputs

    # -- the trunk's state, for an engine that may be one of several processes -------------------

    def mirrored(self, op: str, session: Any, **args: Any) -> contextlib.AbstractContextManager:
        """Around an engine operation ``op`` that changes ``session``'s state (a Session, or
        None) or the weights (the caller holds the trunk lock): a trunk on several processes
        has every rank run it too, with ``args``. One process: nothing to do."""
        return _UNCHANGED

    def combine(self, session: Any) -> None:
        """Before the session's gradients are read (GradNorm, Step): make them whole on this
        process (a replicated trunk sums each rank's part)."""

    def split(self, session: Any) -> None:
        """Before a Backward's gradients are added to the session's (undoes what
        :meth:`combine` left on the other ranks of a replicated trunk)."""

    def forget_session(self, key: str) -> None:
        """Session ``key`` ended (the other ranks of a trunk drop their copy of it)."""

    def assign(self, param: torch.Tensor, value: torch.Tensor) -> None:
        """Set a trainable parameter to a whole value (LoadState), in place."""
        param.copy_(value)

    def full(self, tree: Any) -> Any:
        """``tree`` with every tensor whole (a sharded trunk gathers its shards)."""
        return tree

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: Any) -> None:
        """``optimizer.load_state_dict(state)``, ``state`` holding whole tensors."""
        optimizer.load_state_dict(state)

    def save_checkpoint(self, path: str, state: dict[str, Any]) -> None:
        """Write a checkpoint (the engine's state: weights, sessions) to ``path``."""
        checkpoint_file.save_checkpoint(path, state)

    def load_checkpoint(self, path: str) -> dict[str, Any] | None:
        """The checkpoint at ``path``, or None if there is none yet (at start: what writes
        killed mid-way left beside it is removed)."""
        checkpoint_file.remove_temporaries(path)
        return checkpoint_file.load_checkpoint(path)

    def _seeded(self, seed: int, args: list[Any], kwargs: dict[str, Any]) -> Any:
        # A seed per forward makes dropout reproducible for a recompute, on any server process;
        # the process-wide generators are left as they were.
        if self.device.type != "cuda":
            # What fork_rng(devices=[]) does, without its accelerator lookups (a third of a
            # small Compute's forward): only the CPU generator is saved and restored.
            generator = torch.default_generator
            state = generator.get_state()
            generator.manual_seed(seed)
            try:
                return self._call_seeded(args, kwargs)
            finally:
                generator.set_state(state)
        devices = [self.device.index or torch.cuda.current_device()]
        with torch.random.fork_rng(devices=devices):
            torch.default_generator.manual_seed(seed)
            with torch.cuda.device(devices[0]):
                torch.cuda.manual_seed(seed)
            return self._call_seeded(args, kwargs)

    def _call_seeded(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """The module called with its generators freshly seeded."""
        return self.module(*args, **kwargs)

    def set_mode(self, training: bool | None) -> None:
        """Put the trunk in training or eval mode (None: leave it)."""
        if training is not None and self.module.training != training:
            self.module.train(training)  # walks every submodule: not when it is so already
            for module in self.kept_in_eval if training else ():
                module.train(False)

    def _autocast(self, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
        if dtype is None:
            return _UNCHANGED
        return torch.autocast(self.device.type, dtype=dtype)

    def _cast_in(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.dtype is not None and tensor.is_floating_point():
            return tensor.to(self.dtype)
        return tensor

    def _given(self, leaf: torch.Tensor, grad: bool, *, copy: bool) -> torch.Tensor:
        """What the trunk gets for an input. A trunk may change its input in place, as it
        may the output of the layer before it locally (``ReLU(inplace=True)`` first, ``x +=
        pos``); a leaf that requires grad refuses that, so the trunk gets an alias of it, and
        a copy where the leaf is kept to run the forward again from (``copy``)."""
        cast = self._cast_in(leaf)
        if cast is not leaf:
            return cast  # a tensor of its own already
        if copy:
            return leaf.clone()
        return _Alias.apply(leaf) if grad and leaf.requires_grad else leaf


class _Alias(torch.autograd.Function):
    """The input's memory as a tensor of its own, on the input's graph: in-place changes of
    it are the trunk's, as those of a local layer's output would be."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        return alias.set_(
            tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride()
        )

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _own_memory(
    input_grads: list[torch.Tensor | None], param_grads: list[torch.Tensor | None]
) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """The gradients, each parameter's in memory of its own. Autograd may return one tensor
    for several parameters (``x + b1 + b2``: the output's gradient itself, for both and for
    ``x``), and a session adds later Backwards to what it holds in place: shared, that sum
    would land twice, and in the input gradient a retried Backward is answered with again."""
    seen = {_memory(g) for g in input_grads if g is not None and g.layout == torch.strided}
    owned: list[torch.Tensor | None] = []
    for grad in param_grads:
        if grad is not None and grad.numel() and grad.layout == torch.strided:
            key = _memory(grad)
            if key in seen:
                grad = grad.clone()
            else:
                seen.add(key)
        owned.append(grad)
    return input_grads, owned


def _memory(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()
