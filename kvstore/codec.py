"""The wire and disk format of one KV block: magic, a length-prefixed msgpack header, raw payload.

    b"PKV1" | uint32 BE header length | msgpack map | payload bytes

The header names what the payload is (format version, model, dtype, layout, shape, block hash,
session, round, branch) and carries CRC-32s of the payload and of itself. `decode` checks all of it
against what the loader expects before anything is used: a block from another model or layout, a
newer format, a bad checksum, a truncation or a forged length is rejected with a reason (and the
round recomputes). msgpack is unpacked with small limits and no extension types; nothing is ever
unpickled or executed. The payload is returned as a zero-copy view of the input.

Checksums: `payload_crc` is zlib.crc32 of the payload; `header_crc` is zlib.crc32 of the msgpack
header packed with `header_crc` set to 0 (decode re-packs the fields it read, so a header in any
non-canonical msgpack form fails the check instead of slipping through). CRC-32 catches corruption,
not forgery: whoever can write a block can recompute both, which is why every field is also checked
for type and range. `encode` runs the same checks, so it never writes a block `decode` would refuse.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import asdict, dataclass

import msgpack

MAGIC = b"PKV1"
VERSION = 1
_LEN = struct.Struct(">I")
MAX_HEADER = 4096  # bytes; a real header is ~200, so a bigger length prefix is forged or corrupt
MAX_STR = 1024
MAX_HASH = 64
MAX_DIMS = 16
REASONS = frozenset(
    {"magic", "version", "truncated", "header", "model", "layout", "dtype", "shape", "checksum", "oversized"}
)
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
        assert reason in REASONS, reason  # a new reason must be added to REASONS (and dashboards) first
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
    """Serialize one block; raises CodecError (a ValueError) for a header decode would refuse."""
    payload = memoryview(payload).cast("B")
    fields = {**asdict(header), "v": VERSION, "shape": list(header.shape)}
    fields.update(payload_len=len(payload), payload_crc=_crc(payload), header_crc=0)
    _check_types(fields)
    _check_sizes(fields, max_payload=len(payload))
    fields["header_crc"] = _crc(_pack(fields))
    raw = _pack(fields)
    if len(raw) > MAX_HEADER:
        raise CodecError("oversized", f"header of {len(raw)} bytes")
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
            max_str_len=MAX_STR,
            max_bin_len=MAX_HASH,
            max_array_len=MAX_DIMS,
            max_map_len=len(_FIELDS),
            ext_hook=_no_ext,
        )
    except CodecError:
        raise
    except Exception as exc:  # msgpack raises several types on malformed input
        raise CodecError("header", f"malformed msgpack ({type(exc).__name__})") from None
    if not isinstance(fields, dict):
        raise CodecError("header", "not a map")
    _check_types(fields)
    return fields


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # bool is an int subclass


def _check_types(fields: dict) -> None:
    """Exactly the known keys, each of its type and within its range (shared by encode and decode)."""
    if set(fields) != set(_FIELDS):
        raise CodecError("header", "not a map with exactly the block header's keys")
    for key, kind in _FIELDS.items():
        value = fields[key]
        if not (_is_int(value) if kind is int else isinstance(value, kind)):
            raise CodecError("header", f"{key} has the wrong type")
        if kind is str and len(value) > MAX_STR:
            raise CodecError("header", f"{key} is longer than {MAX_STR}")
    if fields["round"] < 0 or len(fields["block_hash"]) > MAX_HASH:
        raise CodecError("header", "negative round or over-long block hash")
    shape = fields["shape"]
    if len(shape) > MAX_DIMS or not all(_is_int(d) and d >= 0 for d in shape):
        raise CodecError("shape", "shape must be at most 16 non-negative integers")


def _check_sizes(f: dict, max_payload: int) -> None:
    """The dtype is known and shape x itemsize = payload_len <= max_payload (no allocation yet)."""
    if f["dtype"] not in ITEMSIZE:
        raise CodecError("dtype", f"unknown dtype {f['dtype']!r}")
    n = f["payload_len"]
    if n < 0 or n > max_payload:
        raise CodecError("oversized", f"payload of {n} bytes (limit {max_payload})")
    if _numel(f["shape"]) * ITEMSIZE[f["dtype"]] != n:
        raise CodecError("shape", f"shape {f['shape']} of {f['dtype']} does not match {n} payload bytes")


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
    if expect_dtype is not None and f["dtype"] != expect_dtype:
        raise CodecError("dtype", f"dtype {f['dtype']!r}, expected {expect_dtype!r}")
    _check_sizes(f, max_payload)


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
    if len(view) != start + n:  # short or with trailing bytes: either way not the block that was written
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
