package sluice

import (
	"fmt"
	"time"

	"github.com/vmihailenco/msgpack/v5"
)

// The messages of the Sluice socket protocol, version 1 (docs/PROTOCOL.md), and their msgpack
// encoding. Each message is a msgpack map whose "type" entry names it; the encoder writes
// "type" first and then the fields in the specification's order, leaving out every request
// field equal to its default (as the reference encoder, shm/control.py, does), so the bytes
// are the reference encoder's bytes. Integers take their shortest msgpack form, binary data
// is always msgpack bin (never str), and a nil []byte is msgpack nil.

// ProtocolVersion is the highest protocol version this package speaks (sent in Hello).
const ProtocolVersion = 1

// MaxFrameBytes is the largest msgpack body one frame may carry (the 4-byte prefix not
// counted).
const MaxFrameBytes = 16 * 1024 * 1024

// MaxProduceRecords is the most records one Produce may carry.
const MaxProduceRecords = 65_536

// batchOverhead is what the daemon sets aside from a topic's max_request_size for the batch
// header and the record's prefix: a record body above max_request_size - batchOverhead is
// refused with MESSAGE_TOO_LARGE (docs/PROTOCOL.md, "Record size").
const batchOverhead = 90

// Message is any message of the protocol. The concrete types are the structs of this file,
// always used as pointers (*Hello, *ProduceAck, ...).
type Message interface {
	// MessageType is the value of the message's "type" entry on the wire.
	MessageType() string
	encode(e *msgpack.Encoder) error
}

// Header is one record header. A nil Value is a null header value (Kafka keeps null and
// empty apart).
type Header struct {
	Key   string
	Value []byte
}

// Record is one record to produce (a "Rec" on the wire). Every field is optional.
//
// Key and Value nil mean "no key" and "tombstone"; an empty non-nil slice is an empty key or
// value. Partition nil lets the daemon choose (murmur2 of the key as Kafka does, sticky when
// keyless); use [PartitionOf] to pin one. A zero Timestamp lets the daemon stamp the time it
// receives the record; otherwise it is sent as CreateTime in milliseconds since the epoch and
// must not be before the epoch.
//
// The producer keeps a reference to Key, Value and the header values until the record's
// frame is written: do not modify them after [Producer.Send].
type Record struct {
	Key       []byte
	Value     []byte
	Headers   []Header
	Partition *int32
	Timestamp time.Time
}

// PartitionOf returns a pointer to p, for [Record.Partition].
func PartitionOf(p int32) *int32 { return &p }

// RecordResult is the outcome of one record of an acknowledged Produce.
type RecordResult struct {
	// Partition written (or chosen, when it failed; -1 if none was).
	Partition int32
	// Offset of the record; -1 on failure and for acks=0 profiles.
	Offset int64
	// Timestamp is the log-append time in ms, or -1 when the topic uses CreateTime.
	Timestamp int64
	// ErrorCode is 0 on success, else a Kafka code (below 1000) or a Sluice code.
	ErrorCode int64
	// ErrorName is "NONE" on success, else the code's name.
	ErrorName string
}

// --- client to daemon --------------------------------------------------------------------------

// Hello opens every conversation.
type Hello struct {
	Version         uint64  // highest protocol version the client speaks
	ClientName      string  // free text for the daemon's logs and stats
	PID             uint64  // the client's process id, for logs and stats
	WorkersExpected *uint64 // informational; Welcome.Workers is what counts
	WantsSegment    bool    // shared-memory clients only
	Token           uint64  // shared-memory clients only (0 = none)
}

// SegmentOffer is a shared-memory client's segment (this package never sends it; it is here
// so the codec covers the whole protocol).
type SegmentOffer struct {
	SegmentBytes uint64
	Workers      uint64
	FDCount      uint64
}

// TopicLookup asks for a topic's partition count and delivery profile.
type TopicLookup struct {
	Topic string
}

// Produce carries records for one topic. With Ack the daemon answers with a ProduceAck
// carrying Seq once every record is complete; without it, never.
type Produce struct {
	Topic   string
	Records []Record
	Ack     bool
	Seq     uint64
}

// Flush asks for a FlushDone once every record sent before it is complete, or after
// TimeoutMS milliseconds.
type Flush struct {
	TimeoutMS uint64
}

// StatsRequest asks for the daemon's counters.
type StatsRequest struct{}

// Goodbye says the client sends nothing more; the daemon sends the pending ProduceAcks and
// closes the connection.
type Goodbye struct{}

// --- daemon to client --------------------------------------------------------------------------

// Welcome answers Hello.
type Welcome struct {
	Version             uint64 // the protocol version of this conversation
	Workers             uint64
	RequestRingBytes    uint64
	CompletionRingBytes uint64
	ClientID            uint64
}

// SegmentAccepted answers a SegmentOffer.
type SegmentAccepted struct {
	ClientID uint64
}

// TopicInfo answers TopicLookup.
type TopicInfo struct {
	Topic          string
	TopicID        uint64
	Partitions     uint64
	Profile        string // the delivery profile the daemon's topic rules chose
	MaxRequestSize uint64 // a larger record fails with MESSAGE_TOO_LARGE
	OnFull         string // "block" or "drop"
	MaxBlockMS     uint64
	BatchSize      uint64
	LingerMS       uint64
}

// ProduceAck is the outcome of an acknowledged Produce: one result per record, in order.
type ProduceAck struct {
	Seq     uint64
	Results []RecordResult
}

// FlushDone answers Flush. Complete is false when the timeout came first. Failed counts the
// connection's records that completed with an error since the previous FlushDone; it came
// after the first release of version 1, so an older daemon's reply decodes with Failed 0.
type FlushDone struct {
	Complete bool
	Pending  uint64
	Failed   uint64
}

// StatsReply carries the daemon's counters (the tree `sluice stats --json` prints).
type StatsReply struct {
	Stats map[string]any
}

// ErrorReply is a refused request or, when Fatal, the reason the daemon closes the
// connection.
type ErrorReply struct {
	Code    int64
	Name    string
	Message string
	Fatal   bool
}

func (*Hello) MessageType() string           { return "Hello" }
func (*SegmentOffer) MessageType() string    { return "SegmentOffer" }
func (*TopicLookup) MessageType() string     { return "TopicLookup" }
func (*Produce) MessageType() string         { return "Produce" }
func (*Flush) MessageType() string           { return "Flush" }
func (*StatsRequest) MessageType() string    { return "StatsRequest" }
func (*Goodbye) MessageType() string         { return "Goodbye" }
func (*Welcome) MessageType() string         { return "Welcome" }
func (*SegmentAccepted) MessageType() string { return "SegmentAccepted" }
func (*TopicInfo) MessageType() string       { return "TopicInfo" }
func (*ProduceAck) MessageType() string      { return "ProduceAck" }
func (*FlushDone) MessageType() string       { return "FlushDone" }
func (*StatsReply) MessageType() string      { return "StatsReply" }
func (*ErrorReply) MessageType() string      { return "ErrorReply" }

// --- encoding ----------------------------------------------------------------------------------

// header writes the map header of a message with n fields besides "type", then "type".
func header(e *msgpack.Encoder, m Message, n int) error {
	if err := e.EncodeMapLen(n + 1); err != nil {
		return err
	}
	return strField(e, "type", m.MessageType())
}

func strField(e *msgpack.Encoder, k, v string) error {
	if err := e.EncodeString(k); err != nil {
		return err
	}
	return e.EncodeString(v)
}

func uintField(e *msgpack.Encoder, k string, v uint64) error {
	if err := e.EncodeString(k); err != nil {
		return err
	}
	return e.EncodeUint(v)
}

func intField(e *msgpack.Encoder, k string, v int64) error {
	if err := e.EncodeString(k); err != nil {
		return err
	}
	return e.EncodeInt(v)
}

func boolField(e *msgpack.Encoder, k string, v bool) error {
	if err := e.EncodeString(k); err != nil {
		return err
	}
	return e.EncodeBool(v)
}

// count returns how many of the flags are true: the fields present besides the required ones.
func count(flags ...bool) int {
	n := 0
	for _, f := range flags {
		if f {
			n++
		}
	}
	return n
}

// firstErr runs the steps in order and returns the first error.
func firstErr(steps ...func() error) error {
	for _, s := range steps {
		if err := s(); err != nil {
			return err
		}
	}
	return nil
}

func (m *Hello) encode(e *msgpack.Encoder) error {
	hasName, hasPID, hasWorkers, hasSeg, hasToken := m.ClientName != "", m.PID != 0, m.WorkersExpected != nil, m.WantsSegment, m.Token != 0
	if err := header(e, m, 1+count(hasName, hasPID, hasWorkers, hasSeg, hasToken)); err != nil {
		return err
	}
	if err := uintField(e, "version", m.Version); err != nil {
		return err
	}
	if hasName {
		if err := strField(e, "client_name", m.ClientName); err != nil {
			return err
		}
	}
	if hasPID {
		if err := uintField(e, "pid", m.PID); err != nil {
			return err
		}
	}
	if hasWorkers {
		if err := uintField(e, "workers_expected", *m.WorkersExpected); err != nil {
			return err
		}
	}
	if hasSeg {
		if err := boolField(e, "wants_segment", true); err != nil {
			return err
		}
	}
	if hasToken {
		return uintField(e, "token", m.Token)
	}
	return nil
}

func (m *SegmentOffer) encode(e *msgpack.Encoder) error {
	return firstErr(
		func() error { return header(e, m, 3) },
		func() error { return uintField(e, "segment_bytes", m.SegmentBytes) },
		func() error { return uintField(e, "workers", m.Workers) },
		func() error { return uintField(e, "fd_count", m.FDCount) },
	)
}

func (m *TopicLookup) encode(e *msgpack.Encoder) error {
	if err := header(e, m, 1); err != nil {
		return err
	}
	return strField(e, "topic", m.Topic)
}

func (m *Produce) encode(e *msgpack.Encoder) error {
	if len(m.Records) > MaxProduceRecords {
		return protocolErrorf("Produce of %d records; at most %d", len(m.Records), MaxProduceRecords)
	}
	hasAck, hasSeq := m.Ack, m.Seq != 0
	if err := header(e, m, 2+count(hasAck, hasSeq)); err != nil {
		return err
	}
	if err := strField(e, "topic", m.Topic); err != nil {
		return err
	}
	if err := e.EncodeString("records"); err != nil {
		return err
	}
	if err := e.EncodeArrayLen(len(m.Records)); err != nil {
		return err
	}
	for i := range m.Records {
		if err := encodeRecord(e, &m.Records[i]); err != nil {
			return err
		}
	}
	if hasAck {
		if err := boolField(e, "ack", true); err != nil {
			return err
		}
	}
	if hasSeq {
		return uintField(e, "seq", m.Seq)
	}
	return nil
}

// encodeRecord writes one Rec: a map of the fields that are not nil/zero, in the
// specification's order (key, value, headers, partition, timestamp).
func encodeRecord(e *msgpack.Encoder, r *Record) error {
	hasKey, hasValue, hasHeaders, hasPart, hasTS := r.Key != nil, r.Value != nil, r.Headers != nil, r.Partition != nil, !r.Timestamp.IsZero()
	var ts int64
	if hasTS {
		ts = r.Timestamp.UnixMilli()
		if ts < 0 {
			return fmt.Errorf("sluice: record timestamp %v is before the epoch", r.Timestamp)
		}
	}
	if hasPart && *r.Partition < 0 {
		return fmt.Errorf("sluice: record partition %d is negative", *r.Partition)
	}
	if err := e.EncodeMapLen(count(hasKey, hasValue, hasHeaders, hasPart, hasTS)); err != nil {
		return err
	}
	if hasKey {
		if err := e.EncodeString("key"); err != nil {
			return err
		}
		if err := e.EncodeBytes(r.Key); err != nil {
			return err
		}
	}
	if hasValue {
		if err := e.EncodeString("value"); err != nil {
			return err
		}
		if err := e.EncodeBytes(r.Value); err != nil {
			return err
		}
	}
	if hasHeaders {
		if err := e.EncodeString("headers"); err != nil {
			return err
		}
		if err := e.EncodeArrayLen(len(r.Headers)); err != nil {
			return err
		}
		for _, h := range r.Headers {
			if err := e.EncodeArrayLen(2); err != nil {
				return err
			}
			if err := e.EncodeString(h.Key); err != nil {
				return err
			}
			if err := e.EncodeBytes(h.Value); err != nil { // nil -> msgpack nil
				return err
			}
		}
	}
	if hasPart {
		if err := uintField(e, "partition", uint64(*r.Partition)); err != nil {
			return err
		}
	}
	if hasTS {
		return uintField(e, "timestamp", uint64(ts))
	}
	return nil
}

// recordSizeBound is an upper bound of encodeRecord's output for r: the field names, the
// largest headers msgpack uses for each value, and the data. Batches are sized with it, so a
// frame never exceeds MaxFrameBytes however the record's values happen to encode.
func recordSizeBound(r *Record) int {
	// map header 1; "key" 4 + bin32 header 5; "value" 6 + 5; "headers" 8 + array32 header 5;
	// "partition" 10 + uint32 5; "timestamp" 10 + uint64 9.
	const fixed = 1 + 4 + 5 + 6 + 5 + 8 + 5 + 10 + 5 + 10 + 9
	// per header: fixarray 1, str32 header 5, bin32 header 5
	const perHeader = 1 + 5 + 5
	n := fixed + len(r.Key) + len(r.Value)
	for _, h := range r.Headers {
		n += perHeader + len(h.Key) + len(h.Value)
	}
	return n
}

// varintLen is the size of Kafka's zig-zag varint of n.
func varintLen(n int64) int {
	u := uint64(n<<1) ^ uint64(n>>63)
	size := 1
	for u >= 0x80 {
		u >>= 7
		size++
	}
	return size
}

// bytesLen is the size of a nullable byte string in a Kafka record: its varint length (-1 for
// nil) and its bytes.
func bytesLen(b []byte) int {
	if b == nil {
		return varintLen(-1)
	}
	return varintLen(int64(len(b))) + len(b)
}

// recordBodySize is the record's body as Kafka's RecordBatch v2 encodes key, value and
// headers: the size the daemon holds against max_request_size.
func recordBodySize(r *Record) int {
	n := bytesLen(r.Key) + bytesLen(r.Value) + varintLen(int64(len(r.Headers)))
	for _, h := range r.Headers {
		n += varintLen(int64(len(h.Key))) + len(h.Key) + bytesLen(h.Value)
	}
	return n
}

// produceOverheadBound is an upper bound of a Produce frame's bytes besides its records: the
// length prefix, the map, "type", "topic" and the name, "records" and an array32 header, "ack",
// "seq" and a uint64.
func produceOverheadBound(topic string) int {
	return 4 + 1 + (5 + 8) + (6 + 5 + len(topic)) + (8 + 5) + (4 + 1) + (4 + 9)
}

func (m *Flush) encode(e *msgpack.Encoder) error {
	if err := header(e, m, 1); err != nil {
		return err
	}
	return uintField(e, "timeout_ms", m.TimeoutMS)
}

func (m *StatsRequest) encode(e *msgpack.Encoder) error { return header(e, m, 0) }
func (m *Goodbye) encode(e *msgpack.Encoder) error      { return header(e, m, 0) }

func (m *Welcome) encode(e *msgpack.Encoder) error {
	return firstErr(
		func() error { return header(e, m, 5) },
		func() error { return uintField(e, "version", m.Version) },
		func() error { return uintField(e, "workers", m.Workers) },
		func() error { return uintField(e, "request_ring_bytes", m.RequestRingBytes) },
		func() error { return uintField(e, "completion_ring_bytes", m.CompletionRingBytes) },
		func() error { return uintField(e, "client_id", m.ClientID) },
	)
}

func (m *SegmentAccepted) encode(e *msgpack.Encoder) error {
	if err := header(e, m, 1); err != nil {
		return err
	}
	return uintField(e, "client_id", m.ClientID)
}

func (m *TopicInfo) encode(e *msgpack.Encoder) error {
	return firstErr(
		func() error { return header(e, m, 9) },
		func() error { return strField(e, "topic", m.Topic) },
		func() error { return uintField(e, "topic_id", m.TopicID) },
		func() error { return uintField(e, "partitions", m.Partitions) },
		func() error { return strField(e, "profile", m.Profile) },
		func() error { return uintField(e, "max_request_size", m.MaxRequestSize) },
		func() error { return strField(e, "on_full", m.OnFull) },
		func() error { return uintField(e, "max_block_ms", m.MaxBlockMS) },
		func() error { return uintField(e, "batch_size", m.BatchSize) },
		func() error { return uintField(e, "linger_ms", m.LingerMS) },
	)
}

func (m *ProduceAck) encode(e *msgpack.Encoder) error {
	if err := header(e, m, 2); err != nil {
		return err
	}
	if err := uintField(e, "seq", m.Seq); err != nil {
		return err
	}
	if err := e.EncodeString("results"); err != nil {
		return err
	}
	if err := e.EncodeArrayLen(len(m.Results)); err != nil {
		return err
	}
	for _, r := range m.Results {
		err := firstErr(
			func() error { return e.EncodeMapLen(5) },
			func() error { return intField(e, "partition", int64(r.Partition)) },
			func() error { return intField(e, "offset", r.Offset) },
			func() error { return intField(e, "timestamp", r.Timestamp) },
			func() error { return intField(e, "error_code", r.ErrorCode) },
			func() error { return strField(e, "error_name", r.ErrorName) },
		)
		if err != nil {
			return err
		}
	}
	return nil
}

func (m *FlushDone) encode(e *msgpack.Encoder) error {
	return firstErr(
		func() error { return header(e, m, 3) },
		func() error { return boolField(e, "complete", m.Complete) },
		func() error { return uintField(e, "pending", m.Pending) },
		func() error { return uintField(e, "failed", m.Failed) },
	)
}

func (m *StatsReply) encode(e *msgpack.Encoder) error {
	if err := header(e, m, 1); err != nil {
		return err
	}
	if err := e.EncodeString("stats"); err != nil {
		return err
	}
	if m.Stats == nil {
		return e.EncodeMapLen(0)
	}
	return e.Encode(m.Stats)
}

func (m *ErrorReply) encode(e *msgpack.Encoder) error {
	return firstErr(
		func() error { return header(e, m, 4) },
		func() error { return intField(e, "code", m.Code) },
		func() error { return strField(e, "name", m.Name) },
		func() error { return strField(e, "message", m.Message) },
		func() error { return boolField(e, "fatal", m.Fatal) },
	)
}
