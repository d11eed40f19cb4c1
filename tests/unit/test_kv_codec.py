"""The KV block codec: round trips, every rejection reason, and a seeded fuzz of random corruptions."""

import random

import msgpack
import numpy as np
import pytest

from kvstore.codec import MAGIC, BlockHeader, CodecError, decode, encode

MODEL, LAYOUT = "smollm2-135m-instruct", "LBHNC"


def block(dtype="float32", shape=(2, 3, 16, 8), seed=0):
    arr = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    h = BlockHeader(MODEL, dtype, LAYOUT, shape, b"\x01" * 16, "sess", 3, "b1")
    return h, arr, encode(h, arr.tobytes())


@pytest.mark.parametrize("dtype", ["float32", "float16", "uint8"])
def test_round_trip_is_exact_and_zero_copy(dtype):
    h, arr, data = block(dtype)
    got, payload = decode(data, expect_model=MODEL, expect_layout=LAYOUT, expect_dtype=dtype)
    assert got == h
    assert np.array_equal(np.frombuffer(payload, dtype=dtype).reshape(h.shape), arr)
    assert payload.obj is data  # a view into the input, not a copy


def _forge(data: bytes, **changes) -> bytes:
    """Re-pack the header with changed fields, keeping its length prefix honest."""
    hlen = int.from_bytes(data[4:8], "big")
    fields = msgpack.unpackb(data[8 : 8 + hlen], raw=False)
    fields.update(changes)
    raw = msgpack.packb(fields, use_bin_type=True)
    return MAGIC + len(raw).to_bytes(4, "big") + raw + data[8 + hlen :]


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: b"XKV1" + d[4:], "magic"),
        (lambda d: d[:6], "truncated"),
        (lambda d: d[:-1], "truncated"),
        (lambda d: d + b"junk", "truncated"),
        (lambda d: d[:4] + (10**6).to_bytes(4, "big") + d[8:], "oversized"),
        (lambda d: _forge(d, v=2), "version"),  # header crc checked after version
        (lambda d: _forge(d, model="other"), "checksum"),  # forged without fixing the crc
        (lambda d: _forge(d, extra=1), "header"),
        (lambda d: _forge(d, round="3"), "header"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "checksum"),
    ],
)
def test_rejections_name_their_reason(mutate, reason):
    _, _, data = block()
    with pytest.raises(CodecError) as err:
        decode(mutate(data), expect_model=MODEL, expect_layout=LAYOUT)
    assert err.value.reason == reason


def test_wrong_model_layout_dtype_and_limits():
    _, _, data = block("float16")
    for kw, reason in (
        ({"expect_model": "qwen"}, "model"),
        ({"expect_layout": "other"}, "layout"),
        ({"expect_dtype": "float32"}, "dtype"),
        ({"max_payload": 10}, "oversized"),
    ):
        args = {"expect_model": MODEL, "expect_layout": LAYOUT} | kw
        with pytest.raises(CodecError) as err:
            decode(data, **args)
        assert err.value.reason == reason
    with pytest.raises(ValueError, match="does not match"):
        encode(BlockHeader(MODEL, "float32", LAYOUT, (4,), b"", "s", 0), b"\x00" * 15)


def test_random_corruptions_are_rejected_or_harmless():
    rng = random.Random(0)
    h, arr, data = block()
    for _ in range(3000):
        bad = bytearray(data)
        kind = rng.randrange(4)
        if kind == 0:
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(len(bad))
                bad[i] ^= rng.randint(1, 255)
        elif kind == 1:
            bad = bad[: rng.randrange(len(bad))]
        elif kind == 2:
            bad += rng.randbytes(rng.randint(1, 64))
        else:
            i = rng.randrange(8, 8 + 200)
            bad[i : i + 8] = rng.randbytes(8)
        try:
            got, payload = decode(bytes(bad), expect_model=MODEL, expect_layout=LAYOUT)
        except CodecError:
            continue
        # accepted: only if the corruption changed nothing that matters
        assert got == h and bytes(payload) == arr.tobytes()
