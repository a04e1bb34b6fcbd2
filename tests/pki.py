"""Certificates for the TLS tests, made with the openssl command line (never downloaded)."""

from __future__ import annotations

import pathlib
import subprocess

# A fresh P-256 key, unencrypted: the same for the CAs, the server and the clients.
_NEW_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _openssl(*args: str, cwd: pathlib.Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _issue(directory: pathlib.Path, name: str, ca: str, cn: str | None, ext: str) -> None:
    """``name``.pem and .key, signed by ``ca``; without a ``cn``, a subject of an O alone."""
    _openssl(
        "req",
        *_NEW_EC_KEY,
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={cn}" if cn else "/O=remote-autograd tests",
        cwd=directory,
    )
    (directory / f"{name}.ext").write_text(ext + "\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.pem",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        cwd=directory,
    )


def make_pki(directory: pathlib.Path) -> dict[str, bytes]:
    """A CA, a server certificate for localhost and 127.0.0.1, a client certificate, and a
    rogue CA's client certificate with the same name; file name -> PEM bytes."""
    for ca in ("ca", "rogue"):
        _openssl(
            "req",
            "-x509",
            *_NEW_EC_KEY,
            "-keyout",
            f"{ca}.key",
            "-out",
            f"{ca}.pem",
            "-days",
            "2",
            "-subj",
            f"/CN={ca}-ca",
            cwd=directory,
        )
    _issue(
        directory,
        "server",
        "ca",
        "localhost",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth",
    )
    _issue(directory, "client", "ca", "client-1", "extendedKeyUsage=clientAuth")
    _issue(directory, "intruder", "rogue", "client-1", "extendedKeyUsage=clientAuth")
    return {p.stem + p.suffix: p.read_bytes() for p in directory.iterdir() if p.is_file()}
