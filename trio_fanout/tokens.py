"""Signed tokens (JWT) for clients: the key, verification, the room claims, and minting.

Sans-IO apart from reading the key file once: a token string in, a :class:`Grant` (or
:class:`InvalidToken`) out. The connection decides what to do with either (docs/protocol.md,
"Tokens").

The accepted algorithm is pinned by the kind of key configured, never taken from the token:
HS256 for a shared secret, RS256 for an RSA public key, ES256 for a P-256 public key. A token
whose header says anything else (``none`` included, or HS256 signed with the public key's PEM
as if it were a shared secret) is refused before its signature is looked at.

Error messages here reach clients and logs: they say what is wrong with a token, and never
hold the token, a claim's value or a key.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

# RFC 7518, section 3.2: an HS256 key must be at least as long as the hash, 256 bits. A shorter
# secret can be guessed offline from any token it signed.
MIN_SECRET_BYTES = 32

# RSA keys under 2048 bits are no longer considered safe (NIST SP 800-131A).
MIN_RSA_BITS = 2048

# Claims every token must carry: without ``exp`` a leaked token would be valid for ever, and
# ``sub`` is the identity the connection acts as.
REQUIRED_CLAIMS = ("sub", "exp")

# The latest ``exp`` taken: the last second of the year 9999. A later one is no real expiry, and
# one past what a float holds could not be turned into a timer at all.
MAX_EXP = 253402300799


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the problem, never the key."""


class InvalidToken(Exception):
    """A token refused; the message says why, for the client and the log, without the token."""


@attrs.frozen
class TokenKey:
    """What verifies (or, for a secret, also signs) tokens, and the one algorithm it allows."""

    algorithm: str
    key: Any = attrs.field(repr=False)


def read_secret(path: str) -> TokenKey:
    """The HS256 secret in ``path``: its bytes, less a final line ending (``openssl rand -hex 32
    > FILE`` writes one)."""
    secret = _read(path).removesuffix(b"\n").removesuffix(b"\r")
    if len(secret) < MIN_SECRET_BYTES:
        raise KeyFileError(
            f"{path} holds {len(secret)} bytes; an HS256 secret needs at least "
            f"{MIN_SECRET_BYTES} (e.g. openssl rand -hex 32 > {path})"
        )
    return TokenKey("HS256", secret)


def read_public_key(path: str) -> TokenKey:
    """The RSA (RS256) or P-256 (ES256) public key in the PEM file ``path``."""
    data = _read(path)
    if b"PRIVATE KEY" in data:
        raise KeyFileError(f"{path} holds a private key; give the server the public key only")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise KeyFileError(f"{path} is not a PEM public key (-----BEGIN PUBLIC KEY-----)") from None
    return _asymmetric(path, key)


def read_private_key(path: str) -> TokenKey:
    """The RSA (RS256) or P-256 (ES256) private key in the unencrypted PEM file ``path``, to
    sign tokens with (``trio-fanout token``); the algorithm is the key's."""
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # a passphrase protects it
        raise KeyFileError(
            f"{path} is encrypted: give the key without a passphrase "
            f"(openssl pkey -in {path} -out PLAIN.pem)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(
            f"{path} is not a PEM private key (-----BEGIN PRIVATE KEY-----)"
        ) from None
    return _asymmetric(path, key)


def _asymmetric(path: str, key: object) -> TokenKey:
    """``key``, public or private, read from ``path``, with the algorithm it signs or verifies:
    an RSA key of at least ``MIN_RSA_BITS`` bits (RS256) or a P-256 key (ES256)."""
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyFileError(
                f"{path} holds a {key.key_size}-bit RSA key; at least {MIN_RSA_BITS} bits"
            )
        return TokenKey("RS256", key)
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) and isinstance(
        key.curve, ec.SECP256R1
    ):
        return TokenKey("ES256", key)
    raise KeyFileError(f"{path} holds neither an RSA key (RS256) nor a P-256 key (ES256)")


def signs_for(private: TokenKey, public: TokenKey) -> bool:
    """Whether tokens signed with ``private`` verify with ``public``: the same algorithm, and
    ``public`` is the public half of ``private``."""
    if private.algorithm != public.algorithm:
        return False
    encoding, public_format = (
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    return bool(
        private.key.public_key().public_bytes(encoding, public_format)
        == public.key.public_bytes(encoding, public_format)
    )


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise KeyFileError(f"cannot read {path}: {error.strerror}") from None


def room_allowed(patterns: Sequence[str] | None, room: str) -> bool:
    """Whether ``room`` is within a ``join`` or ``publish`` claim: absent (None) allows every
    room; ``"team-*"`` allows every room that starts with ``team-``; other names match
    exactly."""
    if patterns is None:
        return True
    for pattern in patterns:
        if pattern.endswith("*"):
            if room.startswith(pattern[:-1]):
                return True
        elif room == pattern:
            return True
    return False


@attrs.frozen
class Grant:
    """What a valid token allows: who (``sub``), until when (``exp``, Unix seconds), and which
    rooms it may join (and read the history of) and publish to (None: any)."""

    sub: str
    exp: int
    join: tuple[str, ...] | None = None
    publish: tuple[str, ...] | None = None

    def may_join(self, room: str) -> bool:
        return room_allowed(self.join, room)

    def may_publish(self, room: str) -> bool:
        return room_allowed(self.publish, room)


# PyJWT's refusals, in the words a client is told. Ordered: subclasses before their bases.
_REFUSALS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "the token has expired"),
    (jwt.ImmatureSignatureError, "the token is not valid yet (nbf or iat)"),
    (jwt.MissingRequiredClaimError, "the token lacks a required claim (sub and exp)"),
    (jwt.InvalidAlgorithmError, "the token is signed with an algorithm this server does not take"),
    (jwt.InvalidSignatureError, "the token's signature does not verify"),
    (jwt.DecodeError, "the token is not a well-formed JWT"),
)


class Verifier:
    """Checks tokens against one key, with ``leeway`` seconds of tolerance on ``exp`` and
    ``nbf`` for clocks that differ between the issuer and this server."""

    def __init__(self, key: TokenKey, leeway: float) -> None:
        self.key = key
        self.leeway = leeway

    def verify(self, token: str) -> Grant:
        """The :class:`Grant` of a valid token, else :class:`InvalidToken` saying why."""
        if not token.isascii():  # a JWT is base64url and dots; PyJWT fails on a lone surrogate
            raise InvalidToken(_refusal(jwt.DecodeError()))
        try:
            claims = jwt.decode(
                token,
                self.key.key,
                algorithms=[self.key.algorithm],
                leeway=self.leeway,
                options={"require": list(REQUIRED_CLAIMS)},
            )
        except jwt.InvalidTokenError as error:
            raise InvalidToken(_refusal(error)) from None
        sub, exp = claims["sub"], claims["exp"]
        if not isinstance(sub, str) or not sub:
            raise InvalidToken("the token's sub must be a non-empty string")
        if type(exp) is not int:
            raise InvalidToken("the token's exp must be an integer (Unix seconds)")
        if exp > MAX_EXP:
            raise InvalidToken("the token's exp is past the year 9999")
        return Grant(sub, exp, _rooms(claims, "join"), _rooms(claims, "publish"))


def _refusal(error: jwt.InvalidTokenError) -> str:
    for kind, message in _REFUSALS:
        if isinstance(error, kind):
            return message
    return "the token is invalid"  # PyJWT's own text could quote the token: never passed on


def _rooms(claims: dict[str, Any], name: str) -> tuple[str, ...] | None:
    patterns = claims.get(name)
    if patterns is None:
        return None
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise InvalidToken(f"the token's {name} claim must be a list of room names")
    return tuple(patterns)


def verifier(
    secret_file: str | None, public_key_file: str | None, leeway: float
) -> Verifier | None:
    """The verifier the settings ask for, or None when tokens are not configured."""
    if secret_file is not None:
        return Verifier(read_secret(secret_file), leeway)
    if public_key_file is not None:
        return Verifier(read_public_key(public_key_file), leeway)
    return None


def mint(
    key: TokenKey,
    sub: str,
    *,
    ttl: float,
    join: Iterable[str] | None = None,
    publish: Iterable[str] | None = None,
    now: float | None = None,
) -> str:
    """A token for ``sub`` valid for ``ttl`` seconds from ``now``; ``key`` must be able to sign
    (a secret, or a private key: :func:`read_private_key`)."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"sub": sub, "iat": issued, "exp": issued + round(ttl)}
    if join is not None:
        claims["join"] = list(join)
    if publish is not None:
        claims["publish"] = list(publish)
    return jwt.encode(claims, key.key, algorithm=key.algorithm)


class Deadlines:
    """Timers for many connections in one heap: ``(when, connection id, token version)`` in,
    the due ones out, earliest first. Setting a timer costs O(log n): one set for a token that
    was replaced since, or a connection that is gone (:meth:`forget`), is not removed at once
    but skipped by the caller when it comes due, and swept out whenever such stale timers come
    to outnumber the live ones, so that a client sending ``refresh`` in a loop cannot grow the
    heap without bound (its stale timers could otherwise wait for the token's ``exp``)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, int]] = []
        self._order = itertools.count()  # ties in time keep the order they were set in
        self._latest: dict[int, int] = {}  # each key's latest version with a timer pending

    def add(self, when: float, key: int, version: int) -> bool:
        """Set a timer; return whether it is now the earliest (a sleeper should wake)."""
        self._latest[key] = version
        if len(self._heap) > 2 * len(self._latest) + 64:
            self._sweep()
        earliest = not self._heap or when < self._heap[0][0]
        heapq.heappush(self._heap, (when, next(self._order), key, version))
        return earliest

    def forget(self, key: int) -> None:
        """``key``'s timers are no longer wanted (its connection is gone)."""
        self._latest.pop(key, None)

    def _sweep(self) -> None:
        latest = self._latest
        self._heap = [entry for entry in self._heap if latest.get(entry[2]) == entry[3]]
        heapq.heapify(self._heap)

    def pop_due(self, now: float) -> list[tuple[int, int]]:
        """The ``(key, version)`` of every timer due at ``now``, removed, earliest first."""
        due = []
        while self._heap and self._heap[0][0] <= now:
            _, _, key, version = heapq.heappop(self._heap)
            if self._latest.get(key) == version:
                del self._latest[key]
            due.append((key, version))
        return due

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def next_deadline(self) -> float:
        """When the earliest timer is due; infinity when none is set."""
        return self._heap[0][0] if self._heap else math.inf
