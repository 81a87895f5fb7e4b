/* The ring-frame constants of shm/layout.py and shm/frames.py, for the compiled code.
 *
 * shm/layout.py is the source of truth; tests/unit/daemon/test_batcher.py
 * (test_layout_constants_match_shm_layout) checks the values daemon._batcher exports against it.
 * Everything is little-endian; the platform is x86-64 (see shm/layout.py, "Ordering").
 */
#ifndef SLUICE_LAYOUT_H
#define SLUICE_LAYOUT_H

#include <stdint.h>
#include <string.h>

/* Frame header <II: payload_length, frame_type; frames start 8-byte aligned. */
#define SL_FRAME_HEADER_BYTES 8
#define SL_FRAME_ALIGN 8
#define SL_FRAME_PADDING 0
#define SL_FRAME_RECORD 1
#define SL_FRAME_COMPLETION 2
#define SL_FRAME_CHUNK_DONE 3

/* RECORD payload prefix <HHiq: topic_id, flags, partition, timestamp_ms; the body follows. */
#define SL_RECORD_PREFIX_BYTES 16
#define SL_RECORD_FRAME_MIN (SL_FRAME_HEADER_BYTES + SL_RECORD_PREFIX_BYTES) /* 24 */
#define SL_OFF_TOPIC_ID 8
#define SL_OFF_FLAGS 10
#define SL_OFF_PARTITION 12
#define SL_OFF_TIMESTAMP 16

/* COMPLETION payload <HhiqqII (32 bytes) and CHUNK_DONE payload <Q (8 bytes). */
#define SL_COMPLETION_BYTES 32
#define SL_CHUNK_DONE_BYTES 8

/* Ring header (256 bytes): the writer's head and full count, the reader's tail and its
 * sleeping flag, each on its own cache line (shm.layout.RING_OFFSETS). */
#define SL_RING_HEADER_BYTES 256
#define SL_RING_HEAD_OFFSET 64
#define SL_RING_FULL_COUNT_OFFSET 72
#define SL_RING_TAIL_OFFSET 128
#define SL_RING_READER_SLEEPING_OFFSET 192

/* Bytes a frame of payload length `plen` takes: header + payload rounded up to 8
 * (shm.layout.frame_size). 64-bit arithmetic: plen is a u32 read from a peer. */
static inline uint64_t sl_frame_size(uint32_t plen) {
    return ((uint64_t)plen + 15u) & ~(uint64_t)7u;
}

/* Unaligned little-endian loads from a private copy (memcpy: no alignment assumption, and the
 * compiler turns each into one mov on x86-64). */
static inline uint32_t sl_u32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint16_t sl_u16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline int32_t sl_i32(const unsigned char *p) { int32_t v; memcpy(&v, p, 4); return v; }
static inline int64_t sl_i64(const unsigned char *p) { int64_t v; memcpy(&v, p, 8); return v; }

#endif
