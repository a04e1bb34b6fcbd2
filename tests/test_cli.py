"""The ``remote-autograd`` command line: ``serve`` needs a trunk named explicitly, ``--module``
imports from the current directory without the hf extra, every ServerOptions field has a flag,
and the hf commands still parse."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from remote_autograd import RemoteModule, ServerOptions
from remote_autograd.cli import SERVER_FLAGS, add_server_arguments, build_parser, main
from remote_autograd.cli import server_options as options_of

ROOT = Path(__file__).resolve().parent.parent


def test_serve_without_a_trunk_names_both_ways_to_give_one() -> None:
    process = subprocess.run(
        [sys.executable, "-m", "remote_autograd.cli", "serve"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert process.returncode != 0
    assert "serve needs a trunk" in process.stderr
    assert "--module package.module:callable" in process.stderr
    assert "--model-type NAME / --model-path DIR" in process.stderr


def test_serve_refuses_a_module_and_a_model_together() -> None:
    with pytest.raises(SystemExit, match="not both"):
        main(["serve", "--module", "nowhere:make", "--model-type", "llama"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--checkpoint-every", "1"], "need checkpoint_path .*nothing would be saved"),
        (["--checkpoint-interval", "5"], "need checkpoint_path"),
        (["--client-ca", "{pem}"], "asks for mutual TLS, which needs TLS"),
        (["--tls-cert", "{pem}"], "certificate_chain and private_key go together"),
        (["--tls-key", "{pem}"], "certificate_chain and private_key go together"),
        (["--max-workers", "0"], "max_workers must be >= 1"),
        (["--bulk-hello-timeout", "0"], r"bulk_hello_timeout \(--bulk-hello-timeout\) must be"),
        (["--stream-chunk-bytes", "0"], r"\(--stream-chunk-bytes\) must be a whole number >= 1"),
        (["--compression", "zstd"], r"\(--compression\) must be 'auto', 'lz4' or 'none'"),
        (["--bulk-port", "99999"], r"\(--bulk-port\) must be a TCP port"),
        (["--dtype", "float128"], r"\(--dtype\) must be one of float32"),
        (["--context-ttl", "0"], r"\(--context-ttl\) must be a number of seconds > 0"),
        (["--session-ttl", "-1"], r"\(--session-ttl\) must be a number of seconds > 0"),
        (["--max-sessions", "0"], r"\(--max-sessions\) must be a whole number >= 1"),
        (["--max-lr", "-1"], r"\(--max-lr\) must be a number > 0"),
        (["--step-wait", "-5"], r"\(--step-wait\) must be a number >= 0"),
        (["--token-file", "{empty}"], "holds no line; refusing to start"),
        (["--checkpoint", "{missing}/trunk.ckpt"], "not a directory this process can write"),
    ],
    ids=[
        "every-without-path",
        "interval-without-path",
        "client-ca-without-tls",
        "cert-without-key",
        "key-without-cert",
        "no-workers",
        "no-hello-time",
        "chunks-of-nothing",
        "unknown-compression",
        "port-out-of-range",
        "unknown-dtype",
        "contexts-forgotten-at-once",
        "sessions-forgotten-at-once",
        "no-session",
        "negative-lr-bound",
        "negative-step-wait",
        "empty-token-file",
        "checkpoint-folder-missing",
    ],
)
def test_contradicting_or_unusable_server_flags_stop_before_the_trunk_is_built(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    # The module cannot be imported: reaching it would end with another message.
    (tmp_path / "cert.pem").write_bytes(b"PEM")
    (tmp_path / "empty.txt").write_text("\n  \n")
    places = {"pem": tmp_path / "cert.pem", "empty": tmp_path / "empty.txt"}
    places["missing"] = tmp_path / "no-such-folder"
    argv = [flag.format(**places) for flag in flags]
    with pytest.raises(SystemExit, match=message):
        main(["serve", "--module", "no_such_pkg.models:make", *argv])


def _env() -> dict[str, str]:
    paths = [str(ROOT), os.environ.get("PYTHONPATH")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)))


def test_module_is_imported_from_the_current_directory(tmp_path: Path) -> None:
    """As the console script runs it: ``sys.path[0]`` is the script's folder, not the current
    directory, and the package lies only in the current directory. The factory also reports
    whether transformers was imported: ``serve --module`` must not need the hf extra."""
    package = tmp_path / "work" / "mypkg_cli_test"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(
        textwrap.dedent(
            """
            import sys
            import torch

            def make_trunk():
                print("transformers imported:", "transformers" in sys.modules, flush=True)
                torch.manual_seed(0)
                return torch.nn.Linear(3, 2)
            """
        )
    )
    script = tmp_path / "bin" / "remote-autograd"
    script.parent.mkdir()
    script.write_text("from remote_autograd.cli import main\nmain()\n")
    process = subprocess.Popen(
        [sys.executable, str(script), "serve", "--module", "mypkg_cli_test.models:make_trunk"]
        + ["--address", "127.0.0.1:0"],
        cwd=package.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:  # the server prints one line once it listens
            lines.append(line)
            if " serving " in line:
                break
        else:
            pytest.fail(f"serve exited: {''.join(lines)}{process.stderr.read()}")
        assert lines[0].strip() == "transformers imported: False"
        address = lines[-1].rsplit(" ", 1)[-1].strip()
        x = torch.randn(4, 3)
        torch.manual_seed(0)
        local = torch.nn.Linear(3, 2)
        with RemoteModule(address) as remote, torch.no_grad():
            torch.testing.assert_close(remote(x), local(x), rtol=0, atol=0)
    finally:
        process.terminate()
        process.wait(timeout=30)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def test_a_module_that_cannot_be_imported_says_where_it_looked(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="cannot import no_such_pkg.*current directory"):
        main(["serve", "--module", "no_such_pkg.models:make"])


def _leaves(cls: type, path: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every field of an options dataclass, nested option dataclasses flattened."""
    leaves = set()
    for field in dataclasses.fields(cls):
        value = getattr(cls(), field.name)
        if dataclasses.is_dataclass(value):
            leaves |= _leaves(type(value), (*path, field.name))
        else:
            leaves.add((*path, field.name))
    return leaves


def _get(options: object, path: tuple[str, ...]) -> object:
    for name in path:
        options = getattr(options, name)
    return options


def test_every_server_option_has_a_flag_that_reaches_it(tmp_path: Path) -> None:
    """One flag per ServerOptions field (Limits' included); a non-default value given on the
    command line arrives in that field, and no flag given gives ServerOptions()."""
    import argparse

    assert {flag.path for flag in SERVER_FLAGS} == _leaves(ServerOptions)
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    assert options_of(parser.parse_args([])) == ServerOptions()

    argv, expected = [], {}
    for flag in SERVER_FLAGS:
        default = _get(ServerOptions(), flag.path)
        if flag.kind is bool:
            argv.append(flag.flag)
            expected[flag.path] = not default
        elif flag.kind == "file":
            file = tmp_path / flag.flag.lstrip("-")
            file.write_bytes(b"PEM of " + flag.flag.encode())
            argv += [flag.flag, str(file)]
            expected[flag.path] = file.read_bytes()
        elif flag.kind == "lines":
            file = tmp_path / "tokens.txt"
            file.write_text("alpha\n\n  beta  \n")
            argv += [flag.flag, str(file)]
            expected[flag.path] = ("alpha", "beta")
        elif flag.kind in (int, float):
            value = (default or 0) + 3  # None: a count that defaults to another one's
            argv += [flag.flag, str(value)]
            expected[flag.path] = value
        else:
            value = {"device": "cuda:1", "compression": "lz4", "dtype": "float64"}.get(
                flag.path[-1], "chosen"
            )
            argv += [flag.flag, value]
            expected[flag.path] = value
        assert flag.help, f"{flag.flag} has no help text"
    options = options_of(parser.parse_args(argv))
    for path, value in expected.items():
        assert _get(options, path) == value, path


def test_hf_commands_still_parse(capsys) -> None:
    from remote_autograd.hf.cli import _model_argv, build_hf_trunk, run_train

    parser = build_parser()
    args = parser.parse_args(["train", "--model-type", "llama", "--steps", "1"])
    assert (args.run, args.model_type, args.steps, args.lora_targets) == (
        run_train,
        "llama",
        1,
        None,
    )
    # The server a train run starts is told the family explicitly (serve has no default).
    assert "--model-type=llama" in _model_argv(args)
    assert "--model-type=gpt2" in _model_argv(parser.parse_args(["train"]))
    args = parser.parse_args(["serve", "--model-path", "/models/x", "--trunk-layers", "1:3"])
    assert (args.model_path, args.trunk_layers, args.module) == ("/models/x", "1:3", None)
    assert args.build_hf_trunk is build_hf_trunk
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["demo", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--model-type NAME" in out and "--lora-targets" in out


def test_importing_the_core_cli_imports_no_hf_code() -> None:
    code = (
        "import sys, remote_autograd.cli;"
        "hf = ('remote_autograd.hf', 'transformers');"
        "print(sorted(m for m in sys.modules if m.startswith(hf)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True
    ).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("which", ["grpc", "bulk"])
def test_serve_on_a_port_in_use_stops_with_a_message(which: str) -> None:
    """A port another process holds: the gRPC port, or the bulk channel's (--bulk-port). The
    bulk port's bind error was a raw traceback naming no flag."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        address = f"127.0.0.1:{port}" if which == "grpc" else "127.0.0.1:0"
        flags = [] if which == "grpc" else ["--bulk-port", str(port)]
        expected = "could not bind" if which == "grpc" else r"bulk channel on port .*--bulk-port"
        with pytest.raises(SystemExit, match=expected):
            main(["serve", "--module", "models:make_mlp_trunk", "--address", address, *flags])


def test_whole_number_options_given_as_floats_become_ints() -> None:
    """8e9 or a numpy integer from a config file is a byte count: kept as a float it reached
    protobuf's integer fields, and every call of the server failed."""
    import numpy as np

    from remote_autograd import ServerOptions

    options = ServerOptions(stream_chunk_bytes=65536.0, max_context_bytes=np.int64(1 << 30))
    assert type(options.stream_chunk_bytes) is int and options.stream_chunk_bytes == 65536
    assert type(options.max_context_bytes) is int
