"""Per-client LoRA adapters on one frozen trunk (``serve --adapters per-client``).

Every client identity (bearer token here) trains its own adapter; each must end exactly
(float64, bit for bit) where the same client ends training alone against a single-tenant
server, however the clients' calls interleave, and no client can see or change another's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import signal
import ssl
import threading
import types
from collections.abc import Callable

import grpc
import pytest
import torch
from conftest import spawn_server
from factories import batch, batchnorm_trunk, dropout_trunk, local_parts
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from polling import wait_for
from torch import nn

from remote_autograd import (
    ClientOptions,
    InvalidRequest,
    LimitExceeded,
    RemoteModule,
    RemoteOptimizer,
    ServerOptions,
    SteppedTrunkWarning,
    serve,
)
from remote_autograd._proto import remote_autograd_pb2 as pb
from remote_autograd.adapters import AdapterEngine, AdapterOptions, to_peft_names
from remote_autograd.errors import AuthenticationError
from remote_autograd.service import certificate_name

RANK, ALPHA, TARGETS, LORA_SEED = 4, 8, ("0", "3"), 5
TOKENS = tuple(f"token-{i}" for i in range(4))


def adapter_options(**changes) -> AdapterOptions:
    base = dict(rank=RANK, alpha=ALPHA, target_modules=TARGETS, seed=LORA_SEED, offload_after=0.0)
    return AdapterOptions(**{**base, **changes})


def single_tenant_trunk() -> nn.Module:
    """What a one-client server would serve: the trunk with peft's LoRA, same seed."""
    trunk = dropout_trunk()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(LORA_SEED)
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS))
        return inject_adapter_in_model(config, trunk)


def client_options(index: int, **changes) -> ClientOptions:
    # A seed per client: its dropout masks are a function of its own steps only.
    return ClientOptions(token=TOKENS[index], seed=100 + index, **changes)


class Learner:
    """One client: its own bottom and top here, its trunk adapter remote."""

    def __init__(self, address: str, index: int) -> None:
        self.index = index
        self.bottom, self.top = local_parts()
        with torch.no_grad():  # clients differ in their local parts too
            for param in self.top.parameters():
                param.add_(0.1 * index)
        self.trunk = RemoteModule(address, options=client_options(index))
        self.optimizer = torch.optim.SGD(
            [*self.bottom.parameters(), *self.top.parameters()], lr=0.1
        )
        self.trunk_optimizer = RemoteOptimizer(self.trunk, torch.optim.Adam, lr=0.05)
        self.losses: list[float] = []
        self._loss: torch.Tensor | None = None

    def forward(self, step: int) -> None:
        x, y = batch(10 * step + self.index)
        out = self.top(self.trunk(self.bottom(x)))
        self._loss = (out - y).pow(2).mean()

    def backward(self) -> None:
        assert self._loss is not None
        self._loss.backward()
        self.losses.append(self._loss.item())
        self._loss = None

    def step(self) -> None:
        self.optimizer.step()
        self.trunk_optimizer.step()
        self.optimizer.zero_grad()
        self.trunk_optimizer.zero_grad()

    def train_alone(self, steps: int) -> None:
        for step in range(steps):
            self.forward(step)
            self.backward()
            self.step()

    def state(self) -> dict[str, torch.Tensor]:
        return {
            **{f"remote.{k}": v for k, v in self.trunk.remote_state_dict().items()},
            **{f"bottom.{k}": v.detach().clone() for k, v in self.bottom.state_dict().items()},
            **{f"top.{k}": v.detach().clone() for k, v in self.top.state_dict().items()},
        }


def per_client_server(start_server: Callable, **changes):
    options = ServerOptions(tokens=TOKENS)
    engine = AdapterEngine(dropout_trunk(), options, adapter_options(**changes))
    return start_server(engine)


def alone(start_server: Callable, index: int, steps: int) -> tuple[list[float], dict]:
    server = start_server(single_tenant_trunk(), ServerOptions(tokens=TOKENS))
    learner = Learner(server.address, index)
    learner.train_alone(steps)
    result = learner.losses, learner.state()
    learner.trunk.close()
    server.stop(grace=None)
    return result


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("resident", [0, 1], ids=["all-resident", "one-resident"])
def test_interleaved_clients_equal_each_client_alone(start_server, resident):
    """4 clients, calls interleaved phase by phase (every forward, then every backward, then
    every step), each bit-exact with itself trained alone; with one adapter resident at a
    time the others move off the device and back between their calls."""
    steps = 3
    server = per_client_server(start_server, max_resident_adapters=resident)
    learners = [Learner(server.address, i) for i in range(4)]
    for step in range(steps):
        for phase in ("forward", "backward", "step"):
            for learner in learners:
                getattr(learner, phase)(*((step,) if phase == "forward" else ()))
    stats = server.stats()
    assert stats["adapters"] == 4
    if resident:
        assert stats["resident_adapters"] == 1  # the last client's; the rest were moved
    got = [(learner.losses, learner.state()) for learner in learners]
    for learner in learners:
        learner.trunk.close()
    for index, (losses, state) in enumerate(got):
        want_losses, want_state = alone(start_server, index, steps)
        assert losses == want_losses
        assert_same_state(state, want_state)
    # Every client's adapter moved away from its (shared) initial weights, differently.
    adapters = [{k: v for k, v in s.items() if k.startswith("remote.")} for _, s in got]
    assert not torch.equal(adapters[0]["remote.0.lora_B.default.weight"], torch.zeros(8, RANK))
    assert not torch.equal(
        adapters[0]["remote.0.lora_B.default.weight"], adapters[1]["remote.0.lora_B.default.weight"]
    )


def test_concurrent_clients_in_threads_equal_each_alone(start_server):
    """The same, the clients in threads of their own (calls truly at the same time)."""
    steps = 2
    server = per_client_server(start_server)
    learners = [Learner(server.address, i) for i in range(4)]
    errors: list[BaseException] = []

    def run(learner: Learner) -> None:
        try:
            learner.train_alone(steps)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(learner,)) for learner in learners]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    got = [(learner.losses, learner.state()) for learner in learners]
    for learner in learners:
        learner.trunk.close()
    for index in (0, 3):  # two of them against their lone runs keeps the test short
        want_losses, want_state = alone(start_server, index, steps)
        assert got[index][0] == want_losses
        assert_same_state(got[index][1], want_state)


def _eval_output(trunk: RemoteModule, x: torch.Tensor | None = None) -> torch.Tensor:
    if x is None:
        x = torch.linspace(-1, 1, 24, dtype=torch.float64).reshape(3, 8)
    trunk.eval()
    with torch.no_grad():
        out = trunk(x)
    trunk.train()
    return out


def test_one_clients_backward_and_step_never_touch_anothers(start_server):
    server = per_client_server(start_server)
    a, b = Learner(server.address, 0), Learner(server.address, 1)
    b.train_alone(1)
    b.forward(5)
    b.backward()  # b holds gradients now, not yet stepped
    b_params = b.trunk.remote_state_dict()
    b_norms = b.trunk.client.grad_norms(2.0)
    b_out = _eval_output(b.trunk)
    a.train_alone(2)
    a.forward(7)
    a.backward()
    assert_same_state(b.trunk.remote_state_dict(), b_params)
    assert b.trunk.client.grad_norms(2.0) == b_norms
    assert torch.equal(_eval_output(b.trunk), b_out)
    a_params = a.trunk.remote_state_dict()
    assert not torch.equal(a_params["0.lora_B.default.weight"], b_params["0.lora_B.default.weight"])
    for learner in (a, b):
        learner.trunk.close()


def test_each_client_has_its_own_statistics_of_the_base(start_server, tmp_path):
    """A base with BatchNorm: a client's training forwards and LoadState move its own running
    statistics, as they would on a server of its own; another client's never move, and each
    client's go to disk with the checkpoint."""
    path = str(tmp_path / "adapters.ckpt")
    options = ServerOptions(tokens=TOKENS, checkpoint_path=path)
    lora = adapter_options(target_modules=("0",))
    server = start_server(AdapterEngine(batchnorm_trunk(), options, lora))
    a, b = (RemoteModule(server.address, options=client_options(i)) for i in (0, 1))
    probe = torch.linspace(-2, 2, 24, dtype=torch.float64).reshape(6, 4)
    a_before = _eval_output(a, probe)
    alone = batchnorm_trunk()  # B's LoRA starts as zero: its forwards are the base's
    for step in range(3):
        x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        with torch.no_grad():
            b(x * 5 + 3)
            alone(x * 5 + 3)
    state = b.state_dict()
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(state[name], alone.state_dict()[name]), name
    assert torch.equal(_eval_output(a, probe), a_before)
    state["1.running_mean"] = torch.full((4,), 50.0, dtype=torch.float64)
    b.load_state_dict(state)
    assert torch.equal(_eval_output(a, probe), a_before)
    server.engine.checkpoint()
    for client in (a, b):
        client.close()
    restored = start_server(AdapterEngine(batchnorm_trunk(), options, lora))
    with RemoteModule(restored.address, options=client_options(1)) as again:
        assert torch.equal(again.state_dict()["1.running_mean"], state["1.running_mean"])
    with RemoteModule(restored.address, options=client_options(0)) as a_again:
        assert torch.equal(_eval_output(a_again, probe), a_before)


def test_training_after_a_validation_pass_works_on_a_per_client_server(start_server):
    """A per-client adapter server runs each adapter on a runner of its own: after session
    15's change of how the trunk's modes are set, a training forward after an eval one failed
    there (the runner lacked the modes the trunk was served in). Its Info names the base's
    BatchNorm, as a single-tenant server's does."""
    lora = adapter_options(target_modules=("0",))
    server = start_server(AdapterEngine(batchnorm_trunk(), ServerOptions(tokens=TOKENS), lora))
    x = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    with RemoteModule(server.address, options=client_options(0)) as remote:
        assert remote.remote_info()["batch_statistics"] == "BatchNorm1d"
        _eval_output(remote, x.detach())
        remote(x).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()


def test_eval_forwards_of_a_base_served_in_eval_mode_draw_no_lora_dropout(start_server):
    """A base served in eval mode (as from_pretrained leaves it): peft made the LoRA layers
    in training mode beneath it, and eval forwards before any training one ran their dropout
    (a client that loads its adapter and validates first got other outputs each time)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    lora = adapter_options(target_modules=("2",), rank=2, dropout=0.5)
    server = start_server(AdapterEngine(base, ServerOptions(tokens=TOKENS), lora))
    with RemoteModule(server.address, options=client_options(0)) as remote:
        names = remote.remote_info()["trainable_parameters"]
        shapes = {n: (2, 4) if "lora_A" in n else (3, 2) for n in names}
        remote.load_remote_state_dict(
            {n: torch.ones(s, dtype=torch.float64) for n, s in shapes.items()}
        )
        remote.eval()
        x = torch.randn(8, 4, dtype=torch.float64)
        with torch.no_grad():
            first, second = remote(x), remote(x)
        assert torch.equal(first, second)


def test_the_per_identity_session_limit_holds_for_adapters_too(start_server):
    options = ServerOptions(tokens=TOKENS, max_sessions=3, max_sessions_per_identity=1)
    server = start_server(AdapterEngine(dropout_trunk(), options, adapter_options()))
    x = torch.zeros(2, 8, dtype=torch.float64)
    with RemoteModule(server.address, options=client_options(0)) as first, torch.no_grad():
        first(x)
        second = RemoteModule(server.address, options=client_options(0))
        with second, pytest.raises(LimitExceeded, match="max_sessions_per_identity=1"):
            second(x)
        with RemoteModule(server.address, options=client_options(1)) as other:
            other(x)  # another identity still gets its session


def test_a_client_cannot_read_load_or_release_anothers_adapter(start_server):
    server = per_client_server(start_server)
    a = RemoteModule(server.address, options=client_options(0))
    b = RemoteModule(server.address, options=client_options(1))
    fresh = a.adapter_state_dict()
    a_optimizer = RemoteOptimizer(a, torch.optim.SGD, lr=0.5)
    x = torch.randn(3, 8, dtype=torch.float64)
    a(x).pow(2).sum().backward()
    a_optimizer.step()
    trained = a.adapter_state_dict()
    assert any(not torch.equal(trained[k], fresh[k]) for k in fresh)
    # b reads its own adapter, still the initial one: a's weights are out of its reach.
    assert_same_state(b.adapter_state_dict(), fresh)
    # An adapter of fewer target modules is refused whole (it loaded the subset, and left the
    # other layers as they were, without a word).
    part = {k: v for k, v in fresh.items() if k.startswith("0.")}
    with pytest.raises(ValueError, match=r"lacks 2 of the trunk's LoRA weights \(3\.lora_A"):
        b.load_adapter_state_dict({k: v + 1 for k, v in part.items()})
    assert_same_state(b.adapter_state_dict(), fresh)
    # b loads an adapter: only b's changes.
    b.load_adapter_state_dict({k: v + 1 for k, v in fresh.items()})
    assert_same_state(a.adapter_state_dict(), trained)
    assert_same_state(b.adapter_state_dict(), {k: v + 1 for k, v in fresh.items()})
    # Nobody can write the frozen base: its weights are no trainable parameter.
    with pytest.raises(InvalidRequest, match="no trainable parameter named"):
        b.load_remote_state_dict({"0.base_layer.weight": torch.zeros(16, 8, dtype=torch.float64)})
    # b cannot release a's forward context: a's Backward still finds it.
    header, _ = a.client.compute(
        "a-forward",
        [x.requires_grad_()],
        {},
        needs_input_grad=[True],
        keep_context=True,
        training=True,
    )
    stub = b.client._connect()
    released = stub.Release(pb.ReleaseRequest(request_ids=["a-forward"]), **b.client._kw(30))
    assert released.released == 0
    grads, _ = a.client.backward("a-forward", 1, [torch.ones(3, 8, dtype=torch.float64)], [True])
    assert grads["grads"][0].shape == (3, 8)
    # The same identity on a new connection (another session) gets its adapter back.
    again = RemoteModule(server.address, options=client_options(0))
    assert_same_state(again.adapter_state_dict(), trained)
    for trunk in (a, b, again):
        trunk.close()


def test_max_adapters_refuses_with_resource_exhausted(start_server):
    server = per_client_server(start_server, max_adapters=2)
    trunks = [RemoteModule(server.address, options=client_options(i)) for i in range(3)]
    x = torch.randn(2, 8, dtype=torch.float64)
    trunks[0](x)
    trunks[1](x)
    assert trunks[2].remote_info()["trainable_numel"] > 0  # Info makes no adapter
    with pytest.raises(LimitExceeded, match="max_adapters=2") as caught:
        trunks[2](x)
    assert caught.value.status == grpc.StatusCode.RESOURCE_EXHAUSTED
    trunks[0](x)  # the two existing ones go on
    assert server.stats()["adapters"] == 2
    for trunk in trunks:
        trunk.close()


def test_bad_adapter_options_are_refused_by_name():
    with pytest.raises(ValueError, match="target_modules"):
        AdapterEngine(dropout_trunk(), ServerOptions(), AdapterOptions(target_modules=()))
    with pytest.raises(ValueError, match="rank"):
        AdapterEngine(dropout_trunk(), ServerOptions(), adapter_options(rank=0))
    with pytest.raises(ValueError, match="none of the target modules.*--lora-targets"):
        AdapterEngine(dropout_trunk(), ServerOptions(), adapter_options(target_modules=("nope",)))
    with pytest.raises(ValueError, match="a target module is not a layer LoRA adapts"):
        AdapterEngine(dropout_trunk(), ServerOptions(), adapter_options(target_modules=("1",)))


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attn(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("targets", [("attn",), ("out_proj",), ("proj", "attn")])
def test_lora_on_multihead_attention_is_refused_by_name(targets):
    """peft merges a MultiheadAttention's adapter into the base weights around every forward,
    registering new tensors: each client got a private copy of the frozen base, drifting from
    it and kept in no checkpoint (a restarted server computed something else). And the
    attention reads out_proj's weight without calling it: an adapter there never ran."""
    trunk = nn.Sequential(nn.Linear(8, 8), _Attention()).double()
    with pytest.raises(ValueError, match=r"nn.MultiheadAttention \(1.attn.*--lora-targets"):
        AdapterEngine(trunk, ServerOptions(tokens=TOKENS), adapter_options(target_modules=targets))
    engine = AdapterEngine(
        trunk, ServerOptions(tokens=TOKENS), adapter_options(target_modules=("proj",))
    )
    assert list(engine.info().trainable_parameters) == [
        "1.proj.lora_A.default.weight",
        "1.proj.lora_B.default.weight",
    ]


def test_idle_adapters_move_off_the_device_and_come_back(start_server):
    """The offload path (here cpu -> cpu: the same code moves cuda -> cpu on a GPU server)."""
    server = per_client_server(start_server)
    engine: AdapterEngine = server.engine
    learner = Learner(server.address, 0)
    learner.train_alone(1)
    before = learner.trunk.remote_state_dict()
    (adapter,) = engine._adapters.values()
    assert adapter.engine.step_backup.nbytes() > 0  # the Step's copies, on the device
    assert engine.offload_idle(older_than=0.0) == 1
    assert server.stats()["resident_adapters"] == 0
    assert adapter.engine.step_backup.nbytes() == 0  # they leave the device with the adapter
    learner.train_alone(1)  # comes back and trains on
    assert server.stats()["resident_adapters"] == 1
    assert not torch.equal(
        learner.trunk.remote_state_dict()["0.lora_B.default.weight"],
        before["0.lora_B.default.weight"],
    )
    learner.trunk.close()


def test_restart_from_checkpoint_keeps_every_adapter(tmp_path):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("\n".join(TOKENS[:2]) + "\n")
    path = tmp_path / "adapters.ckpt"
    args = (
        "--adapters=per-client",
        f"--lora-rank={RANK}",
        f"--lora-alpha={ALPHA}",
        "--lora-targets=0,3",
        f"--checkpoint={path}",
        f"--token-file={tokens}",
    )
    process, address = spawn_server("factories:dropout_trunk", *args)
    try:
        learners = [Learner(address, i) for i in range(2)]
        for index, learner in enumerate(learners):
            learner.train_alone(1 + index)
        saved = [learner.trunk.adapter_state_dict() for learner in learners]
        for learner in learners:
            learner.trunk.close()
    finally:
        process.send_signal(signal.SIGTERM)  # a graceful stop saves the checkpoint
        process.communicate(timeout=60)
    assert path.exists()
    process, address = spawn_server("factories:dropout_trunk", *args)
    try:
        for index in range(2):
            trunk = RemoteModule(address, options=client_options(index))
            assert_same_state(trunk.adapter_state_dict(), saved[index])
            trunk.close()
    finally:
        process.kill()
        process.communicate(timeout=60)


def test_downloaded_adapter_loads_into_a_local_peft_model(start_server, tmp_path):
    """A GPT-2 trunk: the adapter trained remotely, saved as safetensors, loaded with peft's
    set_peft_model_state_dict into a local trunk, gives the remote trunk's outputs."""
    from safetensors.torch import load_file

    from remote_autograd.hf import LoraOptions, ModelSpec, build_trunk

    spec = ModelSpec(n_layer=3, n_embd=32, n_head=2, n_positions=32, trunk_start=1, trunk_end=2)
    targets = ("c_attn", "c_proj", "c_fc")
    base = build_trunk(spec, LoraOptions(rank=0))
    options = AdapterOptions(rank=4, alpha=8, target_modules=targets, seed=spec.seed + 2)
    server = start_server(AdapterEngine(base, ServerOptions(), options))
    trunk = RemoteModule(server.address, options=ClientOptions(seed=3))
    local = build_trunk(spec, LoraOptions(rank=4, alpha=8, target_modules=targets))
    # The adapter starts where a single-tenant trunk's does.
    fresh = {n: p for n, p in local.named_parameters() if "lora_" in n}
    assert_same_state(trunk.remote_state_dict(), {n: p.detach() for n, p in fresh.items()})
    optimizer = RemoteOptimizer(trunk, torch.optim.Adam, lr=0.05)
    hidden = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        trunk(hidden).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    path = tmp_path / "adapter.safetensors"
    trunk.save_adapter(str(path))
    result = set_peft_model_state_dict(local, load_file(str(path)))
    assert not result.unexpected_keys
    local.eval()
    trunk.eval()
    with torch.no_grad():
        assert torch.equal(trunk(hidden), local(hidden))
    # Uploading it again (resume) is accepted and changes nothing.
    trunk.load_adapter(str(path))
    with torch.no_grad():
        assert torch.equal(trunk(hidden), local(hidden))
    trunk.close()


def test_demo_with_three_clients_trains_three_adapters_of_one_trunk(tmp_path, capsys):
    """``remote-autograd demo --clients 3``: the unchanged GPT-2 trainer, three at once
    against one ``serve --adapters per-client`` child process, one loss curve each. Client 0
    trains exactly as in a run beside other clients (the trainers once shared one process, whose
    random generator each seeded to build its model while the others drew from it: they
    built other frozen weights than the server's)."""
    import json

    from remote_autograd.cli import main

    tiny = ["--n-layer=4", "--n-embd=32", "--n-head=2", "--n-positions=64", "--trunk-layers=1:3"]
    run = ["--steps=2", "--batch-size=2", "--grad-accum=1", "--seq-len=32", "--lora-rank=2"]
    main(["demo", *tiny, *run, "--clients=3", f"--out-dir={tmp_path}"])
    out = capsys.readouterr().out
    assert "with one adapter per client" in out
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert "adapter created for client" in (tmp_path / "server.log").read_text()
    adapters = []
    for index in range(3):
        assert f"client {index}: loss" in out
        metrics = json.loads((tmp_path / f"client-{index}" / "metrics.json").read_text())
        assert len(metrics["steps"]) == 2
        assert metrics["lora_change"]["trunk"] > 0
        saved = torch.load(
            tmp_path / f"client-{index}" / "checkpoints" / "step_000002.pt", weights_only=True
        )
        adapters.append(saved["trunk"])
    # Three different adapters: each client trained its own.
    name = next(n for n in adapters[0] if "lora_B" in n)
    assert not torch.equal(adapters[0][name], adapters[1][name])
    assert not torch.equal(adapters[1][name], adapters[2][name])
    # Client 0 again, beside one other client only: the same run, loss for loss.
    again = tmp_path / "again"
    main(["demo", *tiny, *run, "--clients=2", f"--out-dir={again}"])
    first = json.loads((tmp_path / "client-0" / "metrics.json").read_text())["steps"]
    second = json.loads((again / "client-0" / "metrics.json").read_text())["steps"]
    assert [m["loss"] for m in first] == [m["loss"] for m in second]


class _MeetingTrunk(nn.Module):
    """A trunk whose forward waits at ``meeting`` (a class attribute: replicas share it). Its
    dropout is off, and its config names the dropout of a head it does not hold, as GPT-2's
    does (``summary_first_dropout``: such names made GPT-2 trunks served with --dropout 0
    take the random lock)."""

    meeting: threading.Barrier | None = None

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 8).double()
        self.drop = nn.Dropout(0.0)
        self.config = types.SimpleNamespace(summary_first_dropout=0.1, attn_pdrop=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _MeetingTrunk.meeting is not None:
            _MeetingTrunk.meeting.wait(timeout=60)
        return self.drop(self.layer(x))


def test_forwards_of_different_clients_run_at_the_same_time(start_server):
    """Two clients' seeded training forwards meet inside the trunk: neither waits for the
    other's to finish (were they serialised behind one lock, the barrier would break)."""
    options = AdapterOptions(rank=2, target_modules=("layer",), offload_after=0.0)
    server = start_server(AdapterEngine(_MeetingTrunk(), ServerOptions(tokens=TOKENS), options))
    trunks = [RemoteModule(server.address, options=client_options(i)) for i in range(2)]
    x = torch.randn(2, 8, dtype=torch.float64)
    for trunk in trunks:
        trunk(x)  # each client's adapter exists before they meet
    _MeetingTrunk.meeting = threading.Barrier(2)
    outputs: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def forward_and_backward(trunk: RemoteModule) -> None:
        try:
            out = trunk(x.clone().requires_grad_())
            out.sum().backward()
            outputs.append(out)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=forward_and_backward, args=(t,)) for t in trunks]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    finally:
        _MeetingTrunk.meeting = None
    assert not errors, errors
    assert len(outputs) == 2
    for trunk in trunks:
        trunk.close()


# How each kind of client certificate names its holder: two certificates of each kind.
_NAMINGS = {
    "cn": lambda who: (f"client-{who}", ""),
    "san": lambda who: (None, f"subjectAltName=URI:spiffe://lab/client-{who}\n"),
    "neither": lambda who: (None, ""),
}


@pytest.mark.parametrize("naming", _NAMINGS)
def test_under_mutual_tls_each_certificate_has_its_own_adapter(start_server, tmp_path, naming):
    """By its CN; without one by its subjectAltNames; without either by its fingerprint. (gRPC
    gives a certificate without a CN an empty one: every such certificate was once
    'anonymous/cn=', and all of them trained one adapter.)"""
    from pki import _issue, make_pki

    pki = make_pki(tmp_path)
    for who in ("a", "b"):
        cn, ext = _NAMINGS[naming](who)
        _issue(tmp_path, who, "ca", cn, ext + "extendedKeyUsage=clientAuth")
    pem = {
        who: [(tmp_path / f"{who}.{kind}").read_bytes() for kind in ("pem", "key")] for who in "ab"
    }
    options = ServerOptions(
        certificate_chain=pki["server.pem"], private_key=pki["server.key"], client_ca=pki["ca.pem"]
    )
    server = start_server(AdapterEngine(dropout_trunk(), options, adapter_options()))

    def connect(who: str) -> RemoteModule:
        chain, key = pem[who]
        client = ClientOptions(
            root_certificates=pki["ca.pem"], certificate_chain=chain, private_key=key, seed=1
        )
        return RemoteModule(server.address, options=client)

    first = connect("a")
    second = connect("b")
    fresh = second.adapter_state_dict()
    optimizer = RemoteOptimizer(first, torch.optim.SGD, lr=0.5)
    first(torch.randn(3, 8, dtype=torch.float64)).pow(2).sum().backward()
    optimizer.step()
    trained = first.adapter_state_dict()
    assert_same_state(second.adapter_state_dict(), fresh)
    again = connect("a")  # the same certificate, a new connection
    assert_same_state(again.adapter_state_dict(), trained)
    expected = {
        "cn": lambda who: f"cn=client-{who}",
        "san": lambda who: f"san=URI:spiffe://lab/client-{who}",
        "neither": lambda who: (
            "sha256=" + hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem[who][0].decode())).hexdigest()
        ),
    }[naming]
    assert sorted(a.identity for a in server.engine._adapters.values()) == sorted(
        f"anonymous/{expected(who)}" for who in "ab"
    )
    for trunk in (first, second, again):
        trunk.close()


def test_different_alternative_names_never_make_one_identity():
    """gRPC reports subjectAltNames untyped and typed; the name takes them typed and escaped."""
    apart = [
        ({"peer_dns": [b"10.0.0.1"]}, {"peer_ip": [b"10.0.0.1"]}),
        ({"peer_uri": [b"spiffe://lab/a,URI:b"]}, {"peer_uri": [b"spiffe://lab/a", b"b"]}),
        ({"peer_email": [b"a%2Cb@lab"]}, {"peer_email": [b"a,b@lab"]}),
    ]
    for one, other in apart:
        assert certificate_name(one) != certificate_name(other)
    same = {"peer_dns": [b"b.lab", b"a.lab"]}, {"peer_dns": [b"a.lab", b"b.lab"]}
    assert certificate_name(same[0]) == certificate_name(same[1]) == "/san=DNS:a.lab,DNS:b.lab"
    with pytest.raises(AuthenticationError, match="names no one"):
        certificate_name({"x509_common_name": [b""]})


def test_checkpoint_every_step_restores_adapters_and_optimizer_state(start_server, tmp_path):
    """In process: checkpoint_every counts the Steps of all adapters; a new engine on the file
    holds every adapter and every session's optimizer state; other LoRA options are refused."""
    path = str(tmp_path / "adapters.ckpt")
    options = ServerOptions(tokens=TOKENS, checkpoint_path=path, checkpoint_every=2)
    engine = AdapterEngine(dropout_trunk(), options, adapter_options())
    server = start_server(engine)
    learners = [Learner(server.address, i) for i in range(2)]
    learners[0].train_alone(1)
    assert not (tmp_path / "adapters.ckpt").exists()  # one Step so far
    learners[1].train_alone(1)  # the second Step, of another adapter: due
    assert (tmp_path / "adapters.ckpt").exists()
    states = [learner.trunk.adapter_state_dict() for learner in learners]
    optimizer_states = {
        s.key: s.optimizer.state_dict()["state"] for s in engine.sessions.values() if s.optimizer
    }
    for learner in learners:
        learner.trunk.close()
    restored = AdapterEngine(dropout_trunk(), options, adapter_options())
    assert restored.stats()["adapters"] == 2
    for key, state in optimizer_states.items():
        session = next(s for s in restored.sessions.values() if s.key == key)
        assert session.last_step == 1
        for index, moments in state.items():
            got = session.optimizer.state_dict()["state"][index]
            assert all(torch.equal(got[k], v) for k, v in moments.items())
    server = start_server(restored)
    for index in range(3):  # the third, a new client: a new adapter
        trunk = RemoteModule(server.address, options=client_options(index))
        if index < 2:
            assert_same_state(trunk.adapter_state_dict(), states[index])
        else:
            with torch.no_grad():
                trunk(torch.randn(3, 8, dtype=torch.float64))
        trunk.close()
    # A restored adapter stops for an abandoned call as a new one does: its replica has the
    # base's cancellation hooks (restored before the service installed them, it once had none).
    hooks = [
        sum(len(m._forward_pre_hooks) for m in adapter.engine.module.modules())
        for adapter in restored._adapters.values()
    ]
    assert len(hooks) == 3 and hooks[0] == hooks[1] == hooks[2] > 0
    with pytest.raises(
        ValueError, match="its adapters were trained with rank=4, this server has rank=2"
    ):
        AdapterEngine(dropout_trunk(), options, adapter_options(rank=2))


def test_an_uploaded_adapter_is_checkpointed_under_checkpoint_every(start_server, tmp_path):
    """A single trunk checkpointing every few steps keeps what a LoadState brought; the adapters
    engine did not (its adapters' engines save nothing themselves): a kill after an upload
    brought back the adapter before it. A new engine on the file holds the upload."""
    path = str(tmp_path / "adapters.ckpt")
    options = ServerOptions(tokens=TOKENS, checkpoint_path=path, checkpoint_every=5)
    server = start_server(AdapterEngine(dropout_trunk(), options, adapter_options()))
    trunk = RemoteModule(server.address, options=client_options(0))
    upload = {k: torch.full_like(v, 0.25) for k, v in trunk.adapter_state_dict().items()}
    trunk.load_adapter_state_dict(upload)
    trunk.close()
    restored = AdapterEngine(dropout_trunk(), options, adapter_options())  # no graceful stop
    assert restored.stats()["adapters"] == 1
    (adapter,) = restored._adapters.values()
    got = {name: p.detach() for name, p in adapter.engine.params}
    assert_same_state(to_peft_names(got), upload)


def test_a_new_run_meeting_its_trained_adapter_is_warned(start_server):
    """Info told every client weights version 0 (each adapter "starts fresh"), so a run with
    the token of one that trained before, or after a restart from a checkpoint, went on from
    that adapter without the SteppedTrunkWarning a single trunk gives. Now Info tells the
    caller's own adapter's version: warned with that token, not with another."""
    server = per_client_server(start_server)
    Learner(server.address, 0).train_alone(2)
    x = torch.randn(3, 8, dtype=torch.float64)
    again = RemoteModule(server.address, options=client_options(0))
    with pytest.warns(SteppedTrunkWarning, match="weights version 2"):
        again(x)
    other = RemoteModule(server.address, options=client_options(1))
    other(x)  # no warning: its adapter is new (warnings are errors in this suite)
    again.close()
    other.close()


@pytest.mark.parametrize("mismatch", ["max_lr", "max_sessions_per_identity", "max_sessions"])
def test_a_checkpoint_beyond_this_servers_limits_is_refused_whole(start_server, tmp_path, mismatch):
    """A restart whose checkpoint a session of does not fit this server's options: refused at
    start naming the file and the option, with nothing of it loaded (it raised the refusal of
    a call, InvalidRequest or LimitExceeded with a call's advice, half loaded)."""
    path = str(tmp_path / "adapters.ckpt")
    options = ServerOptions(tokens=TOKENS, checkpoint_path=path)
    engine = AdapterEngine(dropout_trunk(), options, adapter_options())
    server = start_server(engine)
    learners = [Learner(server.address, 0), Learner(server.address, 0), Learner(server.address, 1)]
    for learner in learners:
        learner.train_alone(1)  # 3 sessions, two of token 0, each with its Adam
    engine.checkpoint()
    changed = {
        "max_lr": {"max_lr": 0.01},  # the saved Adam steps with lr=0.05
        "max_sessions_per_identity": {"max_sessions_per_identity": 1},
        "max_sessions": {"max_sessions": 2},
    }[mismatch]
    with pytest.raises(ValueError, match=f"checkpoint {path} cannot be restored.*{mismatch}"):
        AdapterEngine(dropout_trunk(), dataclasses.replace(options, **changed), adapter_options())
    for learner in learners:
        learner.trunk.close()


# -- one client's dropout masks are its own, whatever the others do --------------------------------


class _Pause(nn.Module):
    """After a dropout layer: every forward waits here (up to 1.5 s) for another one, so that
    another client's call runs in the middle of a training forward if it can."""

    meeting: threading.Barrier | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _Pause.meeting is not None:
            with contextlib.suppress(threading.BrokenBarrierError):  # it did not come: a lock
                _Pause.meeting.wait(1.5)
        return x


class _FunctionalDropout(nn.Module):
    """Dropout as Hugging Face attention applies it: F.dropout with a float attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.attention_dropout = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(x, self.attention_dropout, self.training)


class _StochasticDepth(nn.Module):
    """Drops whole samples at random, from ``torch.rand``: no dropout layer, no dropout name."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = torch.rand(x.shape[0], 1, dtype=x.dtype) >= 0.5
        return x * keep / 0.5


class _SelfSeeded(nn.Module):
    """Noise from a seed of its own inside fork_rng, as the trainer's GPT-2 trunk seeds its
    dropout: the generator is where it was after the forward, so watching it sees nothing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(1 << 30, ())))  # from the seeded generator
            return x * (torch.rand_like(x) >= 0.5)


_DRAWS: dict[str, Callable[[], nn.Module]] = {
    "dropout": lambda: nn.Dropout(0.5),
    "functional": _FunctionalDropout,
    "rrelu": nn.RReLU,  # a random negative slope per element in training
    "stochastic_depth": _StochasticDepth,
    "self_seeded": _SelfSeeded,  # with AdapterOptions(lock_forwards=True)
}


def _paused_trunk(draw: str) -> nn.Module:
    torch.manual_seed(3)
    layer = _DRAWS[draw]
    layers = [nn.Linear(8, 8), layer(), _Pause(), layer(), _Pause(), nn.Linear(8, 8)]
    return nn.Sequential(*layers).double()


@pytest.mark.parametrize(
    ("draw", "meanwhile"),
    [
        ("dropout", "eval_forward"),
        ("functional", "training_forward"),
        ("dropout", "new_client"),
        ("rrelu", "training_forward"),
        ("stochastic_depth", "training_forward"),
        ("dropout", "training_forward_after_an_empty_batch"),
        ("self_seeded", "training_forward"),
    ],
)
def test_another_clients_call_in_the_middle_of_a_forward_leaves_its_masks_alone(draw, meanwhile):
    """Client A's training forward pauses between two layers that draw while client B makes
    an eval forward with grad (it was seeded: the process-wide generator was set under A), a
    training forward of a trunk whose dropout is functional (attention_dropout: no lock was
    taken), or whose layers draw but are no dropout (RReLU, stochastic depth: no lock either),
    or its first call (peft initialised B's adapter from the generator under A), or a
    training forward after its first was an empty batch (dropout draws nothing for one: B's
    adapter was taken to draw nothing, and ran unlocked). A's output equals A's alone, bit for
    bit."""
    x = torch.linspace(-1, 1, 32, dtype=torch.float64).reshape(4, 8).requires_grad_()
    outputs = []
    for beside in (False, True):
        options = adapter_options(
            target_modules=("0", "5"), lock_forwards=True if draw == "self_seeded" else None
        )
        engine = AdapterEngine(_paused_trunk(draw), ServerOptions(tokens=TOKENS), options)
        server = serve(engine, "127.0.0.1:0")
        a, b = (RemoteModule(server.address, options=client_options(i)) for i in (0, 1))
        try:
            if meanwhile == "training_forward_after_an_empty_batch":
                b(x[:0].detach())
            elif meanwhile != "new_client":
                with torch.no_grad():
                    b(x)  # B's adapter exists
            if meanwhile == "eval_forward":
                b.eval()
            got: dict[str, torch.Tensor] = {}
            if beside:
                _Pause.meeting = meeting = threading.Barrier(2)
                thread = threading.Thread(target=lambda c=a, g=got: g.setdefault("a", c(x.clone())))
                thread.start()
                wait_for(lambda m=meeting: m.n_waiting == 1)  # A drew its first masks
                with torch.no_grad() if meanwhile == "new_client" else contextlib.nullcontext():
                    b(x.clone().requires_grad_(meanwhile != "new_client"))
                thread.join(60)
            else:
                got["a"] = a(x.clone())
            outputs.append(got["a"].detach())
        finally:
            _Pause.meeting = None
            a.close()
            b.close()
            server.stop(grace=None)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)


def _checkpoint_adapters(engine: AdapterEngine, clients: int) -> None:
    """Serve ``engine``, let ``clients`` clients each take one Adam step, save, stop."""
    server = serve(engine, "127.0.0.1:0")
    try:
        for index in range(clients):
            client = RemoteModule(server.address, options=client_options(index))
            optimizer = RemoteOptimizer(client, torch.optim.Adam, lr=0.01)
            client(torch.randn(3, 8, dtype=torch.float64, requires_grad=True)).sum().backward()
            optimizer.step()
        engine.checkpoint()
    finally:
        server.stop(grace=None)


@pytest.mark.parametrize("device", ["nosuchdevice", "cuda:99"])
def test_an_offload_device_this_machine_lacks_is_refused_at_start(device):
    """Refused by name when the server starts (it was found at the first offload, failing
    another client's call and leaving that client's adapter counted busy for good)."""
    with pytest.raises(ValueError, match=f"AdapterOptions.offload_device .* got '{device}'"):
        AdapterEngine(
            dropout_trunk(), ServerOptions(tokens=TOKENS), adapter_options(offload_device=device)
        )


def test_a_restart_keeps_max_resident_adapters_and_a_single_trunk_refuses_the_file(tmp_path):
    """Every adapter of the checkpoint was made resident at start, the whole table on the
    device until some call ran the limit; and a single-trunk server given the file named no
    cause (KeyError 'module')."""
    path = str(tmp_path / "adapters.ckpt")
    options = ServerOptions(tokens=TOKENS, checkpoint_path=path)
    limited = adapter_options(max_resident_adapters=1)
    _checkpoint_adapters(AdapterEngine(dropout_trunk(), options, limited), clients=3)
    restored = AdapterEngine(dropout_trunk(), options, limited)
    assert restored.stats()["adapters"] == 3 and restored.stats()["resident_adapters"] == 1
    with pytest.raises(ValueError, match="is a checkpoint of per-client adapters"):
        serve(dropout_trunk(), options=ServerOptions(checkpoint_path=path))


def test_adapters_trained_with_other_lora_options_or_another_base_are_refused(tmp_path):
    """Adapters of the same shapes trained with another alpha, or on another base (here one
    weight moved), loaded without a word and computed something else."""
    path = str(tmp_path / "adapters.ckpt")
    options = ServerOptions(tokens=TOKENS, checkpoint_path=path)
    _checkpoint_adapters(AdapterEngine(dropout_trunk(), options, adapter_options()), clients=1)
    with pytest.raises(ValueError, match=f"trained with alpha={ALPHA}, this server has alpha=32"):
        AdapterEngine(dropout_trunk(), options, adapter_options(alpha=32))
    other = dropout_trunk()
    with torch.no_grad():
        other[0].weight[0, 0] += 1.0
    with pytest.raises(ValueError, match="trained on another base trunk"):
        AdapterEngine(other, options, adapter_options())
    as_float32 = dataclasses.replace(options, dtype="float32")
    with pytest.raises(ValueError, match="dtype='float64', this server has dtype='float32'"):
        AdapterEngine(dropout_trunk(), as_float32, adapter_options())
    assert AdapterEngine(dropout_trunk(), options, adapter_options()).stats()["adapters"] == 1


def test_a_checkpoint_reply_says_only_the_callers_own_version(tmp_path):
    """The reply's weights_version was every adapter's steps summed: what other clients did."""
    options = ServerOptions(
        tokens=TOKENS, checkpoint_path=str(tmp_path / "a.ckpt"), min_checkpoint_interval=0
    )
    server = serve(AdapterEngine(dropout_trunk(), options, adapter_options()), "127.0.0.1:0")
    try:
        a, b = (RemoteModule(server.address, options=client_options(i)) for i in (0, 1))
        optimizer = RemoteOptimizer(a, torch.optim.Adam, lr=0.01)
        for _ in range(3):
            a(torch.randn(3, 8, dtype=torch.float64, requires_grad=True)).sum().backward()
            optimizer.step()
        assert a.client.checkpoint().weights_version == 3
        assert b.client.checkpoint().weights_version == 0
    finally:
        server.stop(grace=None)


def test_forwards_not_locked_on_request_are_still_seeded(start_server):
    """AdapterOptions(lock_forwards=False) turns the random lock off, not the seeds: the same
    client seed gives the same dropout masks (it dropped the seed, and a recompute drew other
    masks than its forward)."""
    options = adapter_options(lock_forwards=False)
    server = start_server(AdapterEngine(dropout_trunk(), ServerOptions(tokens=TOKENS), options))
    x = torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    outputs = []
    for index in (0, 0, 1):  # client 1: another seed, its adapter the same initial one
        with RemoteModule(server.address, options=client_options(index)) as trunk:
            outputs.append(trunk(x))  # each a new session: the same seed for its first forward
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], outputs[2])  # the masks come from the seed
