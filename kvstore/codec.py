"""The wire and disk format of one KV block: magic, a length-prefixed msgpack header, raw payload.

    b"PKV1" | uint32 BE header length | msgpack map | payload bytes

The header names what the payload is (format version, model, dtype, layout, shape, block hash,
session, round, branch) and carries CRC-32s of the payload and of itself. `decode` checks all of it
against what the loader expects before anything is used: a block from another model or layout, a
newer format, a bad checksum, a truncation or a forged length is rejected with a reason (and the
round recomputes). msgpack is unpacked with small limits and no extension types; nothing is ever
unpickled or executed. The payload is returned as a zero-copy view of the input.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import asdict, dataclass

import msgpack

MAGIC = b"PKV1"
VERSION = 1
_LEN = struct.Struct(">I")
MAX_HEADER = 4096
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1, "uint8": 1}
_FIELDS = {
    "v": int,
    "model": str,
    "dtype": str,
    "layout": str,
    "shape": list,
    "block_hash": bytes,
    "session": str,
    "round": int,
    "branch": str,
    "payload_len": int,
    "payload_crc": int,
    "header_crc": int,
}


class CodecError(ValueError):
    """A block that must not be loaded; `reason` is one of a fixed set (for metrics)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class BlockHeader:
    model: str
    dtype: str
    layout: str
    shape: tuple[int, ...]
    block_hash: bytes
    session: str
    round: int
    branch: str = ""


def _crc(data: bytes | memoryview) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def _pack(fields: dict) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def encode(header: BlockHeader, payload: bytes | memoryview) -> bytes:
    payload = memoryview(payload).cast("B")
    if header.dtype not in ITEMSIZE:
        raise ValueError(f"unknown dtype {header.dtype!r}")
    if _numel(header.shape) * ITEMSIZE[header.dtype] != len(payload):
        raise ValueError(f"shape {header.shape} of {header.dtype} does not match {len(payload)} bytes")
    fields = {**asdict(header), "v": VERSION, "shape": list(header.shape)}
    fields.update(payload_len=len(payload), payload_crc=_crc(payload), header_crc=0)
    fields["header_crc"] = _crc(_pack(fields))
    raw = _pack(fields)
    return b"".join((MAGIC, _LEN.pack(len(raw)), raw, payload))


def _numel(shape: tuple[int, ...] | list) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _no_ext(code: int, data: bytes) -> None:
    raise CodecError("header", f"extension type {code} is not allowed")


def _header(raw: memoryview) -> dict:
    try:
        fields = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_str_len=1024,
            max_bin_len=64,
            max_array_len=16,
            max_map_len=len(_FIELDS),
            ext_hook=_no_ext,
        )
    except CodecError:
        raise
    except Exception as exc:  # msgpack raises several types on malformed input
        raise CodecError("header", f"malformed msgpack ({type(exc).__name__})") from None
    if not isinstance(fields, dict) or set(fields) != set(_FIELDS):
        raise CodecError("header", "not a map with exactly the block header's keys")
    for key, kind in _FIELDS.items():
        value = fields[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CodecError("header", f"{key} has the wrong type")
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in fields["shape"]):
        raise CodecError("shape", "shape must be non-negative integers")
    return fields


def _check_fields(
    f: dict, expect_model: str, expect_layout: str, expect_dtype: str | None, max_payload: int
) -> None:
    if f["v"] != VERSION:
        raise CodecError("version", f"format {f['v']}, this Ponder reads {VERSION}")
    if _crc(_pack({**f, "header_crc": 0})) != f["header_crc"]:
        raise CodecError("checksum", "header checksum mismatch")
    if f["model"] != expect_model:
        raise CodecError("model", f"block of {f['model']!r}, expected {expect_model!r}")
    if f["layout"] != expect_layout:
        raise CodecError("layout", f"layout {f['layout']!r}, expected {expect_layout!r}")
    if f["dtype"] not in ITEMSIZE or (expect_dtype is not None and f["dtype"] != expect_dtype):
        raise CodecError("dtype", f"dtype {f['dtype']!r}")
    n = f["payload_len"]
    if n < 0 or n > max_payload:
        raise CodecError("oversized", f"payload of {n} bytes (limit {max_payload})")
    if _numel(f["shape"]) * ITEMSIZE[f["dtype"]] != n:
        raise CodecError("shape", f"shape {f['shape']} does not match {n} payload bytes")


def decode(
    data: bytes | memoryview,
    *,
    expect_model: str,
    expect_layout: str,
    expect_dtype: str | None = None,
    max_payload: int = 64 << 20,
) -> tuple[BlockHeader, memoryview]:
    """Validate a block and return its header and a zero-copy view of its payload."""
    view = memoryview(data).cast("B")
    if len(view) < len(MAGIC) + _LEN.size:
        raise CodecError("truncated", f"{len(view)} bytes is shorter than any block")
    if view[:4] != MAGIC:
        raise CodecError("magic", "not a Ponder KV block")
    (hlen,) = _LEN.unpack(view[4:8])
    if hlen > MAX_HEADER:
        raise CodecError("oversized", f"header of {hlen} bytes")
    if len(view) < 8 + hlen:
        raise CodecError("truncated", "header cut short")
    f = _header(view[8 : 8 + hlen])
    _check_fields(f, expect_model, expect_layout, expect_dtype, max_payload)
    n = f["payload_len"]
    start = 8 + hlen
    if len(view) != start + n:
        raise CodecError("truncated", f"{len(view) - start} payload bytes, header says {n}")
    payload = view[start:]
    if _crc(payload) != f["payload_crc"]:
        raise CodecError("checksum", "payload checksum mismatch")
    header = BlockHeader(
        f["model"],
        f["dtype"],
        f["layout"],
        tuple(f["shape"]),
        f["block_hash"],
        f["session"],
        f["round"],
        f["branch"],
    )
    return header, payload
