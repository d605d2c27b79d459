"""TLS on the worker port: the server's context, reloadable, and one connection's TLS session.

The worker writes one encoded frame to many sockets without awaiting (docs/architecture.md), so
TLS is done sans-IO here, with ``ssl.SSLObject`` over memory buffers, rather than with
``trio.SSLStream``, whose ``send_all`` awaits: the connection hands a session the plaintext it
has batched, gets back the bytes for the wire, and writes them its usual way. A frame is still
encoded once for every recipient; only its encryption is per connection.
"""

from __future__ import annotations

import contextlib
import logging
import ssl

logger = logging.getLogger(__name__)

# A session decrypts up to this much at a time, the size of a connection's socket reads.
READ_BYTES = 65536

# What the worker's TLS says it speaks inside (ALPN): the WebSocket upgrade is HTTP/1.1.
ALPN_PROTOCOLS = ["http/1.1"]


class TLSFileError(Exception):
    """The certificate or key file cannot be used: unreadable, not PEM, or not a pair."""


def load_server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context with the certificate chain in ``cert_file`` and its key in ``key_file``.

    TLS 1.2 and newer; no compression (CRIME); no renegotiation, which a client could ask for
    again and again to make the server do handshakes' worth of work on one connection.
    The message of a :class:`TLSFileError` names the files and the problem, never the key.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(ALPN_PROTOCOLS)
    try:
        # A key with a passphrase would make OpenSSL prompt on the terminal: refuse it instead.
        context.load_cert_chain(cert_file, key_file, password=_no_passphrase)
    except ssl.SSLError as error:
        problem = _pem_problem(error, cert_file, key_file)
    except OSError as error:
        problem = error.strerror or str(error)
    else:
        return context
    raise TLSFileError(f"cannot load TLS certificate {cert_file} with key {key_file}: {problem}")


def _no_passphrase() -> bytes:
    return b""


def _pem_problem(error: ssl.SSLError, cert_file: str, key_file: str) -> str:
    """What is wrong with files that OpenSSL refused, in words (its own say only "PEM lib").
    Only markers are looked for in the files: nothing of them is quoted."""
    if error.reason == "KEY_VALUES_MISMATCH":
        return "the key is not the certificate's"
    if not _holds(cert_file, b"-----BEGIN CERTIFICATE-----"):
        return f"{cert_file} holds no PEM certificate"
    if _holds(key_file, b"ENCRYPTED"):
        return f"{key_file} is encrypted with a passphrase, which is not supported"
    if not _holds(key_file, b"PRIVATE KEY-----"):
        return f"{key_file} holds no PEM private key"
    return f"OpenSSL refused them ({error.reason or error.strerror})"


def _holds(path: str, marker: bytes) -> bool:
    try:
        with open(path, "rb") as file:
            return marker in file.read()
    except OSError:
        return False


class ServerCertificate:
    """The context that new TLS connections get, reloadable from its files.

    A reload replaces the context for connections accepted from then on; a connection keeps
    the context it started with until it closes, so reloading drops nobody.
    """

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.context = load_server_context(cert_file, key_file)

    def reload(self) -> bool:
        """Load the files again; on failure keep the current context and log why."""
        try:
            self.context = load_server_context(self.cert_file, self.key_file)
        except TLSFileError as error:
            logger.error("TLS reload failed, still serving the previous certificate: %s", error)
            return False
        logger.info("TLS certificate reloaded from %s", self.cert_file)
        return True

    def session(self) -> Session:
        return Session(self.context)


class Session:
    """One connection's TLS, server side: ciphertext in, plaintext out, and back.

    Errors are ``ssl.SSLError``: the peer sent what is not TLS, or a handshake we refuse.
    """

    __slots__ = ("_incoming", "_outgoing", "_ssl", "established", "peer_closed")

    def __init__(self, context: ssl.SSLContext) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self.established = False
        self.peer_closed = False  # the peer sent its close_notify

    @property
    def wants_write(self) -> bool:
        """Whether the session has bytes for the wire (handshake, alert) that no write carries."""
        return self._outgoing.pending > 0

    def receive(self, data: bytes) -> bytes:
        """Take bytes from the wire; return the plaintext they complete (maybe none)."""
        self._incoming.write(data)
        if not self.established:
            try:
                self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                return b""
            self.established = True
        chunks = []
        while True:
            try:
                chunk = self._ssl.read(READ_BYTES)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.peer_closed = True
                break
            if not chunk:
                self.peer_closed = True
                break
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def seal(self, plaintext: bytes) -> bytes:
        """The bytes for the wire: what the session had to send, then ``plaintext`` encrypted."""
        if plaintext:
            self._ssl.write(plaintext)
        return self._outgoing.read()

    def close_notify(self) -> None:
        """Queue the close_notify alert (read it with ``seal(b"")``); only on an established
        session, and not waiting for the peer's."""
        if not self.established:
            return
        # It raises for want of the peer's close_notify, which is not awaited: ours is queued.
        with contextlib.suppress(ssl.SSLError):
            self._ssl.unwrap()
