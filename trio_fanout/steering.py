"""Which worker's listening socket the kernel gives a new connection to.

Each worker of `trio-fanout run` has a listening socket of its own on the shared port
(``SO_REUSEPORT``), and by default the kernel picks one by a hash of the connection's addresses.
A connection it gives to a worker that died or hangs waits in that socket until the worker is
replaced: after a worker's death, half of its reconnecting clients would wait for the
replacement to start instead of going to a live worker at once. So while some workers are not
ready, the master attaches to the sockets a small classic BPF program that hashes only over the
ready ones, and detaches it once all are ready again. Connections already waiting in a socket
stay there: the replacement, given the same socket, accepts them.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
from collections.abc import Collection

# From <asm-generic/socket.h> (Linux 4.5 and 5.8); Python's socket module does not name them.
SO_ATTACH_REUSEPORT_CBPF = 51
SO_DETACH_REUSEPORT_BPF = 68

# Classic BPF, from <linux/filter.h>: loads relative to the network header, and the opcodes
# used below.
_NET = -0x100000  # SKF_NET_OFF
_LOAD_HALF = 0x28  # BPF_LD | BPF_H | BPF_ABS
_LOAD_WORD = 0x20  # BPF_LD | BPF_W | BPF_ABS
_A_TO_X = 0x07  # BPF_MISC | BPF_TAX
_XOR_X = 0xAC  # BPF_ALU | BPF_XOR | BPF_X
_MUL = 0x24  # BPF_ALU | BPF_MUL | BPF_K
_SHIFT_RIGHT = 0x74  # BPF_ALU | BPF_RSH | BPF_K
_MODULO = 0x94  # BPF_ALU | BPF_MOD | BPF_K
_JUMP_IF_EQUAL = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_RETURN = 0x06  # BPF_RET | BPF_K

# Where the source address's last 32 bits and the TCP source port are, from the start of the
# IP header: a SYN carries no IPv4 options, and no IPv6 extension header on the way here.
_SOURCE = {socket.AF_INET: (12, 20), socket.AF_INET6: (20, 40)}


def _program(family: socket.AddressFamily, ready: list[int]) -> list[tuple[int, int, int, int]]:
    """Instructions that pick one of the sockets at positions ``ready`` (in the order the
    sockets joined the port) by a hash of the client's address and port. The port alone
    would do badly: Linux gives connecting sockets even ports."""
    address_at, port_at = _SOURCE[family]
    instructions = [
        (_LOAD_HALF, 0, 0, _NET + port_at),
        (_A_TO_X, 0, 0, 0),
        (_LOAD_WORD, 0, 0, _NET + address_at),
        (_XOR_X, 0, 0, 0),
        (_MUL, 0, 0, 0x9E3779B1),  # Knuth's multiplicative hash
        (_SHIFT_RIGHT, 0, 0, 16),
        (_MODULO, 0, 0, len(ready)),
    ]
    for choice, position in enumerate(ready[:-1]):
        instructions.append((_JUMP_IF_EQUAL, 0, 1, choice))
        instructions.append((_RETURN, 0, 0, position))
    instructions.append((_RETURN, 0, 0, ready[-1]))
    return instructions


def steer(listeners: list[socket.socket], ready: Collection[int]) -> None:
    """Give new connections only to the sockets at positions ``ready`` of ``listeners`` (all
    on one port with ``SO_REUSEPORT``, in the order they were opened); with all of them ready,
    or none, leave the choice to the kernel's own hash. ``OSError`` where the kernel cannot."""
    first = listeners[0]
    if not ready or len(ready) == len(listeners):
        try:
            first.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)
        except OSError as error:
            if error.errno != errno.ENOENT:  # no program was attached
                raise
        return
    instructions = _program(first.family, sorted(ready))
    code = b"".join(
        struct.pack("HBBI", op, jt, jf, k & 0xFFFFFFFF) for op, jt, jf, k in instructions
    )
    buffer = ctypes.create_string_buffer(code)
    # struct sock_fprog: the count, then a pointer to the instructions; the kernel copies them.
    program = struct.pack("HL", len(instructions), ctypes.addressof(buffer))
    first.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, program)
