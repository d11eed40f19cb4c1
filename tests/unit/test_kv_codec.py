"""The KV block codec: round trips, every rejection reason, and a seeded fuzz of random corruptions."""

import random
import zlib

import msgpack
import numpy as np
import pytest
import xxhash

from kvstore.codec import (
    MAGIC,
    PAYLOAD_OFFSET,
    REASONS,
    BlockHeader,
    CodecError,
    check_pieces,
    decode,
    encode,
    open_block,
)
from kvstore.digest import Hasher

MODEL, LAYOUT = "smollm2-135m-instruct", "[layers,2,kv_heads,block,head_dim]"
SHAPE = (2, 2, 3, 16, 4)  # layers, K/V, kv heads, block tokens, head dim
# numpy has no bfloat16/float8: their blocks travel as raw bytes of the same itemsize
NP_DTYPE = {"float32": "float32", "float16": "float16", "bfloat16": "uint16", "float8_e4m3fn": "uint8"}


def block(dtype="float32", shape=SHAPE, seed=0, branch="b1"):
    rng = np.random.default_rng(seed)
    if dtype in ("float32", "float16"):
        arr = rng.standard_normal(shape).astype(dtype)
    else:
        arr = rng.integers(0, np.iinfo(NP_DTYPE[dtype]).max, size=shape, dtype=NP_DTYPE[dtype])
    h = BlockHeader(MODEL, dtype, LAYOUT, shape, b"\x01" * 16, "sess", 3, branch)
    return h, arr, encode(h, arr)


def dec(data, **kw):
    return decode(data, **({"expect_model": MODEL, "expect_layout": LAYOUT} | kw))


@pytest.mark.parametrize("dtype", sorted(NP_DTYPE))
def test_round_trip_is_exact_and_zero_copy(dtype):
    h, arr, data = block(dtype, branch="")
    got, payload = dec(data, expect_dtype=dtype)
    assert got == h
    assert np.array_equal(np.frombuffer(payload, dtype=NP_DTYPE[dtype]).reshape(h.shape), arr)
    assert payload.obj is data  # a view into the input, not a copy


def test_decode_accepts_a_memoryview_without_copying():
    h, arr, data = block("float16")
    buf = bytearray(data)
    got, payload = dec(memoryview(buf))
    buf[-1] ^= 0xFF  # the view sees the caller's buffer: proof that nothing was copied
    assert got == h and payload[-1] == buf[-1]


def _header_fields(data: bytes) -> tuple[dict, int]:
    hlen = int.from_bytes(data[4:8], "big")
    return msgpack.unpackb(data[8 : 8 + hlen], raw=False), hlen


def _frame(raw: bytes, payload: bytes) -> bytes:
    """A header and a payload framed as the codec frames them (padding to PAYLOAD_OFFSET)."""
    head = MAGIC + len(raw).to_bytes(4, "big") + raw
    return head + bytes(max(0, PAYLOAD_OFFSET - len(head))) + payload


def _forge(data: bytes, fix_crc: bool = True, drop: str | None = None, **changes) -> bytes:
    """Re-pack the header with changed fields, the length prefix kept honest (and the digest, if asked)."""
    fields, _ = _header_fields(data)
    fields.update(changes)
    if drop:
        del fields[drop]
    if fix_crc and "header_digest" in fields:
        packed = msgpack.packb({**fields, "header_digest": 0}, use_bin_type=True)
        fields["header_digest"] = xxhash.xxh3_64_intdigest(packed)
    return _frame(msgpack.packb(fields, use_bin_type=True), data[PAYLOAD_OFFSET:])


def _raw(data: bytes) -> bytes:
    return data[8 : 8 + int.from_bytes(data[4:8], "big")]


def _raw_header(data: bytes, raw: bytes) -> bytes:
    return _frame(raw, data[PAYLOAD_OFFSET:])


def _version_1(data: bytes) -> bytes:
    """The same block in format 1 (CRC-32s, payload right after the header): refused as a version."""
    fields, _ = _header_fields(data)
    payload = data[PAYLOAD_OFFSET:]
    v1 = {k: v for k, v in fields.items() if k not in ("digests", "header_digest")}
    v1 |= {"v": 1, "payload_crc": zlib.crc32(payload), "header_crc": 0}
    v1["header_crc"] = zlib.crc32(msgpack.packb(v1, use_bin_type=True))
    raw = msgpack.packb(v1, use_bin_type=True)
    return MAGIC + len(raw).to_bytes(4, "big") + raw + payload


def _pad(data: bytes) -> bytes:
    """One non-zero byte in the padding between the header and the payload."""
    bad = bytearray(data)
    bad[PAYLOAD_OFFSET - 1] = 7
    return bytes(bad)


REJECTIONS = [
    (lambda d: b"XKV1" + d[4:], "magic"),
    (lambda d: d[:6], "truncated"),
    (lambda d: d[:40], "truncated"),
    (lambda d: d[:-1], "truncated"),
    (lambda d: d + b"junk", "truncated"),
    (lambda d: d[:4] + (10**6).to_bytes(4, "big") + d[8:], "oversized"),
    (lambda d: _forge(d, v=1), "version"),
    (lambda d: _forge(d, v=3), "version"),
    (_version_1, "version"),
    (_pad, "header"),
    (lambda d: d[: PAYLOAD_OFFSET - 1], "truncated"),
    (lambda d: _forge(d, fix_crc=False, model="other"), "checksum"),
    (lambda d: _forge(d, fix_crc=False, round=4), "checksum"),
    (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "checksum"),
    (lambda d: _forge(d, extra=1), "header"),
    (lambda d: _forge(d, drop="branch"), "header"),
    (lambda d: _forge(d, round="3"), "header"),
    (lambda d: _forge(d, round=True), "header"),
    (lambda d: _forge(d, round=-1), "header"),
    (lambda d: _forge(d, block_hash=b"\x00" * 65), "header"),
    (lambda d: _forge(d, session="s" * 2000), "header"),
    (lambda d: _forge(d, branch=msgpack.ExtType(1, b"x")), "header"),
    (lambda d: _raw_header(d, msgpack.packb([1, 2, 3])), "header"),
    (lambda d: _raw_header(d, _raw(d) + b"\x00"), "header"),  # bytes after the map, inside the header
    (lambda d: _raw_header(d, b"\xc1"), "header"),  # a msgpack byte that is never valid
    (lambda d: _forge(d, model="qwen"), "model"),
    (lambda d: _forge(d, layout="LBHNC"), "layout"),
    (lambda d: _forge(d, dtype="int4"), "dtype"),
    (lambda d: _forge(d, shape=[2, 2, 3, 16, 5]), "shape"),
    (lambda d: _forge(d, shape=[-1, 2]), "shape"),
    (lambda d: _forge(d, shape=[1] * 17), "header"),  # over max_array_len: refused by the unpacker
    (lambda d: _forge(d, payload_len=1 << 40), "oversized"),
    (lambda d: _forge(d, payload_len=-5), "oversized"),
    (lambda d: _forge(d, digests=b"\x00" * 16), "checksum"),  # one digest per piece, all wrong
    (lambda d: _forge(d, digests=b"\x00" * 8), "header"),  # a digest missing
    (lambda d: _forge(d, header_digest=0, fix_crc=False), "checksum"),
]


def test_every_reason_is_exercised():
    seen = {reason for _, reason in REJECTIONS} | {"dtype", "oversized", "model", "layout"}
    assert seen == REASONS


@pytest.mark.parametrize(("mutate", "reason"), REJECTIONS)
def test_rejections_name_their_reason(mutate, reason):
    _, _, data = block()
    with pytest.raises(CodecError) as err:
        dec(mutate(data))
    assert err.value.reason == reason and isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"expect_model": "qwen"}, "model"),
        ({"expect_layout": "other"}, "layout"),
        ({"expect_dtype": "float32"}, "dtype"),
        ({"max_payload": 10}, "oversized"),
    ],
)
def test_wrong_expectations_and_limits(kw, reason):
    _, _, data = block("float16")
    with pytest.raises(CodecError) as err:
        dec(data, **kw)
    assert err.value.reason == reason


@pytest.mark.parametrize(
    ("header", "n", "reason"),
    [
        (BlockHeader(MODEL, "float32", LAYOUT, (4,), b"", "s", 0), 15, "shape"),
        (BlockHeader(MODEL, "int4", LAYOUT, (4,), b"", "s", 0), 2, "dtype"),
        (BlockHeader(MODEL, "float32", LAYOUT, (4,), b"", "s", -1), 16, "header"),
        (BlockHeader(MODEL, "float32", LAYOUT, (4,), b"h" * 65, "s", 0), 16, "header"),
        (BlockHeader(MODEL, "float32", LAYOUT, (4,), b"", "s" * 1025, 0), 16, "header"),
    ],
)
def test_encode_refuses_what_decode_would_refuse(header, n, reason):
    with pytest.raises(CodecError) as err:
        encode(header, b"\x00" * n)
    assert err.value.reason == reason


def _random_value(rng: random.Random):
    return rng.choice(
        [
            lambda: rng.randint(-(2**63), 2**64 - 1),
            lambda: rng.randint(-3, 300),
            lambda: rng.choice([True, False, None, 1.5]),
            lambda: "".join(rng.choice("ab\u00e9") for _ in range(rng.choice([0, 3, 1025]))),
            lambda: rng.randbytes(rng.choice([0, 16, 64, 65])),
            lambda: [rng.randint(-1, 40) for _ in range(rng.randint(0, 6))],
            lambda: {"k": 1},
            lambda: msgpack.ExtType(rng.randint(0, 127), b"x"),
            lambda: rng.choice(["float16", "bfloat16", "float32", "uint8", "int4", MODEL, LAYOUT]),
        ]
    )()


def _corrupt(rng: random.Random, data: bytes) -> tuple[bytes, dict | None]:
    """One random corruption; the forged header fields too when the header crc was recomputed."""
    kind = rng.randrange(6)
    bad = bytearray(data)
    if kind == 0:
        for _ in range(rng.randint(1, 4)):
            bad[rng.randrange(len(bad))] ^= rng.randint(1, 255)
    elif kind == 1:
        bad = bad[: rng.randrange(len(bad))]
    elif kind == 2:
        bad += rng.randbytes(rng.randint(1, 64))
    elif kind == 3:
        i = rng.randrange(4, 8 + _header_fields(data)[1])
        bad[i : i + 8] = rng.randbytes(8)
    else:
        fields, _ = _header_fields(data)
        key = rng.choice([*fields, "extra"])
        value = _random_value(rng)
        forged = _forge(data, fix_crc=kind == 5, **{key: value})
        return forged, ({**fields, key: value} if kind == 5 else None)
    return bytes(bad), None


def test_random_corruptions_are_rejected_or_harmless():
    rng = random.Random(0)
    h, arr, data = block()
    rejected = 0
    for _ in range(3000):
        bad, forged = _corrupt(rng, data)
        try:
            got, payload = dec(bad)
        except CodecError as err:
            assert err.reason in REASONS
            rejected += 1
            continue
        if forged is None:  # raw corruption: accepted only if it happened to change no byte at all
            assert bad == data
            assert got == h and bytes(payload) == arr.tobytes()
        else:  # a consistent forgery: what decode reports must be exactly what was written, and valid
            assert got.round >= 0 and len(got.block_hash) <= 64 and got.model == MODEL
            assert all(getattr(got, k) == forged[k] for k in ("session", "branch", "round", "block_hash"))
            assert got.shape == tuple(forged["shape"]) == h.shape and got.dtype == "float32"
            assert bytes(payload) == arr.tobytes()
    assert rejected > 2500  # the fuzz really corrupts: nearly everything must be refused


def test_payload_starts_at_a_fixed_page_aligned_offset_with_one_digest_per_piece():
    h, arr, data = block("float32", shape=(4, 2, 3, 16, 4))
    assert len(data) == PAYLOAD_OFFSET + arr.nbytes and data[PAYLOAD_OFFSET:] == arr.tobytes()
    opened = open_block(data, expect_model=MODEL, expect_layout=LAYOUT)
    assert len(opened.digests) == 4 and [len(p) for p in opened.pieces()] == [arr.nbytes // 4] * 4
    assert opened.digests == [xxhash.xxh3_64_intdigest(arr[i].tobytes()) for i in range(4)]


def test_a_damaged_piece_is_found_by_itself_and_by_parallel_hashing():
    h, arr, data = block("float32", shape=(4, 2, 3, 16, 4))
    bad = bytearray(data)
    bad[PAYLOAD_OFFSET + 2 * (arr.nbytes // 4) + 5] ^= 0x40  # a byte of piece 2
    opened = open_block(bytes(bad), expect_model=MODEL, expect_layout=LAYOUT)  # the header is intact
    check_pieces(opened, [0, 1, 3])  # the other pieces verify on their own
    for hasher in (None, Hasher(2)):
        with pytest.raises(CodecError, match="piece 2") as err:
            check_pieces(opened, hasher=hasher)
        assert err.value.reason == "checksum"


def test_parallel_digests_equal_serial_ones_whatever_the_split():
    rng = np.random.default_rng(3)
    pieces = [memoryview(rng.integers(0, 256, n, dtype=np.uint8).tobytes()) for n in (1, 7, 4096, 1 << 20, 3)]
    serial = [xxhash.xxh3_64_intdigest(p) for p in pieces]
    for threads in (1, 2, 3, 8):
        hasher = Hasher(threads)
        assert hasher.digests(pieces) == serial and hasher.submit(pieces).result() == serial
        hasher.close()
