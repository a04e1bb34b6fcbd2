"""Connecting: malformed addresses fail at construction, unreachable servers fail fast, each
with a message that names the problem."""

from __future__ import annotations

import socket
import threading

import pytest
import torch

from remote_autograd import ClientOptions, RemoteModule, ServerUnavailable
from remote_autograd.addresses import accepts_connections, bulk_host

PATIENT = ClientOptions(connect_timeout=60.0)  # longer than the guard below: a hang fails


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("localhost", "names no port"),
        ("http://127.0.0.1:5000", "drop the 'http://'"),
        ("https://example.org:443", "drop the 'https://'"),
        ("127.0.0.1:99999", "port must be a number from 1 to 65535, got '99999'"),
        ("127.0.0.1:0", "port must be a number from 1 to 65535, got '0'"),
        ("127.0.0.1:http", "port must be a number"),
        ("::1:5000", "IPv6 address goes in brackets"),
        ("dns:///localhost", "names no port"),
    ],
)
def test_a_malformed_address_is_refused_at_construction(address, message):
    with pytest.raises(ValueError, match=message) as caught:
        RemoteModule(address, options=PATIENT)
    assert repr(address) in str(caught.value) or "empty" in message


@pytest.mark.parametrize("address", ["127.0.0.1:5000", "[::1]:5000", "localhost:1", "unix:/x"])
def test_well_formed_addresses_are_accepted(address):
    RemoteModule(address).close()  # nothing is contacted before the first call


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _first_call_error(address: str) -> BaseException:
    """The error of the first call, run in a thread that must end well before
    connect_timeout: waiting the timeout out fails the test instead of passing it."""
    errors: list[BaseException] = []

    def call() -> None:
        try:
            RemoteModule(address, options=PATIENT)(torch.ones(1))
        except BaseException as exc:  # noqa: BLE001 - inspected below
            errors.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), f"the call to {address} waited out connect_timeout"
    assert len(errors) == 1
    return errors[0]


def test_a_refused_connection_fails_fast_and_says_so():
    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    error = _first_call_error(address)
    assert isinstance(error, ServerUnavailable)
    assert address in str(error) and "connection was refused" in str(error)


def test_a_host_name_that_does_not_resolve_fails_fast_and_says_so():
    error = _first_call_error("no-such-host.invalid:50051")
    assert isinstance(error, ServerUnavailable)
    assert "does not resolve" in str(error)


def test_the_operating_system_has_the_last_word_on_a_refusal(start_server):
    """gRPC can report a refusal it saw earlier on a shared connection; before failing fast,
    the handshake asks whether the port accepts connections now."""
    server = start_server(torch.nn.Identity())
    assert accepts_connections(server.address) is True
    assert accepts_connections(f"127.0.0.1:{_free_port()}") is False
    assert accepts_connections("no-such-host.invalid:50051") is False
    assert accepts_connections("unix:/tmp/no-such-socket") is None  # not a TCP address


@pytest.mark.parametrize(
    ("address", "host"),
    [
        ("10.0.0.7:50051", "10.0.0.7"),
        ("[::1]:50051", "::1"),
        ("dns:///trunk.example:50051", "trunk.example"),
        ("dns://8.8.8.8/trunk.example:50051", "trunk.example"),
        ("ipv4:10.0.0.7:50051,10.0.0.8:50051", "10.0.0.7"),
        ("ipv6:[::1]:50051", "::1"),
        ("ipv6:[::1]", "::1"),
        ("ipv6:::1", "::1"),
        ("ipv4:///10.0.0.7:50051", "10.0.0.7"),
        ("unix:/run/trunk.sock", None),
        ("unix-abstract:trunk", None),
    ],
)
def test_the_bulk_channel_is_reached_at_the_host_of_any_address_form(address, host):
    assert bulk_host(address) == host


def test_a_server_on_a_unix_domain_socket_trains_as_locally(tmp_path):
    """``serve(trunk, "unix:/path")``: a Unix socket is reachable from this machine only, as
    loopback is, so it needs no TLS; it was refused as "not a loopback address", and with
    insecure=True the bulk channel failed to bind TCP on host "unix". Large frames take gRPC
    streams there. Float64, bit for bit."""
    import copy

    from torch import nn

    from remote_autograd import RemoteOptimizer, serve

    torch.manual_seed(0)
    trunk = nn.Linear(256, 4).double()
    local = copy.deepcopy(trunk)
    server = serve(trunk, f"unix:{tmp_path / 'trunk.sock'}")
    try:
        remote = RemoteModule(server.address)
        assert server.address.startswith("unix:") and server.service.bulk is None
        optimizer = RemoteOptimizer(remote, "SGD", lr=0.1)
        local_optimizer = torch.optim.SGD(local.parameters(), lr=0.1)
        x = torch.randn(1024, 256, dtype=torch.float64)  # 2 MiB: a stream of messages
        for model, opt in ((remote, optimizer), (local, local_optimizer)):
            model(x).square().sum().backward()
            opt.step()
        for name, value in local.state_dict().items():
            assert torch.equal(remote.remote_state_dict()[name], value), name
        remote.close()
    finally:
        server.stop(grace=None)


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("127.0.0.1:99999", r"from 0 to 65535 \(0: any free port\), got '99999'"),
        ("localhost", "names no port"),
        ("grpc://127.0.0.1:5000", "drop the 'grpc://'"),
    ],
)
def test_a_server_refuses_an_address_it_would_bind_otherwise(address, message):
    """A server took port 99999 as 34463 (wrapped modulo 65536) and 'localhost' as port 443,
    addresses no client could then give; it refuses them as a client does."""
    from torch import nn

    from remote_autograd import serve

    with pytest.raises(ValueError, match=message):
        serve(nn.Linear(2, 2), address)


def test_a_second_server_on_a_unix_socket_in_use_is_refused(tmp_path):
    """gRPC replaces a Unix socket's file: a second server on the path took it over, and
    the first, still running, could no longer be reached. Refused, as a TCP port in use is;
    a path left by a stopped server is served again."""
    from torch import nn

    from remote_autograd import serve

    address = f"unix:{tmp_path / 'trunk.sock'}"
    first = serve(nn.Linear(2, 2), address)
    try:
        with pytest.raises(OSError, match="another server listens on that socket"):
            serve(nn.Linear(2, 2), address)
        with RemoteModule(address) as remote:
            assert remote(torch.ones(1, 2)).shape == (1, 2)  # the first still serves
    finally:
        first.stop(grace=None)
    serve(nn.Linear(2, 2), address).stop(grace=None)
