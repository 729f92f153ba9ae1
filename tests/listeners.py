"""Which TCP addresses a process listens on, read from /proc (not a test module itself)."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from pathlib import Path

_LISTEN = "0A"


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket process `pid` holds in the LISTEN state."""
    inodes = _socket_inodes(pid)
    found = set()
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for fields in (line.split() for line in lines):
            if fields[3] == _LISTEN and int(fields[9]) in inodes:
                host, port = fields[1].split(":")
                found.add((_address(host), int(port, 16)))
    return found


def listening_anywhere() -> set[tuple[str, int]]:
    """(address, port) of every TCP listener of every process we can inspect."""
    found: set[tuple[str, int]] = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            found |= listening(int(proc.name))
        except OSError:
            continue  # exited meanwhile, or not ours to read
    return found


def non_loopback_address() -> str | None:
    """This host's address on the interface that routes outwards, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1; no packet is sent
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _address(hex_host: str) -> str:
    # NOTE: /proc prints each 32-bit word of the address in host (little-endian) order
    words = struct.unpack(f"<{len(hex_host) // 8}I", bytes.fromhex(hex_host))
    packed = struct.pack(f">{len(words)}I", *words)
    return str(ipaddress.ip_address(packed))
