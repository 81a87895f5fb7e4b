/* Kafka record-body codec for the compiled code: zig-zag varints and body validation.
 *
 * The C twin of shm.frames.zigzag_varint (the Python send() path still encodes with it) and of
 * tests/frames_oracle.py's record_body_valid (the tests' independent oracle). A record body is
 * the tail of a RecordBatch v2 record:
 *
 *   varint keyLength (-1 null) | key | varint valueLength (-1 null) | value |
 *   varint headerCount | per header: varint keyLength | key | varint valueLength (-1) | value
 *
 * Every read is bounded by the `end` the caller gives; nothing here trusts a length it read.
 */
#ifndef SLUICE_RECORD_H
#define SLUICE_RECORD_H

#include <stddef.h>
#include <stdint.h>

/* Bytes of the zig-zag varint of v (1..10). */
static inline int sl_varint_len(int64_t v) {
    uint64_t z = ((uint64_t)v << 1) ^ (uint64_t)(v >> 63);
    int n = 1;
    while (z >= 0x80u) {
        z >>= 7;
        n++;
    }
    return n;
}

/* Write the zig-zag varint of v at out (room for 10 bytes); returns the bytes written. */
static inline int sl_put_varint(unsigned char *out, int64_t v) {
    uint64_t z = ((uint64_t)v << 1) ^ (uint64_t)(v >> 63);
    int n = 0;
    while (z >= 0x80u) {
        out[n++] = (unsigned char)((z & 0x7Fu) | 0x80u);
        z >>= 7;
    }
    out[n++] = (unsigned char)z;
    return n;
}

/* Read one record-level varint (Kafka's are int32: at most 5 bytes) from p[*pos..end).
 * Returns 0 and advances *pos, or -1 when it is truncated, too long or out of int32 range. */
static inline int sl_read_varint32(const unsigned char *p, size_t *pos, size_t end, int64_t *out) {
    uint64_t acc = 0;
    size_t at = *pos;
    for (int shift = 0; shift < 35; shift += 7) {
        if (at >= end)
            return -1;
        unsigned char b = p[at++];
        acc |= (uint64_t)(b & 0x7Fu) << shift;
        if (b < 0x80u) {
            if (acc > 0xFFFFFFFFu)
                return -1;
            *out = (int64_t)(acc >> 1) ^ -(int64_t)(acc & 1u);
            *pos = at;
            return 0;
        }
    }
    return -1;
}

/* Skip a length-prefixed field at *pos: varint length n (>= min_len, -1 meaning null when
 * min_len is -1) and n bytes. Returns 0, or -1 when malformed or past end. */
static inline int sl_skip_field(const unsigned char *p, size_t *pos, size_t end, int64_t min_len) {
    int64_t n;
    if (sl_read_varint32(p, pos, end, &n) < 0 || n < min_len)
        return -1;
    if (n > 0) {
        if ((uint64_t)n > end - *pos)
            return -1;
        *pos += (size_t)n;
    }
    return 0;
}

/* 1 when p[pos..end) is exactly one well-formed record body, else 0. Kafka would refuse a whole
 * batch for one malformed record, so one client's bad body must never reach a shared batch. */
static inline int sl_body_valid(const unsigned char *p, size_t pos, size_t end) {
    int64_t count;
    if (pos > end)
        return 0;
    if (sl_skip_field(p, &pos, end, -1) < 0) /* key */
        return 0;
    if (sl_skip_field(p, &pos, end, -1) < 0) /* value */
        return 0;
    if (sl_read_varint32(p, &pos, end, &count) < 0 || count < 0)
        return 0;
    /* Each header takes at least 2 bytes: a count beyond that cannot fit, whatever follows. */
    if ((uint64_t)count > (end - pos) / 2u)
        return 0;
    for (int64_t i = 0; i < count; i++) {
        if (sl_skip_field(p, &pos, end, 0) < 0) /* header key: never null */
            return 0;
        if (sl_skip_field(p, &pos, end, -1) < 0) /* header value */
            return 0;
    }
    return pos == end;
}

#endif
