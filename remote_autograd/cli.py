"""The ``remote-autograd`` console command.

    remote-autograd serve --module pkg.mod:make_trunk   # any nn.Module, built by your callable
    remote-autograd serve --model-type llama ...        # the trunk of a Hugging Face LM (hf extra)
    remote-autograd train ... / demo                    # the other parts of that LM (hf extra)

This module needs only the core package. The hf extra's commands and model flags come from
``remote_autograd.hf.cli``, imported while the parser is built and only when transformers and
peft are importable; that import is cheap (no transformers) and goes one way, hf -> core.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import inspect
import logging
import os
import re
import signal
import sys
import threading
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .options import ServerOptions

__all__ = [
    "SERVER_FLAGS",
    "add_server_arguments",
    "build_parser",
    "load_factory",
    "main",
    "run_server",
    "server_options",
]

# ServerOptions fields whose flag is not ``--field-name``; every other field gets that one.
_FLAG_NAMES = {
    "checkpoint_path": "--checkpoint",
    "certificate_chain": "--tls-cert",
    "private_key": "--tls-key",
    "tokens": "--token-file",
}

_TRUNK_CHOICES = (
    "--module package.module:callable (a callable returning any nn.Module), or --model-type "
    "NAME / --model-path DIR (the trunk of a Hugging Face causal LM, cut by --trunk-layers; "
    "needs the hf extra: pip install 'remote_autograd[hf]')"
)
_NO_TRUNK = f"serve needs a trunk: {_TRUNK_CHOICES}"


def load_factory(spec: str) -> Callable[..., Any]:
    """``package.module:callable`` -> the callable; the operator names it on the command line.

    The current directory is importable first, as under ``python -m``: the console script's
    ``sys.path[0]`` is its own bin folder, so ``mypkg`` next to the operator would not be found.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"--module must look like package.module:callable, got {spec!r}")
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(
            f"--module {spec}: cannot import {module_name}: {exc} (looked in the current "
            "directory and on PYTHONPATH)"
        ) from exc
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise SystemExit(f"--module {spec}: {module_name} has no attribute {attr}")
    if not callable(target):
        raise SystemExit(f"--module {spec}: {attr} is not callable")
    return target


@dataclasses.dataclass(frozen=True)
class _Flag:
    """One server flag: the option field it sets (``limits.max_tensors``) and how."""

    path: tuple[str, ...]  # field names from ServerOptions down
    flag: str  # --max-tensors
    kind: type | str  # int, float, str, bool, "file" (bytes), "lines" (tuple of lines)
    default: Any
    help: str

    @property
    def dest(self) -> str:
        return "server." + ".".join(self.path)


def _comments(cls: type) -> dict[str, str]:
    """Field name -> its one-line comment in the class source (continuation lines joined), the
    comment being where options.py documents every field."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # no source (a frozen build): flags without help text
        return {}
    comments: dict[str, str] = {}
    last = None
    for line in source.splitlines():
        field = re.match(r"\s{4}(\w+):[^#]*#\s?(.*)$", line)
        more = re.match(r"\s{4}#\s?(.*)$", line)
        if field:
            last = field.group(1)
            comments[last] = field.group(2).strip()
        elif more and last is not None:
            comments[last] += " " + more.group(1).strip()
        else:
            last = None
    return comments


def _flags(cls: type = ServerOptions, path: tuple[str, ...] = ()) -> Iterator[_Flag]:
    """A flag for every field of ``cls``, nested option dataclasses (Limits) flattened."""
    hints = typing.get_type_hints(cls)
    comments = _comments(cls)
    defaults = cls()
    for field in dataclasses.fields(cls):
        hint, default = hints[field.name], getattr(defaults, field.name)
        here = (*path, field.name)
        if dataclasses.is_dataclass(hint):
            yield from _flags(hint, here)  # type: ignore[arg-type]
            continue
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
            hint = args[0]  # X | None
        kind: type | str
        if hint is bytes:
            kind = "file"
        elif typing.get_origin(hint) is tuple:
            kind = "lines"
        elif hint in (bool, int, float, str):
            kind = hint
        else:
            raise TypeError(f"no command-line flag for {cls.__name__}.{field.name}: {hint}")
        flag = _FLAG_NAMES.get(field.name, "--" + field.name.replace("_", "-"))
        if kind is bool and default:
            flag = "--no-" + flag[2:]
        yield _Flag(here, flag, kind, default, comments.get(field.name, ""))


SERVER_FLAGS: tuple[_Flag, ...] = tuple(_flags())


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """``--address`` and one flag per ServerOptions field (see :data:`SERVER_FLAGS`)."""
    group = parser.add_argument_group("server")
    group.add_argument(
        "--address", default="127.0.0.1:50051", help="host:port to listen on (default: %(default)s)"
    )
    for flag in SERVER_FLAGS:
        text = flag.help.replace("%", "%%")
        if flag.kind is bool:
            action = "store_false" if flag.default else "store_true"
            if flag.default:  # --no-X: the field's comment says what X does
                text = f"turn off what is on by default: {text}"
            group.add_argument(flag.flag, dest=flag.dest, action=action, help=text)
        elif flag.kind == "file":
            group.add_argument(flag.flag, dest=flag.dest, metavar="FILE", help=f"{text} (a file)")
        elif flag.kind == "lines":
            help_text = f"{text} (a file, one a line)"
            group.add_argument(flag.flag, dest=flag.dest, metavar="FILE", help=help_text)
        else:
            suffix = "" if flag.default is None else " (default: %(default)s)"
            group.add_argument(
                flag.flag,
                dest=flag.dest,
                metavar=flag.path[-1].upper(),
                type=flag.kind,  # type: ignore[arg-type]
                default=flag.default,
                help=text + suffix,
            )


def _value(flag: _Flag, given: Any) -> Any:
    if flag.kind == "file":
        if given is None:
            return None
        with open(given, "rb") as f:
            return f.read()
    if flag.kind == "lines":
        if given is None:
            return flag.default
        with open(given) as f:
            lines = tuple(line.strip() for line in f if line.strip())
        if not lines:  # an empty secrets mount must not turn authentication off
            raise SystemExit(f"{flag.flag} {given}: the file holds no line; refusing to start")
        return lines
    return given


def server_options(args: argparse.Namespace) -> ServerOptions:
    """The ServerOptions the flags of :func:`add_server_arguments` ask for."""
    values: dict[str, Any] = {}
    for flag in SERVER_FLAGS:
        node = values
        for name in flag.path[:-1]:
            node = node.setdefault(name, {})
        node[flag.path[-1]] = _value(flag, getattr(args, flag.dest))
    return _build(ServerOptions, values)


def _build(cls: Any, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    return cls(
        **{
            name: _build(hints[name], value) if isinstance(value, dict) else value
            for name, value in values.items()
        }
    )


def run_server(module: Any, args: argparse.Namespace, options: ServerOptions | None = None) -> None:
    """Serve ``module`` with the server flags of ``args`` (or the ``options`` made of them
    already) until SIGTERM or SIGINT."""
    from .server import serve

    options = options or server_options(args)
    if getattr(args, "parallel", None):  # under torchrun: rank 0 serves, the others follow
        from .distributed import serve_distributed

        if getattr(args, "adapters", "shared") == "per-client":
            raise SystemExit(
                "--adapters per-client runs in one process: serve it without --parallel "
                "(a distributed trunk serves shared weights)"
            )

        server = serve_distributed(
            module, args.address, options, args.parallel, timeout=args.dist_timeout
        )
        if server is None:
            return
    else:
        build_engine = getattr(args, "build_engine", None)  # per-client adapters (hf extra)
        try:
            server = serve(
                build_engine(module, options, args) if build_engine else module,
                args.address,
                options=options,
            )
        except (OSError, ValueError) as exc:  # an address or port it cannot serve on
            raise SystemExit(f"serve: {exc}") from exc
    runner = getattr(server.engine, "runner", None)  # the per-client adapters' engine has none
    name = runner.module_name if runner is not None else type(module).__name__
    print(f"remote-autograd: serving {name} on {server.address}", flush=True)
    done = threading.Event()

    def stop(signum: int, frame: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if runner is not None and hasattr(runner, "on_broken"):
        # A distributed trunk out of service (a rank lost or hung, ranks parted ways) can
        # only be restarted: rank 0 leaves with an error, and torchrun ends the group.
        runner.on_broken = done.set
    done.wait()
    server.stop(grace=5.0)
    broken = getattr(runner, "broken", None)  # also if it broke in the grace period
    close = getattr(runner, "close", None)
    if close is not None:  # a distributed runner: the other ranks stop too
        close()
    if broken is not None:
        raise SystemExit(f"remote-autograd: the distributed trunk is out of service: {broken}")


def _serve(args: argparse.Namespace) -> None:
    hf_model = getattr(args, "model_type", None) or getattr(args, "model_path", None)
    if args.module is not None and hf_model:
        raise SystemExit("serve takes one trunk: --module, or --model-type/--model-path, not both")
    options = _checked_options(args)  # before the trunk is built: a large model takes minutes
    if args.module is not None:
        module = load_factory(args.module)()
    elif hf_model:
        module = args.build_hf_trunk(args)  # set by remote_autograd.hf.cli.add_commands
    else:
        raise SystemExit(_NO_TRUNK)
    run_server(module, args, options)


def _checked_options(args: argparse.Namespace) -> ServerOptions:
    """The server flags' options; flags that contradict each other, or a checkpoint that
    could not be written, are refused as a SystemExit that says which."""
    try:
        options = server_options(args)
    except ValueError as exc:
        raise SystemExit(f"serve: {exc}") from exc
    path = options.checkpoint_path
    if path:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
            raise SystemExit(
                f"--checkpoint {path}: {folder} is not a directory this process can write "
                "(every checkpoint, including the last one at shutdown, would fail)"
            )
    return options


def _hf_extra_installed() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("transformers", "peft"))


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: ``serve``, plus the hf extra's commands when it is installed."""
    parser = argparse.ArgumentParser(
        prog="remote-autograd",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser(
        "serve",
        help="serve a trunk: --module for any nn.Module, --model-type/--model-path for an LM's",
        description=f"Serve a trunk: {_TRUNK_CHOICES}.",
    )
    serve_parser.add_argument(
        "--module", help="package.module:callable returning the trunk nn.Module"
    )
    add_server_arguments(serve_parser)
    serve_parser.add_argument(
        "--parallel",
        choices=("ddp", "fsdp"),
        help="under torchrun: every rank serves a share of each batch; ddp: each rank holds "
        "the whole trunk, fsdp: the trunk is sharded with FSDP2 (docs/scale-out.md)",
    )
    serve_parser.add_argument(
        "--dist-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="with --parallel: a collective between the ranks that waits longer fails, and "
        "the server answers UNAVAILABLE (default: %(default)s)",
    )
    serve_parser.set_defaults(run=_serve)
    if _hf_extra_installed():
        from .hf.cli import add_commands  # argparse definitions only; no transformers import

        add_commands(commands, serve_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    args.run(args)


if __name__ == "__main__":
    main()
