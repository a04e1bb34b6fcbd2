"""The CUDA path: trunk and caller on every mix of CPU and GPU, against the same parts run locally.

Runs only where CUDA is available: CI has no GPU and skips the whole module; the GPU machine
runs it through ``scripts/device_check.sh``. Checked here: outputs and input gradients come back
on the caller's device and dtype, split training equals local training with each part on the
same device as in the split, received tensors are decoded into pinned (page-locked) buffers,
a pooled buffer is never refilled while an asynchronous copy to the GPU may still read it, and
the lossy codecs quantize and dequantize on the GPU into the very bytes and values the CPU makes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from codec_cases import FLOATS, case_frame, codec_cases, exact_values
from models import Scale, Split, block_parts, mlp_parts
from torch import nn

from remote_autograd import (
    ClientOptions,
    RemoteModule,
    RemoteOptimizer,
    ServerOptions,
    clip_grad_norm_,
    codec,
    decode,
    encode,
    frames,
    memory,
)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device (runs on the GPU machine: scripts/device_check.sh)",
)

# (trunk device, client device): the trunk is served on the first, bottom, top and the tensors
# the caller passes live on the second.
PLACEMENTS = [("cuda", "cpu"), ("cpu", "cuda"), ("cuda", "cuda")]
PLACEMENT_IDS = ["trunk_cuda-client_cpu", "trunk_cpu-client_cuda", "trunk_cuda-client_cuda"]
STEPS = 3
MiB = 1 << 20


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    # Not bit-for-bit: the split clips with its norms stacked in model order, torch's clip
    # groups them by device first, and attention's backward on the GPU uses atomics (seen on an
    # H200: float64 weights 1.3e-12 apart after 3 AdamW steps, run to run).
    if dtype == torch.float64:
        return {"rtol": 0, "atol": 1e-10}
    return {"rtol": 1e-4, "atol": 1e-5}


def _to(value, device: torch.device | str):
    """A tensor, or a tuple of them, on ``device`` (autograd follows the copies)."""
    if isinstance(value, tuple):
        return tuple(v.to(device) for v in value)
    return value.to(device)


class Placed(nn.Module):
    """The local trunk on its own device: what RemoteModule does, without the wire."""

    def __init__(self, trunk: nn.Module, device: str, back: str) -> None:
        super().__init__()
        self.trunk, self.device, self.back = trunk.to(device), device, back

    def forward(self, *args: torch.Tensor):
        return _to(self.trunk(*[a.to(self.device) for a in args]), self.back)


def _batches(kind: str, dtype: torch.dtype, n: int, device: str, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if kind == "mlp":
            x = torch.randn(8, 6, generator=generator, dtype=dtype)
            inputs, target = (x,), torch.randint(0, 3, (8,), generator=generator)
        else:
            tokens = torch.randint(0, 20, (4, 7), generator=generator)
            padding = torch.zeros(4, 7, dtype=torch.bool)
            padding[1, 5:] = True
            padding[3, 3:] = True
            inputs, target = (tokens, padding), tokens
        out.append((tuple(t.to(device) for t in inputs), target.to(device)))
    return out


def _pair(kind, dtype, trunk_device, client_device, start_server):
    parts = mlp_parts(dtype) if kind == "mlp" else block_parts(dtype)
    bottom, trunk, top = copy.deepcopy(parts)
    local = Split(
        kind,
        bottom.to(client_device),
        Placed(trunk, trunk_device, client_device),
        top.to(client_device),
    )
    bottom, trunk, top = parts
    server = start_server(trunk, ServerOptions(device=trunk_device))
    remote = Split(
        kind, bottom.to(client_device), RemoteModule(server.address), top.to(client_device)
    )
    return local, remote, trunk, server


@pytest.mark.parametrize(("trunk_device", "client_device"), PLACEMENTS, ids=PLACEMENT_IDS)
@pytest.mark.parametrize(
    ("kind", "dtype"),
    [("mlp", torch.float64), ("mlp", torch.float32), ("blocks", torch.float64)],
    ids=["mlp-float64", "mlp-float32", "blocks-float64"],
)
@pytest.mark.parametrize("optimizer", ["SGD", "AdamW"])
def test_training_matches_local(kind, dtype, optimizer, trunk_device, client_device, start_server):
    local, remote, served_trunk, _ = _pair(kind, dtype, trunk_device, client_device, start_server)
    kwargs = {"lr": 0.05, "momentum": 0.9} if optimizer == "SGD" else {"lr": 0.01}
    cls = getattr(torch.optim, optimizer)
    local_opt = cls(local.parameters(), **kwargs)
    client_opt = cls([*remote.bottom.parameters(), *remote.top.parameters()], **kwargs)
    trunk_opt = RemoteOptimizer(remote.trunk, cls, **kwargs)
    batches = _batches(kind, dtype, 2 * STEPS, client_device)
    tol = _tolerance(dtype)
    for step in range(STEPS):
        for opt in (local_opt, client_opt, trunk_opt):
            opt.zero_grad()
        for micro in batches[2 * step : 2 * step + 2]:  # gradient accumulation over 2 micro-batches
            local_loss = local(*micro) / 2
            remote_loss = remote(*micro) / 2
            assert remote_loss.device.type == local_loss.device.type == client_device
            torch.testing.assert_close(remote_loss, local_loss, **tol)
            local_loss.backward()
            remote_loss.backward()
        local_norm = torch.nn.utils.clip_grad_norm_(local.parameters(), 1.0)
        remote_norm = clip_grad_norm_(
            [*remote.bottom.parameters(), remote.trunk, *remote.top.parameters()], 1.0
        )
        torch.testing.assert_close(remote_norm, local_norm, **tol)
        for opt in (local_opt, client_opt, trunk_opt):
            opt.step()
    remote_state = remote.trunk.remote_state_dict()
    served = dict(served_trunk.named_parameters())
    for name, param in local.trunk.trunk.named_parameters():
        assert served[name].device.type == trunk_device
        torch.testing.assert_close(served[name], param, **tol)
        torch.testing.assert_close(remote_state[name], param.detach().cpu(), **tol)
    for mine, theirs in [(remote.bottom, local.bottom), (remote.top, local.top)]:
        for a, b in zip(mine.parameters(), theirs.parameters(), strict=True):
            assert a.device.type == client_device
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize(("trunk_device", "client_device"), PLACEMENTS, ids=PLACEMENT_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_outputs_and_gradients_come_back_on_the_callers_device(
    dtype, trunk_device, client_device, start_server
):
    local, remote, _, server = _pair("blocks", dtype, trunk_device, client_device, start_server)
    (tokens, padding), _ = _batches("blocks", dtype, 1, client_device)[0]
    hidden = local.bottom(tokens).detach().requires_grad_()
    remote_hidden = hidden.detach().clone().requires_grad_()
    out, norms = local.trunk(hidden, padding)
    remote_out, remote_norms = remote.trunk(remote_hidden, padding)
    tol = _tolerance(dtype)
    for got, expected in [(remote_out, out), (remote_norms, norms)]:
        assert got.device == hidden.device and got.dtype == dtype
        torch.testing.assert_close(got, expected, **tol)
    generator = torch.Generator().manual_seed(3)
    grad = torch.randn(out.shape, generator=generator, dtype=dtype).to(client_device)
    out.backward(grad)
    remote_out.backward(grad)
    assert remote_hidden.grad.device == hidden.device and remote_hidden.grad.dtype == dtype
    torch.testing.assert_close(remote_hidden.grad, hidden.grad, **tol)
    grads = server.engine.sessions.values()[0].grads
    for name, param in local.trunk.trunk.named_parameters():
        assert grads[name].device.type == trunk_device
        torch.testing.assert_close(grads[name], param.grad, **tol)


@pytest.mark.parametrize(("trunk_device", "client_device"), PLACEMENTS, ids=PLACEMENT_IDS)
def test_server_dtype_and_integer_outputs_on_the_callers_device(
    trunk_device, client_device, start_server
):
    """A trunk served in float64 takes and returns the caller's float32 on the caller's
    device; integer and bool outputs come back there too."""

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            y = torch.tanh(self.linear(x))
            return y, y.argmax(-1), y > 0

    torch.manual_seed(0)  # the Linear's init and x
    trunk = Head()
    local = copy.deepcopy(trunk).double().to(trunk_device)
    options = ServerOptions(device=trunk_device, dtype="float64")
    remote = RemoteModule(start_server(trunk, options).address)
    x = torch.randn(3, 4).to(client_device).requires_grad_()
    local_x = x.detach().clone().requires_grad_()
    out, index, positive = remote(x)
    expected = local(local_x.to(trunk_device).double())[0].float().to(client_device)
    for got in (out, index, positive):
        assert got.device == x.device
    assert (
        out.dtype == torch.float32 and index.dtype == torch.int64 and positive.dtype == torch.bool
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)
    assert torch.equal(index, expected.argmax(-1)) and torch.equal(positive, expected > 0)
    out.sum().backward()
    expected.sum().backward()
    assert x.grad.device == x.device and x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, local_x.grad, rtol=0, atol=1e-7)


@pytest.mark.parametrize(("trunk_device", "client_device"), PLACEMENTS, ids=PLACEMENT_IDS)
def test_received_tensors_are_pinned_when_copied_to_the_gpu(
    trunk_device, client_device, start_server, monkeypatch
):
    copied: list[tuple[int, bool]] = []  # (bytes, pinned) of each CPU tensor sent to a GPU
    to_device = memory.to_device

    def spy(tensor, device, dtype=None):
        if tensor.device.type == "cpu" and torch.device(device).type == "cuda":
            copied.append((tensor.numel() * tensor.element_size(), tensor.is_pinned()))
        return to_device(tensor, device, dtype)

    monkeypatch.setattr(memory, "to_device", spy)
    server = start_server(Scale(), ServerOptions(device=trunk_device))
    remote = RemoteModule(server.address)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(MiB // 4, generator=generator).to(client_device).requires_grad_()  # 1 MiB
    y = remote(x)
    # Random values: LZ4 would shrink ones, and a decompressed tensor is pageable memory (only
    # tensors decoded in place from the receive buffer are pinned; see docs/protocol.md).
    grad = torch.randn(x.shape, generator=generator).to(client_device)
    y.backward(grad)
    torch.cuda.synchronize()
    torch.testing.assert_close(x.grad, grad * 1.5, rtol=0, atol=0)
    # Compute's input and Backward's gradient on the server; the output and the input
    # gradient on the client: two copies to the GPU per side that has one.
    expected = 2 * (trunk_device == "cuda") + 2 * (client_device == "cuda")
    assert [pinned for size, pinned in copied if size >= MiB] == [True] * expected
    pool = frames._POOL._buffers
    assert any(not isinstance(b, bytearray) and torch.from_numpy(b).is_pinned() for b in pool)
    memory.reap_copies()  # the copies are done: nothing holds the buffers any more
    assert not memory._COPIES._held


def corrupted_replies(remote: RemoteModule, calls: int, sleep_cycles: int) -> list[int]:
    """Send ``calls`` different 1 MiB tensors from the CPU with outputs wanted on the GPU, each
    copy queued behind a GPU sleep longer than a round trip (so the sleeps pile up and every
    copy runs well after its reply's buffer was let go); return the calls whose output differs
    from the trunk's (x * 1.5, computed alike on both sides).

    No call synchronizes (the inputs are on the CPU, so encoding them waits for nothing): a
    pooled receive buffer refilled before its copy ran would show up as a wrong output.
    """
    generator = torch.Generator().manual_seed(7)
    inputs, outputs = [], []
    with torch.no_grad():
        for i in range(calls):
            x = torch.randn(MiB // 4, generator=generator) + i
            torch.cuda._sleep(sleep_cycles)
            outputs.append(remote(x))
            inputs.append(x)
    torch.cuda.synchronize()
    return [
        i
        for i, (x, y) in enumerate(zip(inputs, outputs, strict=True))
        if not torch.equal(y.cpu(), x * 1.5)
    ]


@pytest.mark.parametrize("trunk_device", ["cpu", "cuda"])
def test_pooled_buffers_are_not_refilled_while_copies_read_them(trunk_device, start_server):
    server = start_server(Scale(), ServerOptions(device=trunk_device))
    remote = RemoteModule(server.address, device="cuda")
    assert corrupted_replies(remote, calls=50, sleep_cycles=20_000_000) == []


# -- codecs on the device -----------------------------------------------------------------------

LOSSY = ["bf16", "fp16", "int8"]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _same_values(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Bit for bit, except that any NaN equals any NaN (the GPU's bf16 NaN has another payload)."""
    got, expected = got.detach().cpu(), expected.detach().cpu()
    if got.dtype != expected.dtype or got.shape != expected.shape:
        return False
    if got.is_floating_point():
        nan = torch.isnan(got)
        if not torch.equal(nan, torch.isnan(expected)):
            return False
        got, expected = got.masked_fill(nan, 0), expected.masked_fill(nan, 0)
    return torch.equal(_bits(got), _bits(expected))


def _same_frame_values(got: bytes, expected: bytes) -> bool:
    a, b = decode(got), decode(expected)  # frames of case_frame
    return _same_values(a["x"], b["x"]) and _same_values(a["pair"][0], b["pair"][0])


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("quantization", ["none", *LOSSY])
def test_gpu_tensors_make_the_cpu_frames(quantization, dtype):
    """Quantized (and checked for finiteness) on the GPU, the frame is the CPU's byte for byte:
    every shape, empty ones, views the GPU holds non-contiguous, NaN and inf (which fp16 and
    int8 refuse to quantize there as on the CPU), LZ4."""
    pairs = zip(codec_cases(dtype, "cuda"), codec_cases(dtype, "cpu"), strict=True)
    for (name, on_gpu, compression), (_, on_cpu, _) in pairs:
        assert on_gpu.is_cuda and on_gpu.is_contiguous() == on_cpu.is_contiguous(), name
        got = case_frame(on_gpu, compression, quantization)
        expected = case_frame(on_cpu, compression, quantization)
        if quantization == "bf16" and torch.isnan(on_cpu).any():
            # bf16 casts NaN like any value; the GPU may spell it 0x7FFF, the CPU 0x7FC0.
            assert _same_frame_values(got, expected), name
        else:
            assert got == expected, name


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("quantization", ["none", *LOSSY])
def test_decoding_onto_the_gpu_is_decoding_then_copying(quantization, dtype):
    """Given a GPU, quantized tensors are dequantized there into the values the CPU decodes;
    raw ones (q none, or left raw: empty, non-finite for fp16/int8) stay on the host."""
    for name, tensor, compression in codec_cases(dtype):
        frame = encode([tensor], compression=compression, quantization=quantization)
        (expected,) = decode(frame)
        (got,) = decode(frame, device=torch.device("cuda"))
        lossy = (
            quantization != "none"
            and tensor.numel() > 0
            and not (quantization in ("bf16", "fp16") and dtype.itemsize == 2)
            and (quantization == "bf16" or bool(torch.isfinite(tensor).all()))
        )
        assert got.device.type == ("cuda" if lossy else "cpu"), name
        assert _same_values(got, expected), name


def _exact_input(seed: int = 1) -> torch.Tensor:
    return exact_values(torch.float32, (64, 300), seed=seed)


@pytest.mark.parametrize(("trunk_device", "client_device"), PLACEMENTS, ids=PLACEMENT_IDS)
@pytest.mark.parametrize("quantization", LOSSY)
def test_lossy_split_on_the_gpu_equals_the_same_split_on_the_cpu(
    quantization, trunk_device, client_device, start_server
):
    """x * 1.5 is exact on any device: with the same wire bytes on every side, outputs and
    input gradients equal those of an all-CPU split bit for bit."""
    options = ClientOptions(
        activation_quantization=quantization, gradient_quantization=quantization
    )
    results = []
    for trunk_on, client_on in [("cpu", "cpu"), (trunk_device, client_device)]:
        server = start_server(Scale(), ServerOptions(device=trunk_on))
        remote = RemoteModule(server.address, options=options)
        x = _exact_input().to(client_on).requires_grad_()
        y = remote(x)
        y.backward(_exact_input(seed=2).to(client_on) / 64)
        assert y.device == x.grad.device == x.device
        grads = server.engine.sessions.values()[0].grads
        assert grads["weight"].device.type == trunk_on
        results.append((y, x.grad, grads["weight"]))
    (y, x_grad, w_grad), (cpu_y, cpu_x_grad, cpu_w_grad) = results[1], results[0]
    assert _same_values(y, cpu_y) and _same_values(x_grad, cpu_x_grad)
    # A sum of 19,200 products: the GPU adds them in another order.
    torch.testing.assert_close(w_grad.cpu(), cpu_w_grad, rtol=1e-5, atol=0)


@pytest.mark.parametrize("trunk_device", ["cpu", "cuda"])
@pytest.mark.parametrize("quantization", LOSSY)
def test_non_finite_gradients_are_refused_through_gpu_codecs(
    quantization, trunk_device, start_server
):
    """NaN or inf gradients from the client's GPU (bf16 casts them there; fp16 and int8 find
    them there and send them raw) never reach the trunk's gradients or weights."""
    server = start_server(Scale(), ServerOptions(device=trunk_device))
    options = ClientOptions(
        activation_quantization=quantization, gradient_quantization=quantization
    )
    remote = RemoteModule(server.address, options=options)
    optimizer = RemoteOptimizer(remote, "SGD", lr=0.1)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = remote(torch.ones(2, 300, device="cuda", requires_grad=True))
        grad = torch.ones_like(y)
        grad[1, 7] = bad
        y.backward(grad)
        assert server.engine.sessions.values()[0].grads == {}
        with pytest.raises(FloatingPointError, match="not finite"):
            optimizer.step()
        optimizer.zero_grad()
    y = remote(torch.ones(2, 300, device="cuda", requires_grad=True))
    y.backward(torch.ones_like(y))
    optimizer.step()  # 600 ones times ones, each within int8's step of 1
    assert server.engine.module.weight.item() == pytest.approx(1.5 - 0.1 * 600, rel=1e-4)


@pytest.mark.parametrize("stage_bytes", [4 * MiB, 64 << 10], ids=["4MiB", "64KiB"])
@pytest.mark.parametrize("quantization", ["none", *LOSSY])
def test_staged_gpu_tensors_make_the_cpu_frames(quantization, stage_bytes, monkeypatch):
    """Large GPU tensors cross to the host a piece at a time while they are sent
    (memory.DeviceBytes): read whole, in gRPC chunks, or twice (a retry), the frame is the one
    the CPU encodes, for contiguous and non-contiguous tensors larger than a piece."""
    monkeypatch.setattr(memory, "STAGE_BYTES", stage_bytes)
    base = exact_values(torch.float32, (3, 1024, 1024), seed=3)  # 12 MiB
    cases = {
        "whole": base,
        "transposed": base.transpose(1, 2),
        "every-other": base[:, ::2],
        "doubles": base[0].to(torch.float64),
    }
    for name, on_cpu in cases.items():
        on_gpu = {  # the same views, made on the GPU
            "whole": lambda: base.cuda(),
            "transposed": lambda: base.cuda().transpose(1, 2),
            "every-other": lambda: base.cuda()[:, ::2],
            "doubles": lambda: base[0].cuda().to(torch.float64),
        }[name]()
        assert on_gpu.is_contiguous() == on_cpu.is_contiguous(), name
        value = {"x": on_gpu, "small": on_gpu.reshape(-1)[:5]}
        cpu_value = {"x": on_cpu, "small": on_cpu.reshape(-1)[:5]}
        expected = encode(cpu_value, compression="none", quantization=quantization)
        encoder = codec.Encoder(compression="none", quantization=quantization)
        buffers = encoder.encode_buffers(value, staged=True)
        if stage_bytes < MiB:  # int8 makes 12 MiB of float32 3 MiB: one 4 MiB piece or less
            assert any(isinstance(b, memory.DeviceBytes) for b in buffers), name
        assert codec.join(buffers) == expected, name
        assert b"".join(codec.iter_chunks(buffers, MiB)) == expected, name
        assert codec.join(buffers) == expected, f"{name}: read again"


@pytest.mark.parametrize(("trunk_device", "client_device"), PLACEMENTS, ids=PLACEMENT_IDS)
@pytest.mark.parametrize("bulk", [True, False], ids=["bulk", "grpc"])
def test_training_through_staged_frames_equals_local(
    trunk_device, client_device, bulk, start_server, monkeypatch
):
    """Activations and gradients of 8 MiB each, staged in 1 MiB pieces on either side: split
    training equals the same trunk trained locally on the trunk's device."""
    monkeypatch.setattr(memory, "STAGE_BYTES", MiB)
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(1024, 1024, dtype=torch.float64), nn.Tanh())
    local = copy.deepcopy(trunk).to(trunk_device)
    server = start_server(trunk, ServerOptions(device=trunk_device))
    remote = RemoteModule(server.address, options=ClientOptions(bulk=bulk))
    trunk_opt = RemoteOptimizer(remote, torch.optim.SGD, lr=0.1, momentum=0.9)
    local_opt = torch.optim.SGD(local.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(1024, 1024, generator=generator, dtype=torch.float64)
        xs = [x.to(client_device).requires_grad_(), x.to(trunk_device).requires_grad_()]
        trunk_opt.zero_grad()
        local_opt.zero_grad()
        ys = [remote(xs[0]), local(xs[1])]
        assert ys[0].device.type == client_device
        for y in ys:
            (y**2).sum().backward()
        torch.testing.assert_close(ys[0].cpu(), ys[1].cpu(), **_tolerance(torch.float64))
        torch.testing.assert_close(xs[0].grad.cpu(), xs[1].grad.cpu(), **_tolerance(torch.float64))
        trunk_opt.step()
        local_opt.step()
    state = remote.state_dict()
    for name, value in local.state_dict().items():
        torch.testing.assert_close(state[name].cpu(), value.cpu(), **_tolerance(torch.float64))
    remote.close()
