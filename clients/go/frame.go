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
	"github.com/vmihailenco/msgpack/v5/msgpcode"
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
	buf bytes.Buffer
	enc *msgpack.Encoder
}

// NewEncoder returns an Encoder.
func NewEncoder() *Encoder {
	e := &Encoder{}
	e.enc = msgpack.NewEncoder(&e.buf)
	return e
}

// Encode returns the frame of m: the 4-byte big-endian length, then the msgpack body. The
// slice is valid until the next call. A body larger than MaxFrameBytes is a *ProtocolError
// (split the Produce).
func (e *Encoder) Encode(m Message) ([]byte, error) {
	e.buf.Reset()
	e.buf.Write([]byte{0, 0, 0, 0})
	if err := m.encode(e.enc); err != nil {
		return nil, err
	}
	out := e.buf.Bytes()
	size := len(out) - prefixBytes
	if size > MaxFrameBytes {
		return nil, protocolErrorf("%s frame of %d bytes exceeds %d", m.MessageType(), size, MaxFrameBytes)
	}
	binary.BigEndian.PutUint32(out, uint32(size))
	return out, nil
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
	r   *bufio.Reader
	buf []byte
	err error
}

// NewFrameReader returns a FrameReader on r.
func NewFrameReader(r io.Reader) *FrameReader {
	return &FrameReader{r: bufio.NewReaderSize(r, 64*1024)}
}

// Next returns the next message. At a clean end of the stream (between frames) it returns
// io.EOF; a stream that ends inside a frame gives io.ErrUnexpectedEOF; a bad frame gives a
// *ProtocolError, again on every later call.
func (fr *FrameReader) Next() (Message, error) {
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
	m, err := DecodeBody(body)
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
func DecodeBody(body []byte) (Message, error) {
	typ, err := messageType(body)
	if err != nil {
		return nil, err
	}
	decode, ok := messageMakers[typ]
	if !ok {
		return nil, protocolErrorf("unknown message type %q", typ)
	}
	d := newDecoder(body)
	m, err := decode(d)
	if err != nil {
		var pe *ProtocolError
		if errors.As(err, &pe) {
			return nil, err
		}
		return nil, protocolErrorf("%s: %v", typ, err)
	}
	if d.r.Len() != 0 {
		return nil, protocolErrorf("%d bytes after the %s map", d.r.Len(), typ)
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
		if err := d.dec.Skip(); err != nil {
			return "", protocolErrorf("value of %q: %v", k, err)
		}
	}
	return "", protocolErrorf("map has no \"type\"")
}

// decoder reads strictly typed msgpack values from one body.
type decoder struct {
	r       *bytes.Reader
	dec     *msgpack.Decoder
	scratch []byte // the bytes of the latest str read
}

func newDecoder(body []byte) *decoder {
	r := bytes.NewReader(body)
	return &decoder{r: r, dec: msgpack.NewDecoder(r)}
}

func (d *decoder) peek() (byte, error) { return d.dec.PeekCode() }

func (d *decoder) mapLen() (int, error) {
	c, err := d.peek()
	if err != nil {
		return 0, err
	}
	if !msgpcode.IsFixedMap(c) && c != msgpcode.Map16 && c != msgpcode.Map32 {
		return 0, fmt.Errorf("code %#x is not a map", c)
	}
	return d.dec.DecodeMapLen()
}

func (d *decoder) arrayLen() (int, error) {
	c, err := d.peek()
	if err != nil {
		return 0, err
	}
	if !msgpcode.IsFixedArray(c) && c != msgpcode.Array16 && c != msgpcode.Array32 {
		return 0, fmt.Errorf("code %#x is not an array", c)
	}
	return d.dec.DecodeArrayLen()
}

func (d *decoder) isNil() (bool, error) {
	c, err := d.peek()
	if err != nil {
		return false, err
	}
	if c == msgpcode.Nil {
		return true, d.dec.DecodeNil()
	}
	return false, nil
}

// rawStr reads a str into d.scratch (valid until the next read) and checks it is UTF-8.
func (d *decoder) rawStr() ([]byte, error) {
	b, err := d.rawStrBytes()
	if err == nil && !utf8.Valid(b) {
		err = errors.New("str is not UTF-8")
	}
	return b, err
}

// rawStrBytes is rawStr without the UTF-8 check (for keys, which are checked when they are
// not one of the protocol's ASCII names).
func (d *decoder) rawStrBytes() ([]byte, error) {
	c, err := d.peek()
	if err != nil {
		return nil, err
	}
	if !msgpcode.IsString(c) {
		return nil, fmt.Errorf("code %#x is not a str", c)
	}
	n, err := d.dec.DecodeBytesLen()
	if err != nil {
		return nil, err
	}
	if n > d.r.Len() {
		return nil, io.ErrUnexpectedEOF // before allocating what a bad length claims
	}
	if cap(d.scratch) < n {
		d.scratch = make([]byte, n)
	}
	b := d.scratch[:n]
	if err := d.dec.ReadFull(b); err != nil {
		return nil, err
	}
	return b, nil
}

func (d *decoder) str() (string, error) {
	b, err := d.rawStr()
	if err != nil {
		return "", err
	}
	if string(b) == "NONE" { // every successful result's error_name: no allocation for it
		return "NONE", nil
	}
	return string(b), nil
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

// binOrNil returns nil for msgpack nil and a non-nil slice (empty for bin of length 0) for bin.
func (d *decoder) binOrNil() ([]byte, error) {
	if null, err := d.isNil(); null || err != nil {
		return nil, err
	}
	c, err := d.peek()
	if err != nil {
		return nil, err
	}
	if !msgpcode.IsBin(c) {
		return nil, fmt.Errorf("code %#x is not bin (bytes must be msgpack bin, not str)", c)
	}
	b, err := d.dec.DecodeBytes()
	if b == nil && err == nil {
		b = []byte{}
	}
	return b, err
}

func isInt(c byte) bool {
	return msgpcode.IsFixedNum(c) || (c >= msgpcode.Uint8 && c <= msgpcode.Int64)
}

// int reads any msgpack integer that fits int64.
func (d *decoder) int() (int64, error) {
	c, err := d.peek()
	if err != nil {
		return 0, err
	}
	if !isInt(c) {
		return 0, fmt.Errorf("code %#x is not an integer", c)
	}
	if c == msgpcode.Uint64 {
		u, err := d.dec.DecodeUint64()
		if err != nil {
			return 0, err
		}
		if u > math.MaxInt64 {
			return 0, fmt.Errorf("integer %d out of range", u)
		}
		return int64(u), nil
	}
	return d.dec.DecodeInt64()
}

// uint reads a msgpack integer >= 0 (a uint64 may use all 64 bits).
func (d *decoder) uint() (uint64, error) {
	c, err := d.peek()
	if err != nil {
		return 0, err
	}
	if c == msgpcode.Uint64 {
		return d.dec.DecodeUint64()
	}
	n, err := d.int()
	if err != nil {
		return 0, err
	}
	if n < 0 {
		return 0, fmt.Errorf("integer %d is negative where a uint is required", n)
	}
	return uint64(n), nil
}

func (d *decoder) uintMax(limit uint64) (uint64, error) {
	n, err := d.uint()
	if err == nil && n > limit {
		err = fmt.Errorf("integer %d is above %d", n, limit)
	}
	return n, err
}

func (d *decoder) boolean() (bool, error) {
	c, err := d.peek()
	if err != nil {
		return false, err
	}
	if c != msgpcode.True && c != msgpcode.False {
		return false, fmt.Errorf("code %#x is not a bool", c)
	}
	return d.dec.DecodeBool()
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
			if err := d.dec.Skip(); err != nil {
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
func (d *decoder) skip() (int, error) { return -1, d.dec.Skip() }

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

// decodeStats reads a StatsReply: its "stats" is any map, read with the library's generic
// decoding (nested maps with string keys, numbers, strings, lists).
func decodeStats(d *decoder) (Message, error) {
	m := &StatsReply{}
	return m, d.fields([]string{"stats"}, func(k string) (int, error) {
		if k != "stats" {
			return d.skip()
		}
		c, err := d.peek()
		if err != nil {
			return 0, err
		}
		if !msgpcode.IsFixedMap(c) && c != msgpcode.Map16 && c != msgpcode.Map32 {
			return 0, fmt.Errorf("code %#x is not a map", c)
		}
		v, err := d.dec.DecodeMap()
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

var resultFields = []string{"partition", "offset", "timestamp", "error_code", "error_name"}

// results reads the "results" array of a ProduceAck.
func (d *decoder) results() ([]RecordResult, error) {
	n, err := d.arrayLen()
	if err != nil {
		return nil, err
	}
	res := make([]RecordResult, n)
	for i := range res {
		r := &res[i]
		err := d.fields(resultFields, func(k string) (int, error) {
			switch k {
			case "partition":
				v, err := d.int()
				if err == nil && (v < math.MinInt32 || v > math.MaxInt32) {
					err = fmt.Errorf("partition %d out of the int32 range", v)
				}
				r.Partition = int32(v)
				return 0, err
			case "offset":
				v, err := d.int()
				r.Offset = v
				return 1, err
			case "timestamp":
				v, err := d.int()
				r.Timestamp = v
				return 2, err
			case "error_code":
				v, err := d.int()
				r.ErrorCode = v
				return 3, err
			case "error_name":
				return d.setStr(&r.ErrorName, 4)
			}
			return d.skip()
		})
		if err != nil {
			return nil, fmt.Errorf("result %d: %w", i, err)
		}
	}
	return res, nil
}
