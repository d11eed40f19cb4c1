"""The wire and disk format of one store chunk: magic, a length-prefixed msgpack header, zero padding
up to a fixed offset, then the raw payload.

    b"PKV1" | uint32 BE header length | msgpack map | zeros | payload (at PAYLOAD_OFFSET = 4096)

The header names what the payload is (format version, model, dtype, layout, shape, chunk hash,
session, round, branch, payload length) and carries XXH3-64 digests (kvstore/digest.py): one per
payload *piece* and one of itself. A piece is one index of the shape's first dimension — one layer of
the chunk — so a loader verifies pieces in parallel threads and can check one layer while it copies
another. The payload starts at a fixed, page-aligned offset, so a writer can place it before the
header exists (gather straight into a store slot, then write the header) and a reader can view it
as a tensor without copying.

`open_block` checks everything but the payload digests against what the loader expects (model,
layout, dtype, sizes); `check_pieces` then verifies pieces; `decode` does both. A block from another
model or layout, another format version (version 1 carried CRC-32s and no padding), a bad digest, a
truncation, non-zero padding or a forged length is rejected with a reason (and the round recomputes).
msgpack is unpacked with small limits and no extension types; nothing is ever unpickled or executed.
The payload is returned as a zero-copy view of the input.

`header_digest` is XXH3-64 of the msgpack header packed with `header_digest` set to 0 (decode
re-packs the fields it read, so a header in any non-canonical msgpack form fails the check instead of
slipping through). Digests catch corruption, not forgery: whoever can write a block can recompute
them, which is why every field is also checked for type and range. `encode` runs the same checks,
so it never writes a block `decode` would refuse.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import msgpack

import kvstore.digest as dg

MAGIC = b"PKV1"  # the family of Ponder KV blocks; the format version is the header's `v`
VERSION = 2
PAYLOAD_OFFSET = 4096  # bytes before the payload: magic, length, header, zero padding
_LEN = struct.Struct(">I")
MAX_HEADER = PAYLOAD_OFFSET - len(MAGIC) - _LEN.size
_ZEROS = bytes(PAYLOAD_OFFSET)
MAX_STR = 1024
MAX_HASH = 64
MAX_DIMS = 16
MAX_PIECES = 256  # pieces are layers: the largest models have ~128
MAX_PAYLOAD = 512 << 20  # a 70B model's 256-token chunk is 80 MiB; 512-token chunks of it fit too
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
    "digests": bytes,
    "header_digest": int,
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


@dataclass(frozen=True)
class Opened:
    """A block whose header passed every check; its payload pieces are not verified yet."""

    header: BlockHeader
    payload: memoryview
    digests: list[int]

    def pieces(self) -> list[memoryview]:
        return split_pieces(self.payload, self.header.shape)


def block_bytes(payload_len: int) -> int:
    """The encoded size of a chunk with this payload."""
    return PAYLOAD_OFFSET + payload_len


def num_pieces(shape: Sequence[int]) -> int:
    return shape[0] if shape and shape[0] > 0 else 1


def split_pieces(payload: memoryview, shape: Sequence[int]) -> list[memoryview]:
    """The payload's pieces (one per index of the first dimension), as zero-copy views."""
    n = num_pieces(shape)
    size = len(payload) // n
    return [payload[i * size : (i + 1) * size] for i in range(n)]


def _pack(fields: dict) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def header_area(header: BlockHeader, payload_len: int, digests: Sequence[int]) -> bytes:
    """The PAYLOAD_OFFSET bytes that precede a payload of `payload_len` bytes with these piece digests.

    Raises CodecError (a ValueError) for a header decode would refuse."""
    fields = {**asdict(header), "v": VERSION, "shape": list(header.shape)}
    fields.update(payload_len=payload_len, digests=dg.pack(digests), header_digest=0)
    _check_types(fields)
    _check_sizes(fields, max_payload=payload_len)
    fields["header_digest"] = dg.digest(_pack(fields))
    raw = _pack(fields)
    if len(raw) > MAX_HEADER:
        raise CodecError("oversized", f"header of {len(raw)} bytes")
    head = MAGIC + _LEN.pack(len(raw)) + raw
    return head + bytes(PAYLOAD_OFFSET - len(head))


def encode(header: BlockHeader, payload: bytes | memoryview, hasher: dg.Hasher | None = None) -> bytes:
    """Serialize one block (digests computed here, in parallel when a hasher is given)."""
    payload = memoryview(payload).cast("B")
    pieces = split_pieces(payload, header.shape)
    digests = hasher.digests(pieces) if hasher is not None else [dg.digest(p) for p in pieces]
    return b"".join((header_area(header, len(payload), digests), payload))


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
            max_bin_len=max(MAX_HASH, MAX_PIECES * dg.DIGEST_BYTES),
            max_array_len=MAX_DIMS,
            max_map_len=2 * len(_FIELDS),
            ext_hook=_no_ext,
        )
    except CodecError:
        raise
    except Exception as exc:  # msgpack raises several types on malformed input
        raise CodecError("header", f"malformed msgpack ({type(exc).__name__})") from None
    if not isinstance(fields, dict):
        raise CodecError("header", "not a map")
    version = fields.get("v")
    if _is_int(version) and version != VERSION:  # before the keys: another version has other keys
        raise CodecError("version", f"format {version}, this Ponder reads {VERSION}")
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
    """The dtype is known, shape x itemsize = payload_len <= max_payload, one digest per piece."""
    if f["dtype"] not in ITEMSIZE:
        raise CodecError("dtype", f"unknown dtype {f['dtype']!r}")
    n = f["payload_len"]
    if n < 0 or n > max_payload:
        raise CodecError("oversized", f"payload of {n} bytes (limit {max_payload})")
    if _numel(f["shape"]) * ITEMSIZE[f["dtype"]] != n:
        raise CodecError("shape", f"shape {f['shape']} of {f['dtype']} does not match {n} payload bytes")
    pieces = num_pieces(f["shape"])
    if pieces > MAX_PIECES:
        raise CodecError("shape", f"{pieces} pieces (limit {MAX_PIECES})")
    if len(f["digests"]) != pieces * dg.DIGEST_BYTES:
        raise CodecError("header", f"{len(f['digests'])} digest bytes for {pieces} pieces")


def _check_fields(
    f: dict, expect_model: str, expect_layout: str, expect_dtype: str | None, max_payload: int
) -> None:
    if dg.digest(_pack({**f, "header_digest": 0})) != f["header_digest"]:
        raise CodecError("checksum", "header digest mismatch")
    if f["model"] != expect_model:
        raise CodecError("model", f"block of {f['model']!r}, expected {expect_model!r}")
    if f["layout"] != expect_layout:
        raise CodecError("layout", f"layout {f['layout']!r}, expected {expect_layout!r}")
    if expect_dtype is not None and f["dtype"] != expect_dtype:
        raise CodecError("dtype", f"dtype {f['dtype']!r}, expected {expect_dtype!r}")
    _check_sizes(f, max_payload)


def open_block(
    data: bytes | memoryview,
    *,
    expect_model: str,
    expect_layout: str,
    expect_dtype: str | None = None,
    max_payload: int = MAX_PAYLOAD,
) -> Opened:
    """Check a block's frame and header (not its payload digests: see check_pieces)."""
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
    f = _header(view[8 : 8 + hlen])  # first: a block of another version is refused as such
    if len(view) < PAYLOAD_OFFSET:
        raise CodecError("truncated", "header area cut short")
    _check_fields(f, expect_model, expect_layout, expect_dtype, max_payload)
    if view[8 + hlen : PAYLOAD_OFFSET] != _ZEROS[: PAYLOAD_OFFSET - 8 - hlen]:  # padding is zeros
        raise CodecError("header", "non-zero bytes between the header and the payload")
    n = f["payload_len"]
    if len(view) != PAYLOAD_OFFSET + n:  # short or with trailing bytes: not the block that was written
        raise CodecError("truncated", f"{len(view) - PAYLOAD_OFFSET} payload bytes, header says {n}")
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
    return Opened(header, view[PAYLOAD_OFFSET:], dg.unpack(f["digests"]))


def check_pieces(
    opened: Opened, indexes: Iterable[int] | None = None, hasher: dg.Hasher | None = None
) -> None:
    """Verify the digests of some pieces (all by default); raises CodecError("checksum")."""
    pieces = opened.pieces()
    idx = list(range(len(pieces))) if indexes is None else list(indexes)
    chosen = [pieces[i] for i in idx]
    got = hasher.digests(chosen) if hasher is not None else [dg.digest(p) for p in chosen]
    for i, d in zip(idx, got, strict=True):
        if d != opened.digests[i]:
            raise CodecError("checksum", f"payload piece {i} digest mismatch")


def decode(
    data: bytes | memoryview,
    *,
    expect_model: str,
    expect_layout: str,
    expect_dtype: str | None = None,
    max_payload: int = MAX_PAYLOAD,
    hasher: dg.Hasher | None = None,
) -> tuple[BlockHeader, memoryview]:
    """Validate a block completely and return its header and a zero-copy view of its payload."""
    opened = open_block(
        data,
        expect_model=expect_model,
        expect_layout=expect_layout,
        expect_dtype=expect_dtype,
        max_payload=max_payload,
    )
    check_pieces(opened, hasher=hasher)
    return opened.header, opened.payload
