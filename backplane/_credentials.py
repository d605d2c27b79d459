"""Secrets a backplane client or the ZeroMQ proxy reads from files: never from argv or the
environment, where ``ps`` and ``/proc`` show them to anyone on the host.

- A Redis password: the first line of a file, read at each (re)connection, so that a changed
  password is picked up without a restart.
- CURVE keys for the ZeroMQ backplane, in pyzmq's key files (``zmq.auth.create_certificates``):
  ``NAME.key`` holds a public key, ``NAME.key_secret`` the public and the secret key, each
  Z85-encoded (40 characters) in a small text format. A process is given its own
  ``.key_secret``; a client also the proxy's public key (its ``.key``, or its ``.key_secret``,
  of which only the public key is read); the proxy a directory of the ``.key`` files of the
  clients it lets in.

Every error names the file and never its content.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import zmq.auth

from trio_fanout.backplane._interface import BackplaneError

# Key files end in these (zmq.auth.create_certificates names them so).
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"


class BadCredentials(BackplaneError, ValueError):
    """A secret file that cannot be read or does not hold what it should; the message names
    the file, never what is in it."""


@attrs.frozen(kw_only=True)
class Credentials:
    """Where a backplane client finds its secrets (paths, read when the backplane opens).

    ``password_file`` is for redis:// and rediss://; the CURVE files for zmq://: with
    ``curve_secret_key_file`` set, the client speaks CURVE as that key pair, to a proxy whose
    public key is in ``curve_server_key_file``, or, without it, to a proxy that has the same
    key pair (one pair for the whole cluster).
    """

    password_file: str | None = None
    curve_secret_key_file: str | None = None
    curve_server_key_file: str | None = None


@attrs.frozen
class CurveClientKeys:
    """A ZeroMQ client's CURVE keys (Z85): its own pair, and the proxy's public key."""

    public_key: bytes
    secret_key: bytes = attrs.field(repr=False)
    server_key: bytes


@attrs.frozen
class CurveProxyKeys:
    """The proxy's CURVE key pair (Z85), and the public keys of the clients it lets in (its
    own among them: the heartbeat it publishes, and workers that share its key pair)."""

    public_key: bytes
    secret_key: bytes = attrs.field(repr=False)
    allowed: frozenset[bytes]

    @classmethod
    def load(cls, secret_key_file: str, allowed_keys_dir: str | None) -> CurveProxyKeys:
        public, secret = load_key_pair(secret_key_file)
        allowed = load_allowed_keys(allowed_keys_dir) if allowed_keys_dir else frozenset()
        return cls(public, secret, allowed | {public})


def read_password(path: str) -> str:
    """The first line of the file at ``path``, without its line ending."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise BadCredentials(f"cannot read the password file {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise BadCredentials(f"the password file {path} is not UTF-8 text") from None
    password = text.splitlines()[0] if text else ""
    if not password:
        raise BadCredentials(f"the password file {path} is empty")
    return password


def _load_certificate(path: str) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except OSError as error:
        reason = error.strerror or "not a file"
        raise BadCredentials(f"cannot read the CURVE key file {path}: {reason}") from None
    except (ValueError, UnicodeDecodeError):
        raise BadCredentials(f"{path} is not a CURVE key file (see trio-fanout keygen)") from None


def load_key_pair(path: str) -> tuple[bytes, bytes]:
    """The public and secret key in a ``.key_secret`` file."""
    public, secret = _load_certificate(path)
    if not secret:
        raise BadCredentials(
            f"{path} holds no secret key: give the {SECRET_SUFFIX} file of the pair"
        )
    return public, secret


def load_public_key(path: str) -> bytes:
    """The public key in a ``.key`` (or ``.key_secret``) file."""
    return _load_certificate(path)[0]


def load_allowed_keys(directory: str) -> frozenset[bytes]:
    """The public keys of the ``.key`` files in ``directory``."""
    if not os.path.isdir(directory):
        raise BadCredentials(f"{directory} is not a directory of CURVE public key files")
    return frozenset(
        load_public_key(str(path)) for path in sorted(Path(directory).glob("*" + PUBLIC_SUFFIX))
    )


def load_client_keys(credentials: Credentials) -> CurveClientKeys | None:
    """The CURVE keys ``credentials`` name, or None when they name no key pair (no CURVE)."""
    if credentials.curve_secret_key_file is None:
        if credentials.curve_server_key_file is not None:
            raise BadCredentials(
                "a CURVE client needs its own key pair (curve_secret_key_file) "
                "as well as the proxy's public key"
            )
        return None
    public, secret = load_key_pair(credentials.curve_secret_key_file)
    server_file = credentials.curve_server_key_file
    server = public if server_file is None else load_public_key(server_file)
    return CurveClientKeys(public, secret, server)


def write_key_pair(directory: str, name: str) -> tuple[str, str]:
    """Create ``NAME.key`` and ``NAME.key_secret`` in ``directory`` (created, for its owner
    only, if it does not exist; it must not hold them yet); the secret file is readable by
    its owner only. Returns both paths."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    public_path = os.path.join(directory, name + PUBLIC_SUFFIX)
    secret_path = os.path.join(directory, name + SECRET_SUFFIX)
    for path in (public_path, secret_path):
        if os.path.exists(path):
            raise FileExistsError(f"{path} exists; not overwriting a key")
    # create_certificates opens the files with the process's umask: the secret one must never
    # exist readable by others, not even for a moment.
    previous = os.umask(0o077)
    try:
        zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(previous)
    os.chmod(public_path, 0o644)
    return public_path, secret_path
