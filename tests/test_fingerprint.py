"""The two sides check that they match: the trunk's fingerprint in Info, checked by a client
given one (the GPT-2 trainer always gives one), and a warning when a run starts from a trunk
that another session has already stepped."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from models import mlp_parts
from torch import nn

from remote_autograd import (
    ClientOptions,
    RemoteModule,
    RemoteOptimizer,
    ServerOptions,
    SteppedTrunkWarning,
    TrunkMismatch,
    serve,
    trunk_fingerprint,
)
from remote_autograd.cli import build_parser, main
from remote_autograd.hf import build_trunk
from remote_autograd.hf.cli import model_options


def _client(address: str, expected: nn.Module) -> RemoteModule:
    return RemoteModule(address, options=ClientOptions(fingerprint=trunk_fingerprint(expected)))


def test_fingerprint_describes_structure_names_shapes_and_dtypes():
    trunk = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    description = json.loads(trunk_fingerprint(trunk))
    assert ["0", "Linear", "in_features=4, out_features=8, bias=True"] in description["modules"]
    assert ["0.weight", [8, 4], "float32", True] in description["parameters"]
    assert ["1.num_batches_tracked", [], "int64"] in description["buffers"]
    assert trunk_fingerprint(copy.deepcopy(trunk)) == trunk_fingerprint(trunk)  # values aside
    trunk[0].requires_grad_(False)
    assert ["0.weight", [8, 4], "float32", False] in json.loads(trunk_fingerprint(trunk))[
        "parameters"
    ]


def test_a_matching_trunk_is_served_and_a_different_one_refused_by_name(start_server):
    _, trunk, _ = mlp_parts(torch.float64)
    expected = copy.deepcopy(trunk)
    server = start_server(trunk)
    x = torch.randn(2, 12, dtype=torch.float64)
    matching = _client(server.address, expected)
    assert torch.equal(matching(x), expected(x))
    assert matching.remote_info()["fingerprint"] == trunk_fingerprint(expected)

    wider = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh()).double()
    refused = _client(server.address, wider)
    with pytest.raises(TrunkMismatch) as raised:
        refused(x)
    assert refused.client.stats.calls == 1  # Info only: refused before computing anything
    message = str(raised.value)
    assert "ClientOptions.fingerprint" in message and server.address in message
    assert "0.weight: shape [16, 12] expected, [12, 12] served" in message
    assert "out_features=16" in message  # the module's own description differs too

    with pytest.raises(TrunkMismatch, match=r"0\.weight: dtype 'float32' expected, 'float64'"):
        _client(server.address, copy.deepcopy(expected).float())(x)
    deeper = nn.Sequential(*expected, nn.Linear(12, 12)).double()
    with pytest.raises(TrunkMismatch, match=r"parameters expected but not served: 4\.weight"):
        _client(server.address, deeper).remote_info()


def test_the_fingerprint_is_of_the_module_before_the_servers_dtype_cast(start_server):
    _, trunk, _ = mlp_parts(torch.float32)
    expected = copy.deepcopy(trunk)
    server = start_server(trunk, ServerOptions(dtype="float64"))
    x = torch.randn(2, 12)
    torch.testing.assert_close(_client(server.address, expected)(x), expected(x))


def test_a_run_from_a_trunk_stepped_by_another_session_warns(start_server):
    _, trunk, _ = mlp_parts(torch.float64)
    server = start_server(trunk)
    x = torch.randn(2, 12, dtype=torch.float64)
    first = RemoteModule(server.address)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fresh trunk: no warning
        first(x).sum().backward()
        RemoteOptimizer(first, torch.optim.SGD, lr=0.1).step()
        first(x).sum().backward()  # its own steps are no news to it
    second = RemoteModule(server.address)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            second(x)  # inference is not a run
    with pytest.warns(SteppedTrunkWarning, match="weights version 1"):
        second(x).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second(x).sum().backward()  # once per session
        # A session that loads its own state first resumes on purpose: no warning.
        resumed = RemoteModule(server.address)
        resumed.load_remote_state_dict(first.remote_state_dict())
        resumed(x).sum().backward()


def test_the_trainer_refuses_a_server_with_other_trunk_layers(start_server, tmp_path):
    """`remote-autograd train --trunk-layers 1:5` against a server started with 2:4."""
    flags = ["--n-layer=6", "--n-embd=32", "--n-head=2", "--n-positions=64", "--lora-rank=2"]
    served = build_parser().parse_args(["train", *flags, "--trunk-layers=2:4"])
    server = start_server(build_trunk(*model_options(served)))
    argv = ["train", *flags, "--trunk-layers=1:5", "--server", server.address]
    argv += ["--steps=1", "--batch-size=2", "--seq-len=16", f"--out-dir={tmp_path}"]
    with pytest.raises(SystemExit) as raised:
        main(argv)
    message = str(raised.value)
    assert message.startswith("train: the trunk served at " + server.address)
    assert "blocks [1, 5) of a gpt2' expected, 'blocks [2, 4) of a gpt2' served" in message
    assert "parameters expected but not served: blocks.2." in message
    # Refused at the handshake: nothing trained (an Info call holds no session).
    assert server.stats()["sessions"] == 0 and server.stats()["weights_version"] == 0


def test_a_restarted_server_with_another_trunk_is_refused(start_server):
    _, trunk, _ = mlp_parts(torch.float64)
    expected = copy.deepcopy(trunk)
    first = start_server(trunk)
    options = ClientOptions(fingerprint=trunk_fingerprint(expected), retries=20)
    remote = RemoteModule(first.address, options=options)
    x = torch.randn(2, 12, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(remote(x), expected(x))
        first.stop(grace=None)
        other = nn.Sequential(nn.Linear(12, 12), nn.Tanh()).double()  # takes the same inputs
        second = serve(other, first.address)  # what answers at that address now
        try:
            with pytest.raises(TrunkMismatch, match=r"parameters expected but not served: 2\."):
                remote(x)
        finally:
            second.stop(grace=None)
