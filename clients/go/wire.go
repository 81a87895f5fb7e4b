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
	// encode appends the message's msgpack map to b.
	encode(b []byte) ([]byte, error)
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
// [Producer.Send] (and SendFunc, Produce) encodes the record into its batch's frame before
// it returns: the caller may reuse Key, Value and the header values afterwards.
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
//
// Each message appends its map to b (codec.go's functions): "type" first, then the fields in
// the specification's order.

// header appends the map header of a message with n fields besides "type", then "type".
func header(b []byte, m Message, n int) []byte {
	return appendStr(appendStr(appendMapLen(b, n+1), "type"), m.MessageType())
}

func strField(b []byte, k, v string) []byte         { return appendStr(appendStr(b, k), v) }
func uintField(b []byte, k string, v uint64) []byte { return appendUint(appendStr(b, k), v) }
func intField(b []byte, k string, v int64) []byte   { return appendInt(appendStr(b, k), v) }
func boolField(b []byte, k string, v bool) []byte   { return appendBool(appendStr(b, k), v) }

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

func (m *Hello) encode(b []byte) ([]byte, error) {
	hasName, hasPID, hasWorkers, hasSeg, hasToken := m.ClientName != "", m.PID != 0, m.WorkersExpected != nil, m.WantsSegment, m.Token != 0
	b = header(b, m, 1+count(hasName, hasPID, hasWorkers, hasSeg, hasToken))
	b = uintField(b, "version", m.Version)
	if hasName {
		b = strField(b, "client_name", m.ClientName)
	}
	if hasPID {
		b = uintField(b, "pid", m.PID)
	}
	if hasWorkers {
		b = uintField(b, "workers_expected", *m.WorkersExpected)
	}
	if hasSeg {
		b = boolField(b, "wants_segment", true)
	}
	if hasToken {
		b = uintField(b, "token", m.Token)
	}
	return b, nil
}

func (m *SegmentOffer) encode(b []byte) ([]byte, error) {
	b = header(b, m, 3)
	b = uintField(b, "segment_bytes", m.SegmentBytes)
	b = uintField(b, "workers", m.Workers)
	return uintField(b, "fd_count", m.FDCount), nil
}

func (m *TopicLookup) encode(b []byte) ([]byte, error) {
	return strField(header(b, m, 1), "topic", m.Topic), nil
}

func (m *Produce) encode(b []byte) ([]byte, error) {
	if len(m.Records) > MaxProduceRecords {
		return nil, protocolErrorf("Produce of %d records; at most %d", len(m.Records), MaxProduceRecords)
	}
	b = appendProduceHead(b, m.Topic, len(m.Records), m.Ack, m.Seq)
	for i := range m.Records {
		var err error
		if b, err = appendRecord(b, &m.Records[i]); err != nil {
			return nil, err
		}
	}
	return appendProduceTail(b, m.Ack, m.Seq), nil
}

// appendProduceHead appends a Produce's fields up to its records' array header; the records
// (appendRecord) and appendProduceTail follow. The Producer writes a batch's frame in these
// three parts: its records were encoded as they were sent.
func appendProduceHead(b []byte, topic string, records int, ack bool, seq uint64) []byte {
	b = appendStr(appendMapLen(b, 3+count(ack, seq != 0)), "type")
	b = appendStr(b, "Produce")
	b = strField(b, "topic", topic)
	return appendArrayLen(appendStr(b, "records"), records)
}

func appendProduceTail(b []byte, ack bool, seq uint64) []byte {
	if ack {
		b = boolField(b, "ack", true)
	}
	if seq != 0 {
		b = uintField(b, "seq", seq)
	}
	return b
}

// appendRecord appends one Rec: a map of the fields that are not nil/zero, in the
// specification's order (key, value, headers, partition, timestamp).
func appendRecord(b []byte, r *Record) ([]byte, error) {
	hasKey, hasValue, hasHeaders, hasPart, hasTS := r.Key != nil, r.Value != nil, r.Headers != nil, r.Partition != nil, !r.Timestamp.IsZero()
	var ts int64
	if hasTS {
		ts = r.Timestamp.UnixMilli()
		if ts < 0 {
			return nil, fmt.Errorf("sluice: record timestamp %v is before the epoch", r.Timestamp)
		}
	}
	if hasPart && *r.Partition < 0 {
		return nil, fmt.Errorf("sluice: record partition %d is negative", *r.Partition)
	}
	b = appendMapLen(b, count(hasKey, hasValue, hasHeaders, hasPart, hasTS))
	if hasKey {
		b = appendBin(appendStr(b, "key"), r.Key)
	}
	if hasValue {
		b = appendBin(appendStr(b, "value"), r.Value)
	}
	if hasHeaders {
		b = appendArrayLen(appendStr(b, "headers"), len(r.Headers))
		for _, h := range r.Headers {
			b = appendBin(appendStr(appendArrayLen(b, 2), h.Key), h.Value) // a nil value is msgpack nil
		}
	}
	if hasPart {
		b = uintField(b, "partition", uint64(*r.Partition))
	}
	if hasTS {
		b = uintField(b, "timestamp", uint64(ts))
	}
	return b, nil
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

func (m *Flush) encode(b []byte) ([]byte, error) {
	return uintField(header(b, m, 1), "timeout_ms", m.TimeoutMS), nil
}

func (m *StatsRequest) encode(b []byte) ([]byte, error) { return header(b, m, 0), nil }
func (m *Goodbye) encode(b []byte) ([]byte, error)      { return header(b, m, 0), nil }

func (m *Welcome) encode(b []byte) ([]byte, error) {
	b = header(b, m, 5)
	b = uintField(b, "version", m.Version)
	b = uintField(b, "workers", m.Workers)
	b = uintField(b, "request_ring_bytes", m.RequestRingBytes)
	b = uintField(b, "completion_ring_bytes", m.CompletionRingBytes)
	return uintField(b, "client_id", m.ClientID), nil
}

func (m *SegmentAccepted) encode(b []byte) ([]byte, error) {
	return uintField(header(b, m, 1), "client_id", m.ClientID), nil
}

func (m *TopicInfo) encode(b []byte) ([]byte, error) {
	b = header(b, m, 9)
	b = strField(b, "topic", m.Topic)
	b = uintField(b, "topic_id", m.TopicID)
	b = uintField(b, "partitions", m.Partitions)
	b = strField(b, "profile", m.Profile)
	b = uintField(b, "max_request_size", m.MaxRequestSize)
	b = strField(b, "on_full", m.OnFull)
	b = uintField(b, "max_block_ms", m.MaxBlockMS)
	b = uintField(b, "batch_size", m.BatchSize)
	return uintField(b, "linger_ms", m.LingerMS), nil
}

func (m *ProduceAck) encode(b []byte) ([]byte, error) {
	b = uintField(header(b, m, 2), "seq", m.Seq)
	b = appendArrayLen(appendStr(b, "results"), len(m.Results))
	for i := range m.Results {
		r := &m.Results[i]
		b = appendMapLen(b, 5)
		b = intField(b, "partition", int64(r.Partition))
		b = intField(b, "offset", r.Offset)
		b = intField(b, "timestamp", r.Timestamp)
		b = intField(b, "error_code", r.ErrorCode)
		b = strField(b, "error_name", r.ErrorName)
	}
	return b, nil
}

func (m *FlushDone) encode(b []byte) ([]byte, error) {
	b = header(b, m, 3)
	b = boolField(b, "complete", m.Complete)
	b = uintField(b, "pending", m.Pending)
	return uintField(b, "failed", m.Failed), nil
}

// encode writes the free-form stats map with the msgpack library (its generic encoding of
// maps, strings, numbers and lists).
func (m *StatsReply) encode(b []byte) ([]byte, error) {
	b = appendStr(header(b, m, 1), "stats")
	if m.Stats == nil {
		return appendMapLen(b, 0), nil
	}
	stats, err := msgpack.Marshal(m.Stats)
	if err != nil {
		return nil, err
	}
	return append(b, stats...), nil
}

func (m *ErrorReply) encode(b []byte) ([]byte, error) {
	b = header(b, m, 4)
	b = intField(b, "code", m.Code)
	b = strField(b, "name", m.Name)
	b = strField(b, "message", m.Message)
	return boolField(b, "fatal", m.Fatal), nil
}
