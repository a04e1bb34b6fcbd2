"""backward_inputs_first: the inputs' gradients first, the parameters' after, and together
exactly what one ``loss.backward()`` leaves (float64, bit for bit)."""

from __future__ import annotations

import warnings

import pytest
import torch
from models import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from remote_autograd.split_backward import backward_inputs_first


class _Scale(torch.autograd.Function):
    """A Python autograd.Function with a weight: its backward computes both gradients."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return x * weight

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return grad * weight, (grad * x).sum(0)


class Top(nn.Module):
    """The top of a split model, in one of several shapes; ``loss(z)`` is its scalar loss."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        torch.manual_seed(0)
        if kind == "mlp":
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5))
        elif kind == "lm_head":  # GPT-2's: final norm, head without bias, shifted labels
            self.norm, self.head = nn.LayerNorm(8), nn.Linear(8, 11, bias=False)
        elif kind in ("block", "checkpoint", "reentrant_checkpoint"):
            self.block, self.head = Block(8), nn.Linear(8, 5)
        elif kind == "conv":
            self.conv, self.head = nn.Conv1d(4, 6, 3, padding=1), nn.Linear(6, 5)
        elif kind in ("tied", "python_function", "reentrant_checkpoint_off_path"):
            self.weight = nn.Parameter(torch.randn(8, 8) / 3)
            if kind == "reentrant_checkpoint_off_path":
                self.mix = nn.Linear(8, 8)
        elif kind == "temperature":  # a parameter in the loss itself
            self.head, self.temperature = nn.Linear(8, 5), nn.Parameter(torch.tensor(1.5))
        elif kind == "regularised":  # a term of the loss that does not depend on the input
            self.head, self.extra = nn.Linear(8, 5), nn.Parameter(torch.randn(7))
        elif kind == "embedding":  # a parameter added to the input, not multiplied
            self.embed, self.head = nn.Embedding(6, 8), nn.Linear(8, 5)
        elif kind == "deep":  # 1200 nodes deep (past Python's recursion limit), a bias each
            self.biases = nn.ParameterList(nn.Parameter(torch.randn(8) / 100) for _ in range(600))
        self.double()

    def loss(self, z: torch.Tensor) -> torch.Tensor:  # z: [4, 3, 8]
        labels = torch.arange(12).reshape(4, 3) % 5
        flat = z.flatten(0, 1)  # [12, 8]
        kind = self.kind
        if kind == "mlp":
            return nn.functional.cross_entropy(self.net(flat), labels.flatten())
        if kind == "lm_head":
            logits = self.head(self.norm(z))  # [4, 3, 11]
            return nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
            )
        if kind in ("block", "checkpoint", "reentrant_checkpoint"):
            hidden = (
                self.block(z)
                if kind == "block"
                else checkpoint(self.block, z, use_reentrant=kind == "reentrant_checkpoint")
            )
            return nn.functional.cross_entropy(self.head(hidden).flatten(0, 1), labels.flatten())
        if kind == "conv":
            hidden = self.conv(z.reshape(4, 4, 6)).relu().mean(-1)  # [4, 6]
            return nn.functional.cross_entropy(self.head(hidden), labels[:, 0])
        if kind == "tied":  # the weight below two nodes: not separable, one backward
            return (flat @ self.weight @ self.weight.t()).tanh().sum()
        if kind == "python_function":
            return _Scale.apply(flat, self.weight[0]).pow(2).sum()
        if kind == "reentrant_checkpoint_off_path":  # over parameters alone, below a split node
            weight = checkpoint(self.mix, self.weight, use_reentrant=True)
            return (flat @ weight).tanh().sum()
        if kind == "temperature":
            return nn.functional.cross_entropy(self.head(flat) / self.temperature, labels.flatten())
        if kind == "regularised":
            head = nn.functional.cross_entropy(self.head(flat), labels.flatten())
            return head + 1e-2 * self.extra.pow(2).sum()
        if kind == "embedding":
            hidden = z + self.embed(labels % 6)
            return nn.functional.cross_entropy(self.head(hidden).flatten(0, 1), labels.flatten())
        assert kind == "deep"
        for bias in self.biases:
            z = z * 0.999 + bias
        return z.pow(2).sum()


SPLIT = ["mlp", "lm_head", "block", "checkpoint", "conv", "temperature", "regularised"]
SPLIT += ["embedding", "deep"]
# One plain backward: the same numbers, nothing deferred. (A reentrant checkpoint refuses the
# first pass's autograd.grad.)
WHOLE = ["tied", "python_function", "reentrant_checkpoint", "reentrant_checkpoint_off_path"]


def _grads(top: Top, z: torch.Tensor) -> list[torch.Tensor | None]:
    return [z.grad, *(p.grad for p in top.parameters())]


def _same(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> bool:
    return len(a) == len(b) and all(
        x is None and y is None or x is not None and y is not None and torch.equal(x, y)
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("kind", SPLIT + WHOLE)
def test_both_passes_leave_what_one_backward_leaves_bit_for_bit(kind):
    top = Top(kind)
    z0 = torch.randn(4, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = []
    for split in (False, True):
        top.zero_grad(set_to_none=True)
        z = z0.clone().requires_grad_()
        for _ in range(2):  # the second onto the first's gradients, as accumulation does
            loss = top.loss(z)
            if split:
                backward_inputs_first(loss, [z])()
            else:
                loss.backward()
        results.append(_grads(top, z))
    assert _same(*results)
    assert all(g is not None and g.abs().sum() > 0 for g in results[1])  # all were reached


@pytest.mark.parametrize("kind", SPLIT)
def test_the_first_pass_computes_only_the_inputs_gradient(kind):
    top = Top(kind)
    z = torch.randn(4, 3, 8, dtype=torch.float64).requires_grad_()
    reference = torch.autograd.grad(top.loss(z), z)[0]
    finish = backward_inputs_first(top.loss(z), [z])
    assert torch.equal(z.grad, reference)
    assert all(p.grad is None for p in top.parameters())  # deferred, not computed yet
    finish()
    assert all(p.grad is not None for p in top.parameters())


@pytest.mark.parametrize("kind", WHOLE)
def test_a_graph_that_cannot_be_split_gets_one_backward_at_once(kind):
    top = Top(kind)
    z = torch.randn(4, 3, 8, dtype=torch.float64).requires_grad_()
    backward_inputs_first(top.loss(z), [z])
    assert z.grad is not None and all(p.grad is not None for p in top.parameters())


def test_the_python_function_runs_backward_once():
    calls = []
    original = _Scale.backward

    def counted(ctx, grad):
        calls.append(1)
        return original(ctx, grad)

    top = Top("python_function")
    z = torch.randn(4, 3, 8, dtype=torch.float64).requires_grad_()
    _Scale.backward = staticmethod(counted)
    try:
        backward_inputs_first(top.loss(z), [z])()
    finally:
        _Scale.backward = staticmethod(original)
    assert calls == [1]


def test_several_inputs_and_one_the_loss_does_not_use():
    """(A trunk output the top ignores.) Two heads, so that the graph is split."""
    heads = [nn.Linear(8, 1).double() for _ in range(2)]
    params = [p for head in heads for p in head.parameters()]
    a, b, unused = (torch.randn(5, 8, dtype=torch.float64).requires_grad_() for _ in range(3))

    def loss() -> torch.Tensor:
        return (heads[0](a) * heads[1](b).tanh()).sum()

    loss().backward()
    expected = [a.grad, b.grad, *(p.grad for p in params)]
    for t in (a, b, *params):
        t.grad = None
    finish = backward_inputs_first(loss(), [a, b, unused])
    assert all(p.grad is None for p in params)  # split, not one backward
    finish()
    assert _same([a.grad, b.grad, *(p.grad for p in params)], expected)
    assert unused.grad is None


def test_a_root_that_is_a_second_output_and_a_node_given_no_gradient():
    """The loss is output 1 of its node (its gradient arrives in slot 1, not 0); and a
    Function above a split node gives it no gradient, so one backward leaves that head's
    gradient None, not zeros."""

    class NoneForA(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            return a + b

        @staticmethod
        def backward(ctx, grad):
            return None, grad

    weight = nn.Parameter(torch.tensor([[2.0]], dtype=torch.float64))
    head = nn.Linear(4, 4).double()
    z0 = torch.tensor([[3.0]], dtype=torch.float64)
    y0 = torch.randn(3, 4, dtype=torch.float64)

    def losses(z: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        with warnings.catch_warnings():  # deprecated, but the one op that returns its input
            warnings.simplefilter("ignore", UserWarning)
            _, copy = torch.triangular_solve(z * 1.0, weight)  # copy: output 1, weight's clone
        assert copy.output_nr == 1
        return [copy, NoneForA.apply(head(y), y * 2).sum()]  # copy: one element, a loss

    results = []
    for split in (False, True):
        z, y = z0.clone().requires_grad_(), y0.clone().requires_grad_()
        weight.grad = None
        head.zero_grad(set_to_none=True)
        for loss in losses(z, y):
            (backward_inputs_first(loss, [z, y])() if split else loss.backward())
        results.append([z.grad, y.grad, weight.grad, head.weight.grad])
    assert results[0][3] is None
    assert _same(*results)


def test_the_inputs_gradient_is_laid_out_as_one_backward_lays_it_out():
    """z.sum() * w gives z an expanded gradient; autograd's accumulator makes it dense."""
    weight = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    z0 = torch.randn(3, 4, dtype=torch.float64)
    grads = []
    for split in (False, True):
        z = z0.clone().requires_grad_()
        loss = z.sum() * weight
        if split:
            backward_inputs_first(loss, [z])()
        else:
            loss.backward()
        grads.append(z.grad)
    assert grads[1].stride() == grads[0].stride() == z0.stride()
    assert torch.equal(grads[0], grads[1])


def test_the_inputs_gradient_is_accumulated_as_autograd_accumulates_it():
    """In place onto a gradient already there (the same tensor object), as a copy (changing it
    before the second pass changes no parameter's gradient), post-accumulate hooks once."""
    top = Top("regularised")  # the head's node passes its gradient on unchanged
    z = torch.randn(4, 3, 8, dtype=torch.float64).requires_grad_()
    expected = _grads_of(top, z, split=False)
    top.zero_grad(set_to_none=True)
    z.grad = torch.zeros_like(z)
    held = z.grad
    hooked = []
    z.register_post_accumulate_grad_hook(lambda t: hooked.append(t.grad.clone()))
    finish = backward_inputs_first(top.loss(z), [z])
    assert z.grad is held and len(hooked) == 1 and torch.equal(hooked[0], expected[0])
    z.grad.mul_(1000.0)  # e.g. clipped in place before it is sent
    finish()
    assert _same([p.grad for p in top.parameters()], expected[1:])


def _grads_of(top: Top, z: torch.Tensor, split: bool) -> list[torch.Tensor | None]:
    top.zero_grad(set_to_none=True)
    z.grad = None
    if split:
        backward_inputs_first(top.loss(z), [z])()
    else:
        top.loss(z).backward()
    return [g.clone() if g is not None else None for g in _grads(top, z)]


def test_a_sparse_gradient_of_an_input_is_added_in_place_to_a_dense_one():
    """z used as an embedding table with sparse=True, and a head on top to split off."""
    head = nn.Linear(8, 2).double()
    z = torch.randn(6, 8, dtype=torch.float64).requires_grad_()
    ids = torch.tensor([[0, 2], [2, 5]])
    z.grad = torch.ones_like(z)
    held = z.grad
    loss = head(nn.functional.embedding(ids, z, sparse=True)).pow(2).sum()
    backward_inputs_first(loss, [z])()
    assert z.grad is held
    expected = torch.ones_like(z)
    z2 = z.detach().clone().requires_grad_()
    head(nn.functional.embedding(ids, z2)).pow(2).sum().backward()
    torch.testing.assert_close(z.grad, expected + z2.grad, rtol=0, atol=1e-15)


def test_an_input_that_is_not_a_leaf_is_refused():
    top = Top("mlp")
    z = torch.randn(4, 3, 8, dtype=torch.float64, requires_grad=True) * 2
    with pytest.raises(ValueError, match="inputs must be leaf tensors"):
        backward_inputs_first(top.loss(z), [z])


def test_parameter_and_module_hooks_run_once_and_see_what_one_backward_gives():
    seen: dict[bool, dict[tuple[str, int], list[torch.Tensor]]] = {False: {}, True: {}}
    top = Top("mlp")
    z0 = torch.randn(4, 3, 8, dtype=torch.float64)

    def note(split: bool, key: tuple[str, int], *tensors: torch.Tensor) -> None:
        seen[split].setdefault(key, []).extend(t.clone() for t in tensors if t is not None)

    for split in (False, True):
        handles = []
        for i, p in enumerate(top.parameters()):
            handles.append(
                p.register_hook(lambda g, i=i, s=split: note(s, ("hook", i), g) or g * 0.5)
            )
            handles.append(
                p.register_post_accumulate_grad_hook(
                    lambda p, i=i, s=split: note(s, ("accumulated", i), p.grad)
                )
            )
        for i, layer in enumerate(top.net):
            handles.append(
                layer.register_full_backward_hook(
                    lambda m, grad_in, grad_out, i=i, s=split: note(s, ("module", i), *grad_in)
                )
            )
        top.zero_grad(set_to_none=True)
        z = z0.clone().requires_grad_()
        if split:
            backward_inputs_first(top.loss(z), [z])()
        else:
            top.loss(z).backward()
        for handle in handles:
            handle.remove()
    assert seen[True].keys() == seen[False].keys()
    assert len(seen[True]) == 2 * len(list(top.parameters())) + len(top.net)
    for key, tensors in seen[True].items():
        assert len(tensors) == len(seen[False][key]) <= 1, key  # each ran once (or never)
        assert _same(tensors, seen[False][key]), key


def test_a_loss_without_a_graph_raises_torchs_error():
    with pytest.raises(RuntimeError, match="does not require grad"):
        backward_inputs_first(torch.tensor(1.0), [torch.zeros(2, requires_grad=True)])
