package sluice

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"time"
	"unicode/utf8"

	"github.com/vmihailenco/msgpack/v5"
)

// Framing (docs/PROTOCOL.md, "Framing"):
//
//	+-------------------------+-----------------------------------------+
//	| length: uint32, big-end | body: one msgpack map, `length` bytes   |
//	+-------------------------+-----------------------------------------+
//
// length counts the body only and is 1..MaxFrameBytes. The decoder is strict where the
// specification is: the body must be exactly one map with string keys, its "type" must be
// known, every required field present with its type (bin for bytes, str for strings, integers
// in range), and no bytes may follow the map. Keys it does not know are skipped, whatever
// their value. A stream cannot be resynchronised after a bad frame, so a FrameReader that
// returned a ProtocolError returns it again on every later call.

// prefixBytes is the size of a frame's length prefix.
const prefixBytes = 4

// ProtocolError is a frame that breaks the protocol: a bad length, a body that is not one
// valid message, or a message that is too large to send.
type ProtocolError struct {
	Reason string
}

func (e *ProtocolError) Error() string { return "sluice: protocol error: " + e.Reason }

func protocolErrorf(format string, args ...any) *ProtocolError {
	return &ProtocolError{Reason: fmt.Sprintf(format, args...)}
}

// Encoder turns messages into frames, reusing one buffer. It is not safe for concurrent use.
type Encoder struct {
	buf []byte
}

// NewEncoder returns an Encoder.
func NewEncoder() *Encoder { return &Encoder{} }

// Encode returns the frame of m: the 4-byte big-endian length, then the msgpack body. The
// slice is valid until the next call. A body larger than MaxFrameBytes is a *ProtocolError
// (split the Produce).
func (e *Encoder) Encode(m Message) ([]byte, error) {
	out, err := m.encode(append(e.buf[:0], 0, 0, 0, 0))
	if err != nil {
		return nil, err
	}
	e.buf = out
	if err := putPrefix(out, m.MessageType()); err != nil {
		return nil, err
	}
	return out, nil
}

// putPrefix writes the length prefix of the frame in out (its first 4 bytes, then the body),
// or refuses a body larger than MaxFrameBytes.
func putPrefix(out []byte, what string) error {
	size := len(out) - prefixBytes
	if size > MaxFrameBytes {
		return protocolErrorf("%s frame of %d bytes exceeds %d", what, size, MaxFrameBytes)
	}
	binary.BigEndian.PutUint32(out, uint32(size))
	return nil
}

// appendFrameAround appends the parts of a Produce frame around its n records, which are
// encoded (appendRecord) in recsLen bytes elsewhere: the length prefix and the fields before
// the records, then the fields after them, which start at h. The Producer writes the three
// parts with one gathered write. A frame over the limits is a *ProtocolError (b unchanged).
func appendFrameAround(b []byte, topic string, n, recsLen int, ack bool, seq uint64) (out []byte, h int, err error) {
	start := len(b)
	out = appendProduceHead(append(b, 0, 0, 0, 0), topic, n, ack, seq)
	h = len(out)
	out = appendProduceTail(out, ack, seq)
	size := len(out) - start - prefixBytes + recsLen
	if n > MaxProduceRecords || size > MaxFrameBytes {
		return b, 0, protocolErrorf("Produce frame of %d records and %d bytes is over the limits (%d, %d)",
			n, size, MaxProduceRecords, MaxFrameBytes)
	}
	binary.BigEndian.PutUint32(out[start:], uint32(size))
	return out, h, nil
}

// EncodeFrame returns the frame of m in a new slice (see [Encoder.Encode]).
func EncodeFrame(m Message) ([]byte, error) {
	out, err := NewEncoder().Encode(m)
	if err != nil {
		return nil, err
	}
	return bytes.Clone(out), nil
}

// FrameReader reads messages from a byte stream, whatever its chunking.
type FrameReader struct {
	r       *bufio.Reader
	buf     []byte
	results []RecordResult // reused by next(true)
	err     error
}

// NewFrameReader returns a FrameReader on r.
func NewFrameReader(r io.Reader) *FrameReader {
	return &FrameReader{r: bufio.NewReaderSize(r, 64*1024)}
}

// Next returns the next message. At a clean end of the stream (between frames) it returns
// io.EOF; a stream that ends inside a frame gives io.ErrUnexpectedEOF; a bad frame gives a
// *ProtocolError, again on every later call.
func (fr *FrameReader) Next() (Message, error) { return fr.next(false) }

// next is Next; with reuse, a ProduceAck's Results are valid only until the next call (the
// Producer's reading goroutine settles them before it reads on).
func (fr *FrameReader) next(reuse bool) (Message, error) {
	if fr.err != nil {
		return nil, fr.err
	}
	var prefix [prefixBytes]byte
	if _, err := io.ReadFull(fr.r, prefix[:]); err != nil {
		return nil, err
	}
	size := binary.BigEndian.Uint32(prefix[:])
	if size == 0 || size > MaxFrameBytes {
		// Refused before the body arrives: a bad length must not make us buffer it.
		fr.err = protocolErrorf("frame length %d is outside 1..%d", size, MaxFrameBytes)
		return nil, fr.err
	}
	if cap(fr.buf) < int(size) {
		fr.buf = make([]byte, size)
	}
	body := fr.buf[:size]
	if _, err := io.ReadFull(fr.r, body); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	var results *[]RecordResult
	if reuse {
		results = &fr.results
	}
	m, err := decodeBody(body, results)
	if err != nil {
		fr.err = err
		return nil, err
	}
	return m, nil
}

// DecodeFrame decodes one whole frame (prefix and body, nothing after).
func DecodeFrame(frame []byte) (Message, error) {
	if len(frame) < prefixBytes {
		return nil, protocolErrorf("frame of %d bytes has no length prefix", len(frame))
	}
	size := binary.BigEndian.Uint32(frame)
	if size == 0 || size > MaxFrameBytes {
		return nil, protocolErrorf("frame length %d is outside 1..%d", size, MaxFrameBytes)
	}
	if int(size) != len(frame)-prefixBytes {
		return nil, protocolErrorf("frame length %d but %d body bytes", size, len(frame)-prefixBytes)
	}
	return DecodeBody(frame[prefixBytes:])
}

// DecodeBody decodes one frame body (the msgpack map) into its message, of either direction.
// The returned message does not refer to body.
func DecodeBody(body []byte) (Message, error) { return decodeBody(body, nil) }

// decodeBody is DecodeBody; with reuse, a ProduceAck's Results are decoded into *reuse
// (grown when too small), valid until the next call with it.
func decodeBody(body []byte, reuse *[]RecordResult) (Message, error) {
	typ, err := messageType(body)
	if err != nil {
		return nil, err
	}
	decode, ok := messageMakers[typ]
	if !ok {
		return nil, protocolErrorf("unknown message type %q", typ)
	}
	d := &decoder{b: body, reuse: reuse}
	m, err := decode(d)
	if err != nil {
		var pe *ProtocolError
		if errors.As(err, &pe) {
			return nil, err
		}
		return nil, protocolErrorf("%s: %v", typ, err)
	}
	if d.left() != 0 {
		return nil, protocolErrorf("%d bytes after the %s map", d.left(), typ)
	}
	return m, nil
}

// messageType finds the "type" entry of the map in body, wherever it is.
func messageType(body []byte) (string, error) {
	d := newDecoder(body)
	n, err := d.mapLen()
	if err != nil {
		return "", protocolErrorf("body is not a map: %v", err)
	}
	for i := 0; i < n; i++ {
		k, err := d.key()
		if err != nil {
			return "", protocolErrorf("map key: %v", err)
		}
		if k == "type" {
			// Found: the rest of the map is the message's decoder's to read (and check).
			// Encoders put "type" first, so this usually skips nothing.
			typ, err := d.str()
			if err != nil {
				return "", protocolErrorf("type: %v", err)
			}
			return typ, nil
		}
		if err := d.skipValue(); err != nil {
			return "", protocolErrorf("value of %q: %v", k, err)
		}
	}
	return "", protocolErrorf("map has no \"type\"")
}

// key reads a map key: the protocol's field names come back as constants (a switch on the
// bytes allocates nothing), so decoding a message allocates nothing for its keys.
func (d *decoder) key() (string, error) {
	b, err := d.rawStrBytes()
	if err != nil {
		return "", err
	}
	switch string(b) {
	case "type":
		return "type", nil
	case "version":
		return "version", nil
	case "client_name":
		return "client_name", nil
	case "pid":
		return "pid", nil
	case "workers_expected":
		return "workers_expected", nil
	case "wants_segment":
		return "wants_segment", nil
	case "token":
		return "token", nil
	case "segment_bytes":
		return "segment_bytes", nil
	case "workers":
		return "workers", nil
	case "fd_count":
		return "fd_count", nil
	case "topic":
		return "topic", nil
	case "records":
		return "records", nil
	case "ack":
		return "ack", nil
	case "seq":
		return "seq", nil
	case "key":
		return "key", nil
	case "value":
		return "value", nil
	case "headers":
		return "headers", nil
	case "partition":
		return "partition", nil
	case "timestamp":
		return "timestamp", nil
	case "timeout_ms":
		return "timeout_ms", nil
	case "request_ring_bytes":
		return "request_ring_bytes", nil
	case "completion_ring_bytes":
		return "completion_ring_bytes", nil
	case "client_id":
		return "client_id", nil
	case "topic_id":
		return "topic_id", nil
	case "partitions":
		return "partitions", nil
	case "profile":
		return "profile", nil
	case "max_request_size":
		return "max_request_size", nil
	case "on_full":
		return "on_full", nil
	case "max_block_ms":
		return "max_block_ms", nil
	case "batch_size":
		return "batch_size", nil
	case "linger_ms":
		return "linger_ms", nil
	case "results":
		return "results", nil
	case "offset":
		return "offset", nil
	case "error_code":
		return "error_code", nil
	case "error_name":
		return "error_name", nil
	case "complete":
		return "complete", nil
	case "pending":
		return "pending", nil
	case "failed":
		return "failed", nil
	case "stats":
		return "stats", nil
	case "code":
		return "code", nil
	case "name":
		return "name", nil
	case "message":
		return "message", nil
	case "fatal":
		return "fatal", nil
	}
	if !utf8.Valid(b) {
		return "", errors.New("str is not UTF-8")
	}
	return string(b), nil
}

// fields reads a map, hands each key but "type" to field (which decodes its value and
// returns the field's index in required, or -1 after skipping an unknown key), and checks
// that every name in required was present.
func (d *decoder) fields(required []string, field func(k string) (int, error)) error {
	n, err := d.mapLen()
	if err != nil {
		return err
	}
	var seen uint64
	for i := 0; i < n; i++ {
		k, err := d.key()
		if err != nil {
			return fmt.Errorf("map key: %w", err)
		}
		if k == "type" {
			if err := d.skipValue(); err != nil {
				return err
			}
			continue
		}
		idx, err := field(k)
		if err != nil {
			return fmt.Errorf("field %q: %w", k, err)
		}
		if idx >= 0 {
			seen |= 1 << idx
		}
	}
	for i, name := range required {
		if seen&(1<<i) == 0 {
			return fmt.Errorf("required field %q is missing", name)
		}
	}
	return nil
}

// skip skips an unknown key's value.
func (d *decoder) skip() (int, error) { return -1, d.skipValue() }

// setUint decodes a uint into *dst and returns idx.
func (d *decoder) setUint(dst *uint64, idx int) (int, error) {
	v, err := d.uint()
	*dst = v
	return idx, err
}

func (d *decoder) setStr(dst *string, idx int) (int, error) {
	v, err := d.str()
	*dst = v
	return idx, err
}

func (d *decoder) setBool(dst *bool, idx int) (int, error) {
	v, err := d.boolean()
	*dst = v
	return idx, err
}

// Field indexes below are positions in each message's list of required fields; optional
// fields (requests' fields with defaults) return a position past that list.
const optional = 63

var messageMakers = map[string]func(*decoder) (Message, error){
	"Hello": func(d *decoder) (Message, error) {
		m := &Hello{}
		return m, d.fields([]string{"version"}, func(k string) (int, error) {
			switch k {
			case "version":
				return d.setUint(&m.Version, 0)
			case "client_name":
				return d.setStr(&m.ClientName, optional)
			case "pid":
				return d.setUint(&m.PID, optional)
			case "workers_expected":
				if null, err := d.isNil(); null || err != nil {
					return optional, err
				}
				var w uint64
				_, err := d.setUint(&w, optional)
				m.WorkersExpected = &w
				return optional, err
			case "wants_segment":
				return d.setBool(&m.WantsSegment, optional)
			case "token":
				return d.setUint(&m.Token, optional)
			}
			return d.skip()
		})
	},
	"SegmentOffer": func(d *decoder) (Message, error) {
		m := &SegmentOffer{}
		return m, d.fields([]string{"segment_bytes", "workers", "fd_count"}, func(k string) (int, error) {
			switch k {
			case "segment_bytes":
				return d.setUint(&m.SegmentBytes, 0)
			case "workers":
				return d.setUint(&m.Workers, 1)
			case "fd_count":
				return d.setUint(&m.FDCount, 2)
			}
			return d.skip()
		})
	},
	"TopicLookup": func(d *decoder) (Message, error) {
		m := &TopicLookup{}
		return m, d.fields([]string{"topic"}, func(k string) (int, error) {
			if k == "topic" {
				return d.setStr(&m.Topic, 0)
			}
			return d.skip()
		})
	},
	"Produce": func(d *decoder) (Message, error) {
		m := &Produce{}
		return m, d.fields([]string{"topic", "records"}, func(k string) (int, error) {
			switch k {
			case "topic":
				return d.setStr(&m.Topic, 0)
			case "records":
				recs, err := d.records(MaxProduceRecords)
				m.Records = recs
				return 1, err
			case "ack":
				return d.setBool(&m.Ack, optional)
			case "seq":
				return d.setUint(&m.Seq, optional)
			}
			return d.skip()
		})
	},
	"Flush": func(d *decoder) (Message, error) {
		m := &Flush{}
		return m, d.fields([]string{"timeout_ms"}, func(k string) (int, error) {
			if k == "timeout_ms" {
				return d.setUint(&m.TimeoutMS, 0)
			}
			return d.skip()
		})
	},
	"StatsRequest": func(d *decoder) (Message, error) {
		return &StatsRequest{}, d.fields(nil, func(string) (int, error) { return d.skip() })
	},
	"Goodbye": func(d *decoder) (Message, error) {
		return &Goodbye{}, d.fields(nil, func(string) (int, error) { return d.skip() })
	},
	"Welcome": func(d *decoder) (Message, error) {
		m := &Welcome{}
		return m, d.fields([]string{"version", "workers", "request_ring_bytes", "completion_ring_bytes", "client_id"},
			func(k string) (int, error) {
				switch k {
				case "version":
					return d.setUint(&m.Version, 0)
				case "workers":
					return d.setUint(&m.Workers, 1)
				case "request_ring_bytes":
					return d.setUint(&m.RequestRingBytes, 2)
				case "completion_ring_bytes":
					return d.setUint(&m.CompletionRingBytes, 3)
				case "client_id":
					return d.setUint(&m.ClientID, 4)
				}
				return d.skip()
			})
	},
	"SegmentAccepted": func(d *decoder) (Message, error) {
		m := &SegmentAccepted{}
		return m, d.fields([]string{"client_id"}, func(k string) (int, error) {
			if k == "client_id" {
				return d.setUint(&m.ClientID, 0)
			}
			return d.skip()
		})
	},
	"TopicInfo": func(d *decoder) (Message, error) {
		m := &TopicInfo{}
		return m, d.fields([]string{"topic", "topic_id", "partitions", "profile", "max_request_size", "on_full",
			"max_block_ms", "batch_size", "linger_ms"}, func(k string) (int, error) {
			switch k {
			case "topic":
				return d.setStr(&m.Topic, 0)
			case "topic_id":
				v, err := d.uintMax(0xFFFF)
				m.TopicID = v
				return 1, err
			case "partitions":
				return d.setUint(&m.Partitions, 2)
			case "profile":
				return d.setStr(&m.Profile, 3)
			case "max_request_size":
				return d.setUint(&m.MaxRequestSize, 4)
			case "on_full":
				return d.setStr(&m.OnFull, 5)
			case "max_block_ms":
				return d.setUint(&m.MaxBlockMS, 6)
			case "batch_size":
				return d.setUint(&m.BatchSize, 7)
			case "linger_ms":
				return d.setUint(&m.LingerMS, 8)
			}
			return d.skip()
		})
	},
	"ProduceAck": func(d *decoder) (Message, error) {
		m := &ProduceAck{}
		return m, d.fields([]string{"seq", "results"}, func(k string) (int, error) {
			switch k {
			case "seq":
				return d.setUint(&m.Seq, 0)
			case "results":
				res, err := d.results()
				m.Results = res
				return 1, err
			}
			return d.skip()
		})
	},
	"FlushDone": func(d *decoder) (Message, error) {
		m := &FlushDone{}
		return m, d.fields([]string{"complete", "pending"}, func(k string) (int, error) {
			switch k {
			case "complete":
				return d.setBool(&m.Complete, 0)
			case "pending":
				return d.setUint(&m.Pending, 1)
			case "failed": // optional: older daemons leave it out
				return d.setUint(&m.Failed, optional)
			}
			return d.skip()
		})
	},
	"StatsReply": decodeStats,
	"ErrorReply": func(d *decoder) (Message, error) {
		m := &ErrorReply{}
		return m, d.fields([]string{"code", "name", "message", "fatal"}, func(k string) (int, error) {
			switch k {
			case "code":
				v, err := d.int()
				m.Code = v
				return 0, err
			case "name":
				return d.setStr(&m.Name, 1)
			case "message":
				return d.setStr(&m.Message, 2)
			case "fatal":
				return d.setBool(&m.Fatal, 3)
			}
			return d.skip()
		})
	},
}

// decodeStats reads a StatsReply: its "stats" is any map, read with the msgpack library's
// generic decoding (nested maps with string keys, numbers, strings, lists) from the bytes
// after the key; the decoder then moves past what the library read.
func decodeStats(d *decoder) (Message, error) {
	m := &StatsReply{}
	return m, d.fields([]string{"stats"}, func(k string) (int, error) {
		if k != "stats" {
			return d.skip()
		}
		start := d.off
		if _, err := d.mapLen(); err != nil {
			return 0, err
		}
		rest := bytes.NewReader(d.b[start:])
		v, err := msgpack.NewDecoder(rest).DecodeMap()
		d.off = len(d.b) - rest.Len()
		m.Stats = v
		return 0, err
	})
}

// records reads the "records" array of a Produce, at most limit of them.
func (d *decoder) records(limit int) ([]Record, error) {
	n, err := d.arrayLen()
	if err != nil {
		return nil, err
	}
	if n > limit {
		return nil, fmt.Errorf("%d records; at most %d", n, limit)
	}
	recs := make([]Record, n)
	for i := range recs {
		r := &recs[i]
		err := d.fields(nil, func(k string) (int, error) {
			var err error
			switch k {
			case "key":
				r.Key, err = d.binOrNil()
			case "value":
				r.Value, err = d.binOrNil()
			case "headers":
				r.Headers, err = d.headers()
			case "partition":
				if null, err := d.isNil(); null || err != nil {
					return optional, err
				}
				p, err := d.uintMax(math.MaxInt32)
				r.Partition = PartitionOf(int32(p))
				return optional, err
			case "timestamp":
				if null, err := d.isNil(); null || err != nil {
					return optional, err
				}
				ms, err := d.int()
				if err == nil && ms < 0 {
					err = fmt.Errorf("timestamp %d is negative", ms)
				}
				r.Timestamp = time.UnixMilli(ms)
				return optional, err
			default:
				return d.skip()
			}
			return optional, err
		})
		if err != nil {
			return nil, fmt.Errorf("record %d: %w", i, err)
		}
	}
	return recs, nil
}

func (d *decoder) headers() ([]Header, error) {
	if null, err := d.isNil(); null || err != nil {
		return nil, err
	}
	n, err := d.arrayLen()
	if err != nil {
		return nil, err
	}
	hs := make([]Header, n)
	for i := range hs {
		pair, err := d.arrayLen()
		if err != nil {
			return nil, err
		}
		if pair != 2 {
			return nil, fmt.Errorf("header %d has %d entries, not 2", i, pair)
		}
		if hs[i].Key, err = d.str(); err != nil {
			return nil, err
		}
		if hs[i].Value, err = d.binOrNil(); err != nil {
			return nil, err
		}
	}
	return hs, nil
}

// resultFields are a RecordResult's fields, all required; bit i of resultDecoder's seen mask
// is resultFields[i].
var resultFields = [...]string{"partition", "offset", "timestamp", "error_code", "error_name"}

const allResultFields = 1<<len(resultFields) - 1

// results reads the "results" array of a ProduceAck, into d.reuse when the caller reuses
// one. Each result is decoded by name without a closure: this runs once per record.
func (d *decoder) results() ([]RecordResult, error) {
	n, err := d.arrayLen()
	if err != nil {
		return nil, err
	}
	var res []RecordResult
	if d.reuse != nil && cap(*d.reuse) >= n {
		res = (*d.reuse)[:n]
	} else {
		res = make([]RecordResult, n)
		if d.reuse != nil {
			*d.reuse = res
		}
	}
	for i := range res {
		if err := d.result(&res[i]); err != nil {
			return nil, fmt.Errorf("result %d: %w", i, err)
		}
	}
	return res, nil
}

func (d *decoder) result(r *RecordResult) error {
	n, err := d.mapLen()
	if err != nil {
		return err
	}
	var seen int
	for i := 0; i < n; i++ {
		k, err := d.rawStrBytes()
		if err != nil {
			return fmt.Errorf("map key: %w", err)
		}
		var v int64
		switch string(k) {
		case "partition":
			if v, err = d.int(); err == nil && (v < math.MinInt32 || v > math.MaxInt32) {
				err = fmt.Errorf("partition %d out of the int32 range", v)
			}
			r.Partition, seen = int32(v), seen|1<<0
		case "offset":
			r.Offset, err = d.int()
			seen |= 1 << 1
		case "timestamp":
			r.Timestamp, err = d.int()
			seen |= 1 << 2
		case "error_code":
			r.ErrorCode, err = d.int()
			seen |= 1 << 3
		case "error_name":
			r.ErrorName, err = d.str()
			seen |= 1 << 4
		default:
			if !utf8.Valid(k) {
				return errors.New("map key: str is not UTF-8")
			}
			err = d.skipValue()
		}
		if err != nil {
			return fmt.Errorf("field %q: %w", k, err)
		}
	}
	if seen != allResultFields {
		for i, name := range resultFields {
			if seen&(1<<i) == 0 {
				return fmt.Errorf("required field %q is missing", name)
			}
		}
	}
	return nil
}
