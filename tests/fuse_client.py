"""FUSE messages as Linux's virtio_fs driver puts them on a request queue (include/uapi/linux/fuse.h, 7.36).

Tests play the guest with tests/virtio_driver.py: a request is one chain,
device-readable fuse_in_header + arguments, then device-writable
fuse_out_header + reply.
"""

from __future__ import annotations

import struct

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen padding
OUT_HEADER = struct.Struct("<IiQ")       # len error unique
INIT_IN = struct.Struct("<IIIII44x")     # major minor max_readahead flags flags2 unused[11]
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # major minor max_readahead flags max_background congestion_threshold
#                                              max_write time_gran max_pages map_alignment flags2 unused[7]
ENTRY_OUT_SIZE = 40 + 88                 # fuse_entry_out: nodeid generation entry/attr valid (+nsec) + fuse_attr
FUSE_KERNEL_VERSION, FUSE_KERNEL_MINOR_VERSION = 7, 36
FUSE_ROOT_ID = 1


class Opcode:
    LOOKUP = 1
    INIT = 26


def request(opcode: int, unique: int, nodeid: int, args: bytes) -> bytes:
    return IN_HEADER.pack(IN_HEADER.size + len(args), opcode, unique, nodeid, 0, 0, 0, 0, 0) + args


def init_request(unique: int = 1) -> bytes:
    return request(Opcode.INIT, unique, 0, INIT_IN.pack(FUSE_KERNEL_VERSION, FUSE_KERNEL_MINOR_VERSION, 0, 0, 0))


def lookup_request(name: str, unique: int, parent: int = FUSE_ROOT_ID) -> bytes:
    return request(Opcode.LOOKUP, unique, parent, name.encode() + b"\0")


def entry_size(reply: bytes) -> int:
    """fuse_attr.size of a LOOKUP reply (fuse_entry_out after the out header)."""
    return struct.unpack_from("<Q", reply, OUT_HEADER.size + 40 + 8)[0]
