"""Kafka primitive types against byte vectors written by hand from the protocol guide."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.protocol import primitives as p
from shm.errors import ProtocolError


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (0, "00"),
        (1, "01"),
        (127, "7f"),
        (128, "8001"),
        (300, "ac02"),
        (16383, "ff7f"),
        (16384, "808001"),
        (2**31 - 1, "ffffffff07"),
    ],
)
def test_uvarint_vectors(value: int, wire: str) -> None:
    assert p.uvarint(value) == bytes.fromhex(wire)
    r = p.Reader(bytes.fromhex(wire))
    assert r.uvarint() == value
    assert r.remaining() == 0


@pytest.mark.parametrize(
    ("value", "wire"),
    [(0, "00"), (-1, "01"), (1, "02"), (-2, "03"), (63, "7e"), (-64, "7f"), (64, "8001"), (-65, "8101")],
)
def test_zigzag_varint_vectors(value: int, wire: str) -> None:
    assert p.varint(value) == bytes.fromhex(wire)
    assert p.Reader(bytes.fromhex(wire)).varint() == value


def test_fixed_width_integers_are_big_endian_twos_complement() -> None:
    assert p.int8(-1) == b"\xff"
    assert p.int16(-2) == b"\xff\xfe"
    assert p.int32(0x01020304) == b"\x01\x02\x03\x04"
    assert p.int64(-1) == b"\xff" * 8
    r = p.Reader(bytes.fromhex("ff" "fffe" "01020304" "0000000000000105" "01" "00"))
    assert (r.int8(), r.int16(), r.int32(), r.int64(), r.boolean(), r.boolean()) == (-1, -2, 0x01020304, 261, True, False)


def test_strings_compact_and_classic() -> None:
    assert p.compact_string("abc") == bytes.fromhex("04616263")
    assert p.compact_string("") == b"\x01"
    assert p.compact_string(None) == b"\x00"
    assert p.string("abc") == bytes.fromhex("0003616263")
    assert p.string(None) == b"\xff\xff"
    r = p.Reader(bytes.fromhex("04616263" "00" "0003616263" "ffff" "03c3a9"))
    assert r.compact_string() == "abc"
    assert r.compact_string() is None
    assert r.string() == "abc"
    assert r.string() is None
    assert r.compact_string() == "\u00e9"


def test_compact_bytes_and_arrays() -> None:
    assert p.compact_bytes(b"\x01\x02") == bytes.fromhex("030102")
    assert p.compact_bytes(None) == b"\x00"
    assert p.compact_bytes_header(2) == b"\x03"
    assert p.compact_array_len(None) == b"\x00"
    assert p.compact_array_len(0) == b"\x01"
    assert p.compact_array_len(2) == b"\x03"
    r = p.Reader(bytes.fromhex("030102" "00" "03" "00000001" "ffffffff" "00"))
    assert bytes(r.compact_bytes()) == b"\x01\x02"
    assert r.compact_bytes() is None
    assert r.int32_compact_array() == [1, -1]
    assert r.compact_array_len() == -1


def test_tagged_fields_vector() -> None:
    wire = bytes.fromhex("02" "00" "02" "0102" "03" "00")
    assert p.tagged_fields([(0, b"\x01\x02"), (3, b"")]) == wire
    fields = p.Reader(wire).tagged_fields()
    assert {k: bytes(v) for k, v in fields.items()} == {0: b"\x01\x02", 3: b""}
    assert p.tagged_fields() == p.EMPTY_TAGGED_FIELDS == b"\x00"
    with pytest.raises(ValueError):
        p.tagged_fields([(3, b""), (1, b"")])


def test_uuid_reads_sixteen_raw_bytes() -> None:
    raw = bytes(range(16))
    assert p.Reader(raw + b"x").uuid() == raw


@pytest.mark.parametrize(
    "wire",
    ["", "00", "000102", "80", "8080808080808080808001", "05616263", "0003ab", "02c3"],
)
def test_truncated_or_malformed_input_raises_protocol_error(wire: str) -> None:
    r = p.Reader(bytes.fromhex(wire))
    with pytest.raises(ProtocolError):
        r.int32()
        r.uvarint()
        r.compact_string()


def test_hostile_array_length_is_refused_before_looping() -> None:
    with pytest.raises(ProtocolError):
        p.Reader(bytes.fromhex("ffffffff0f") + b"\x00" * 4).compact_array_len()


def test_expect_end_detects_trailing_bytes() -> None:
    r = p.Reader(b"\x00\x01")
    r.int8()
    with pytest.raises(ProtocolError):
        r.expect_end()


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_uvarint_round_trip(v: int) -> None:
    r = p.Reader(p.uvarint(v))
    assert r.uvarint() == v
    assert r.remaining() == 0


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_varint_round_trip(v: int) -> None:
    assert p.Reader(p.varint(v)).varint() == v


@given(st.one_of(st.none(), st.text(max_size=300)))
def test_compact_string_round_trip(s: str | None) -> None:
    assert p.Reader(p.compact_string(s)).compact_string() == s
