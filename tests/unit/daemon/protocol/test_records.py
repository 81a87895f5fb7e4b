"""RecordBatch v2: a hand-written byte vector, header offsets, codecs and their framing, CRC."""

from __future__ import annotations

import struct

import cramjam
import pytest
from crc32c import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.protocol import records as r
from helpers import ref_record_body
from shm.errors import ProtocolError


def test_header_offsets_follow_the_spec() -> None:
    # Byte positions from the Kafka protocol guide's RecordBatch layout.
    assert r.HEADER_SIZE == 61
    assert r.OFFSET_BATCH_LENGTH == 8
    assert r.OFFSET_CRC == 17
    assert r.OFFSET_ATTRIBUTES == 21
    assert r.OFFSET_PRODUCER_ID == 43
    assert r.OFFSET_RECORD_COUNT == 57


def test_varint_known_values() -> None:
    assert r.encode_varint(0) == b"\x00"
    assert r.encode_varint(-1) == b"\x01"
    assert r.encode_varint(1) == b"\x02"
    assert r.encode_varint(63) == b"\x7e"
    assert r.encode_varint(64) == b"\x80\x01"
    assert r.encode_varint(-65) == b"\x81\x01"
    assert r.encode_varint(8191) == b"\xfe\x7f"
    assert r.encode_varint(8192) == b"\x80\x80\x01"
    assert r.encode_varint(-(1 << 63)) == b"\xff" * 9 + b"\x01"  # the whole varlong range


def test_byte_vector_written_from_the_spec() -> None:
    # One record, key b"k", value b"hi", one header ("h", b"x"), timestamp 1000, no compression,
    # written field by field from the protocol guide, not with the encoder.
    record = bytes(
        [
            0x1A,  # length varint: 13 bytes follow -> zig-zag 26
            0x00,  # attributes
            0x00,  # timestampDelta 0
            0x00,  # offsetDelta 0
            0x02, ord("k"),  # keyLength 1, key
            0x04, ord("h"), ord("i"),  # valueLength 2, value
            0x02,  # headerCount 1
            0x02, ord("h"), 0x02, ord("x"),  # header key "h", value b"x"
        ]
    )
    assert record[0] == 2 * (len(record) - 1)
    after_crc = (
        b"\x00\x00"  # attributes: no compression, CreateTime
        + b"\x00\x00\x00\x00"  # lastOffsetDelta 0
        + (1000).to_bytes(8, "big")  # baseTimestamp
        + (1000).to_bytes(8, "big")  # maxTimestamp
        + b"\xff" * 8  # producerId -1
        + b"\xff\xff"  # producerEpoch -1
        + b"\xff\xff\xff\xff"  # baseSequence -1
        + b"\x00\x00\x00\x01"  # recordCount 1
        + record
    )
    expected = (
        b"\x00" * 8  # baseOffset 0
        + (4 + 1 + 4 + len(after_crc)).to_bytes(4, "big")  # batchLength: epoch+magic+crc+rest
        + b"\xff\xff\xff\xff"  # partitionLeaderEpoch -1
        + b"\x02"  # magic
        + crc32c(after_crc).to_bytes(4, "big")
        + after_crc
    )
    body = ref_record_body(b"k", b"hi", [("h", b"x")])
    assert r.build_batch([(1000, body)]) == expected
    (batch,) = r.decode_batches(expected)
    assert batch.records == [r.DecodedRecord(0, 1000, b"k", b"hi", [("h", b"x")])]


records_st = st.lists(
    st.tuples(
        st.integers(min_value=-20_000, max_value=20_000),  # timestamp delta, outside the tables too
        st.one_of(st.none(), st.binary(max_size=40)),
        st.one_of(st.none(), st.binary(max_size=300)),
        st.lists(st.tuples(st.text(max_size=8), st.one_of(st.none(), st.binary(max_size=8))), max_size=3),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(records_st, st.sampled_from(sorted(r.CODECS.values())))
def test_round_trip_every_codec(recs: list, codec: int) -> None:
    base = 1_700_000_000_000
    pairs = [(base + dt, ref_record_body(k, v, h)) for dt, k, v, h in recs]
    data = r.build_batch(pairs, codec=codec)
    (batch,) = r.decode_batches(data)
    assert batch.codec in (codec, r.CODEC_NONE)  # left uncompressed when it would not shrink
    assert batch.base_timestamp == pairs[0][0]
    assert batch.max_timestamp == max(ts for ts, _ in pairs)
    assert batch.last_offset_delta == len(pairs) - 1
    assert (batch.producer_id, batch.producer_epoch, batch.base_sequence) == (-1, -1, -1)
    assert [(x.offset_delta, x.timestamp, x.key, x.value, x.headers) for x in batch.records] == [
        (i, base + dt, k, v, h) for i, (dt, k, v, h) in enumerate(recs)
    ]


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
def test_compressible_batch_is_compressed(codec: str) -> None:
    body = ref_record_body(None, b"the same value again " * 5, [])
    data = r.build_batch([(1000 + i, body) for i in range(500)], codec=r.CODECS[codec])
    (batch,) = r.decode_batches(data)
    assert batch.codec == r.CODECS[codec]
    assert len(data) < 500 * len(body) // 4
    assert len(batch.records) == 500 and batch.records[-1].value == b"the same value again " * 5


def _records_block(data: bytes) -> bytes:
    return data[r.HEADER_SIZE :]


def test_snappy_uses_xerial_framing_readable_block_by_block() -> None:
    # Over 32 KiB of input gives several xerial blocks; each must be a raw snappy block that an
    # independent decoder (cramjam's raw snappy) reads on its own, as snappy-java does.
    body = ref_record_body(b"key", bytes(range(256)) * 4, [])
    pairs = [(5, body)] * 100
    raw, _, _ = r.encode_records(pairs, 5)
    block = _records_block(r.build_batch(pairs, codec=r.CODEC_SNAPPY))
    assert block[:8] == b"\x82SNAPPY\x00"
    assert struct.unpack(">ii", block[8:16]) == (1, 1)
    pos, out, blocks = 16, [], 0
    while pos < len(block):
        (n,) = struct.unpack_from(">i", block, pos)
        out.append(bytes(cramjam.snappy.decompress_raw(block[pos + 4 : pos + 4 + n])))
        pos += 4 + n
        blocks += 1
    assert blocks == -(-len(raw) // (32 * 1024)) and blocks > 1
    assert b"".join(out) == raw


def test_raw_snappy_from_librdkafka_is_accepted() -> None:
    body = ref_record_body(None, b"v" * 200, [])
    plain = r.build_batch([(7, body)] * 10)
    raw, _, _ = r.encode_records([(7, body)] * 10, 7)
    buf = bytearray(plain[: r.HEADER_SIZE]) + bytes(cramjam.snappy.compress_raw(raw))
    struct.pack_into(">ih", buf, r.OFFSET_BATCH_LENGTH, len(buf) - 12, 0)
    struct.pack_into(">h", buf, r.OFFSET_ATTRIBUTES, r.CODEC_SNAPPY)
    struct.pack_into(">I", buf, r.OFFSET_CRC, crc32c(bytes(buf[r.OFFSET_ATTRIBUTES :])))
    (batch,) = r.decode_batches(bytes(buf))
    assert [x.value for x in batch.records] == [b"v" * 200] * 10


def test_lz4_frame_has_independent_blocks_and_no_content_checksum() -> None:
    # Kafka's Lz4BlockInputStream refuses frames whose FLG lacks the block-independence bit.
    body = ref_record_body(None, bytes(range(200)) * 2, [])
    pairs = [(1, body)] * 400  # > 64 KiB: several LZ4 blocks
    raw, _, _ = r.encode_records(pairs, 1)
    block = _records_block(r.build_batch(pairs, codec=r.CODEC_LZ4))
    assert block[:4] == b"\x04\x22\x4d\x18"
    flg = block[4]
    assert flg >> 6 == 1  # version
    assert flg & 0x20  # block independence
    assert not flg & 0x04  # no content checksum
    assert not flg & 0x08  # no content size
    assert bytes(cramjam.lz4.decompress(block)) == raw


@pytest.mark.parametrize(
    "codec,decode",
    [
        (r.CODEC_GZIP, cramjam.gzip.decompress),
        (r.CODEC_ZSTD, cramjam.zstd.decompress),
    ],
)
def test_gzip_and_zstd_blocks_decode_independently(codec: int, decode) -> None:
    pairs = [(1, ref_record_body(b"k", b"value " * 30, [("h", None)]))] * 50
    raw, _, _ = r.encode_records(pairs, 1)
    assert bytes(decode(_records_block(r.build_batch(pairs, codec=codec)))) == raw


def test_crc_mismatch_raises() -> None:
    data = bytearray(r.build_batch([(1, ref_record_body(None, b"abc", []))]))
    data[-1] ^= 0x01
    with pytest.raises(ProtocolError, match="CRC"):
        r.decode_batches(bytes(data))


def test_truncated_and_bad_magic_raise() -> None:
    data = r.build_batch([(1, ref_record_body(None, b"abc", []))])
    with pytest.raises(ProtocolError):
        r.decode_batches(data[:-1])
    bad = bytearray(data)
    bad[16] = 1
    with pytest.raises(ProtocolError, match="magic"):
        r.decode_batches(bytes(bad))


def test_stamp_writes_producer_fields_and_recomputes_crc() -> None:
    data = bytearray(r.build_batch([(1, ref_record_body(b"k", b"v", []))] * 3, codec=r.CODEC_ZSTD))
    before = r.decode_batches(bytes(data))[0]
    r.stamp_batch(data, 0, len(data), 4242, 7, 100)
    after = r.decode_batches(bytes(data))[0]  # would raise on a stale CRC
    assert (after.producer_id, after.producer_epoch, after.base_sequence) == (4242, 7, 100)
    assert after.crc != before.crc
    assert after.records == before.records


def test_several_batches_decode_in_sequence() -> None:
    a = r.build_batch([(1, ref_record_body(None, b"a", []))])
    b = r.build_batch([(2, ref_record_body(None, b"b", []))] * 2, codec=r.CODEC_GZIP)
    out = r.decode_batches(a + b)
    assert [len(x.records) for x in out] == [1, 2]
    assert out[1].records[1].value == b"b"
