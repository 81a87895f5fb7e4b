package sluice

import (
	"bytes"
	"encoding/hex"
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"
	"testing/iotest"
	"time"
)

// The worked example of docs/PROTOCOL.md: one Produce frame, 87 bytes.
const workedExample = "0000005385a474797065a750726f64756365a5746f706963a6636c69636b73a77265636f7264739183a36b6579c4026b31a576616c7565c40568656c6c6fa7686561646572739192a168c40176a361636bc3a373657101"

func mustHex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestEncodeWorkedExample(t *testing.T) {
	frame, err := EncodeFrame(&Produce{
		Topic:   "clicks",
		Records: []Record{{Key: []byte("k1"), Value: []byte("hello"), Headers: []Header{{"h", []byte("v")}}}},
		Ack:     true,
		Seq:     1,
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := hex.EncodeToString(frame); got != workedExample {
		t.Fatalf("frame\n got  %s\n want %s", got, workedExample)
	}
}

func TestRoundTripEveryMessage(t *testing.T) {
	workers := uint64(3)
	msgs := []Message{
		&Hello{Version: 1},
		&Hello{Version: 7, ClientName: "billing", PID: 4242, WorkersExpected: &workers, WantsSegment: true, Token: 1 << 63},
		&SegmentOffer{SegmentBytes: 1 << 30, Workers: 2, FDCount: 5},
		&TopicLookup{Topic: "t"},
		&Produce{Topic: "t", Records: []Record{}},
		&Produce{Topic: "t", Records: []Record{
			{},
			{Key: []byte{}, Value: []byte{}},
			{Key: bytes.Repeat([]byte("k"), 300), Value: bytes.Repeat([]byte("v"), 70000),
				Headers:   []Header{{"a", nil}, {"b", []byte{}}, {strings.Repeat("n", 40), []byte("x")}},
				Partition: PartitionOf(2147483647), Timestamp: time.UnixMilli(1_700_000_000_123)},
			{Partition: PartitionOf(0), Timestamp: time.UnixMilli(0)},
		}, Ack: true, Seq: 1<<64 - 1},
		&Flush{TimeoutMS: 0},
		&StatsRequest{},
		&Goodbye{},
		&Welcome{Version: 1, Workers: 2, RequestRingBytes: 1 << 22, CompletionRingBytes: 1 << 18, ClientID: 9},
		&SegmentAccepted{ClientID: 1},
		&TopicInfo{Topic: "t", TopicID: 65535, Partitions: 12, Profile: "default", MaxRequestSize: 1 << 20,
			OnFull: "block", MaxBlockMS: 60000, BatchSize: 131072, LingerMS: 5},
		&ProduceAck{Seq: 5, Results: []RecordResult{
			{Partition: 3, Offset: 1 << 40, Timestamp: -1, ErrorCode: 0, ErrorName: "NONE"},
			{Partition: -1, Offset: -1, Timestamp: -1, ErrorCode: 1007, ErrorName: "BUFFER_FULL"},
		}},
		&FlushDone{Complete: false, Pending: 3, Failed: 1},
		&StatsReply{Stats: map[string]any{"uptime_s": 1.5}},
		&ErrorReply{Code: -1, Name: "UNKNOWN_SERVER_ERROR", Message: "é", Fatal: true},
	}
	for _, m := range msgs {
		frame, err := EncodeFrame(m)
		if err != nil {
			t.Fatalf("%T: %v", m, err)
		}
		got, err := DecodeFrame(frame)
		if err != nil {
			t.Fatalf("%T: decode: %v (%x)", m, err, frame)
		}
		if !reflect.DeepEqual(normal(got), normal(m)) {
			t.Fatalf("%T round trip:\n got  %#v\n want %#v", m, got, m)
		}
	}
}

// normal makes timestamps comparable with DeepEqual (time.Time carries a location).
func normal(m Message) Message {
	if p, ok := m.(*Produce); ok {
		c := *p
		c.Records = append([]Record(nil), p.Records...)
		for i := range c.Records {
			if !c.Records[i].Timestamp.IsZero() {
				c.Records[i].Timestamp = time.UnixMilli(c.Records[i].Timestamp.UnixMilli()).UTC()
			}
		}
		return &c
	}
	return m
}

// The Producer's frames (records encoded as they are sent) are EncodeFrame's, byte for byte.
func TestProducerFramesAreTheEncodersFrames(t *testing.T) {
	for _, m := range []*Produce{
		{Topic: "clicks", Records: []Record{{Key: []byte("k1"), Value: []byte("hello"), Headers: []Header{{"h", []byte("v")}}}}, Ack: true, Seq: 1},
		{Topic: strings.Repeat("t", 40), Records: make([]Record, 70000)[:17]},
		{Topic: "t", Records: []Record{{Value: make([]byte, 300)}, {Key: []byte{}, Partition: PartitionOf(7), Timestamp: time.UnixMilli(5)}}, Ack: true, Seq: 1 << 40},
		{Topic: "t", Records: []Record{}},
	} {
		want, err := EncodeFrame(m)
		if err != nil {
			t.Fatal(err)
		}
		if got := producerFrame(t, m); !bytes.Equal(got, want) {
			t.Errorf("%s, %d records:\n got  %x\n want %x", m.Topic, len(m.Records), got, want)
		}
	}
}

func TestNilAndEmptyBytesStayApart(t *testing.T) {
	frame, err := EncodeFrame(&Produce{Topic: "t", Records: []Record{{Key: []byte{}, Value: nil}}})
	if err != nil {
		t.Fatal(err)
	}
	// The record is a map of one entry: "key" -> bin 8 of length 0; the nil value is left out.
	if !bytes.Contains(frame, mustHex(t, "9181a36b6579c400")) {
		t.Fatalf("empty key not encoded as bin 0: %x", frame)
	}
	m, _ := DecodeFrame(frame)
	rec := m.(*Produce).Records[0]
	if rec.Key == nil || len(rec.Key) != 0 || rec.Value != nil {
		t.Fatalf("decoded key %#v value %#v", rec.Key, rec.Value)
	}
}

func TestDecodeAcceptsAnyKeyOrderAndSkipsUnknownKeys(t *testing.T) {
	// {"pending": 2, "future": [1, {"x": nil}], "complete": false, "type": "FlushDone"}
	body := mustHex(t, "84a770656e64696e6702a66675747572659201"+"81a178c0"+"a8636f6d706c657465c2a474797065a9466c757368446f6e65")
	m, err := DecodeBody(body)
	if err != nil {
		t.Fatal(err)
	}
	if got := *m.(*FlushDone); got != (FlushDone{Complete: false, Pending: 2}) {
		t.Fatalf("got %+v", got)
	}
}

func TestDecodeRefusesWhatTheSpecificationRefuses(t *testing.T) {
	cases := map[string]struct{ hex, reason string }{
		"not a map":           {"a474797065", "not a map"},
		"no type":             {"81a373657101", `no "type"`},
		"unknown type":        {"81a474797065a5426f677573", "unknown message type"},
		"type not a str":      {"81a47479706501", "not a str"},
		"missing field":       {"82a474797065a750726f64756365a5746f706963a174", `"records" is missing`},
		"str for bytes":       {"83a474797065a750726f64756365a5746f706963a174a77265636f7264739181a576616c7565a474657874", "not bin"},
		"trailing bytes":      {"81a474797065ac537461747352657175657374" + "00", "bytes after"},
		"negative uint":       {"82a474797065a5466c757368aa74696d656f75745f6d73ff", "negative"},
		"float for int":       {"82a474797065a5466c757368aa74696d656f75745f6d73cb3ff0000000000000", "not an integer"},
		"nil for required":    {"82a474797065a5466c757368aa74696d656f75745f6d73c0", "not an integer"},
		"int for bool":        {"83a474797065a9466c757368446f6e65a8636f6d706c65746501a770656e64696e6700", "not a bool"},
		"header of 3":         {"83a474797065a750726f64756365a5746f706963a174a77265636f7264739181a7686561646572739193a168c0c0", "not 2"},
		"topic_id over 65535": {"8aa474797065a9546f706963496e666fa5746f706963a174a8746f7069635f6964ce00010000aa706172746974696f6e7301a770726f66696c65a164b06d61785f726571756573745f73697a6501a76f6e5f66756c6ca5626c6f636bac6d61785f626c6f636b5f6d7301aa62617463685f73697a6501a96c696e6765725f6d7301", "above 65535"},
		"truncated":           {"82a474797065a5466c757368aa74696d656f75745f6d73cd30", "EOF"},
		"invalid utf-8":       {"82a474797065ab546f7069634c6f6f6b7570a5746f706963a1ff", "UTF-8"},
	}
	for name, c := range cases {
		_, err := DecodeBody(mustHex(t, c.hex))
		var pe *ProtocolError
		if !errors.As(err, &pe) || !strings.Contains(err.Error(), c.reason) {
			t.Errorf("%s: got %v, want a *ProtocolError saying %q", name, err, c.reason)
		}
	}
}

func TestFrameReaderWhateverTheChunking(t *testing.T) {
	var stream []byte
	want := []Message{
		&Welcome{Version: 1, Workers: 2, RequestRingBytes: 1, CompletionRingBytes: 1, ClientID: 1},
		&ProduceAck{Seq: 1, Results: []RecordResult{{Partition: 0, Offset: 1, Timestamp: -1, ErrorName: "NONE"}}},
		&ErrorReply{Code: 3, Name: "UNKNOWN_TOPIC_OR_PARTITION", Message: "m"},
	}
	for _, m := range want {
		f, err := EncodeFrame(m)
		if err != nil {
			t.Fatal(err)
		}
		stream = append(stream, f...)
	}
	fr := NewFrameReader(iotest.OneByteReader(bytes.NewReader(stream)))
	for i, w := range want {
		got, err := fr.Next()
		if err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		if !reflect.DeepEqual(got, w) {
			t.Fatalf("message %d: got %#v want %#v", i, got, w)
		}
	}
	if _, err := fr.Next(); err != io.EOF {
		t.Fatalf("after the last frame: %v, want io.EOF", err)
	}
	// A stream cut inside a frame is not a clean end.
	fr = NewFrameReader(bytes.NewReader(stream[:len(stream)-1]))
	fr.Next()
	fr.Next()
	if _, err := fr.Next(); err != io.ErrUnexpectedEOF {
		t.Fatalf("cut frame: %v, want io.ErrUnexpectedEOF", err)
	}
}

func TestFrameReaderRefusesBadLengthsAndStaysFailed(t *testing.T) {
	for _, prefix := range []string{"00000000", "01000001", "ffffffff"} {
		fr := NewFrameReader(bytes.NewReader(mustHex(t, prefix+"81a474797065a7476f6f64627965")))
		_, err := fr.Next()
		var pe *ProtocolError
		if !errors.As(err, &pe) {
			t.Fatalf("length %s: %v", prefix, err)
		}
		if _, again := fr.Next(); again != err {
			t.Fatalf("length %s: second call gave %v", prefix, again)
		}
	}
	// The largest legal length is accepted (the body is then read, here cut short).
	fr := NewFrameReader(bytes.NewReader(mustHex(t, "01000000")))
	if _, err := fr.Next(); err != io.ErrUnexpectedEOF {
		t.Fatalf("16 MiB length: %v", err)
	}
}

func TestEncodeRefusesOversizedFrames(t *testing.T) {
	_, err := EncodeFrame(&Produce{Topic: "t", Records: []Record{{Value: make([]byte, MaxFrameBytes)}}})
	var pe *ProtocolError
	if !errors.As(err, &pe) {
		t.Fatalf("got %v", err)
	}
}

func TestRecordSizeBoundIsAnUpperBound(t *testing.T) {
	recs := []Record{
		{},
		{Key: []byte("k"), Value: []byte("v")},
		{Key: make([]byte, 70000), Value: make([]byte, 300), Headers: []Header{{strings.Repeat("h", 300), make([]byte, 70000)}, {"", nil}},
			Partition: PartitionOf(1 << 30), Timestamp: time.UnixMilli(1 << 50)},
	}
	for i, r := range recs {
		frame, err := EncodeFrame(&Produce{Topic: "topic", Records: []Record{r}, Ack: true, Seq: 1 << 63})
		if err != nil {
			t.Fatal(err)
		}
		if bound := recordSizeBound(&r) + produceOverheadBound("topic"); len(frame) > bound {
			t.Fatalf("record %d: frame of %d bytes, bound %d", i, len(frame), bound)
		}
	}
}

func TestProduceRecordsAreCapped(t *testing.T) {
	frame, err := EncodeFrame(&Produce{Topic: "t", Records: make([]Record, MaxProduceRecords)})
	if err != nil {
		t.Fatalf("%d records: %v", MaxProduceRecords, err)
	}
	if _, err := DecodeFrame(frame); err != nil {
		t.Fatalf("decoding %d records: %v", MaxProduceRecords, err)
	}
	var pe *ProtocolError
	if _, err := EncodeFrame(&Produce{Topic: "t", Records: make([]Record, MaxProduceRecords+1)}); !errors.As(err, &pe) {
		t.Fatalf("encoding one record more: %v", err)
	}
	// The same body with one more (empty) record: the array32 count + 1, one fixmap 0x80 more.
	body := bytes.Clone(frame[4:])
	header := mustHex(t, "dd00010000")
	i := bytes.Index(body, header)
	if i < 0 {
		t.Fatalf("no array32 header of %d in %x", MaxProduceRecords, body[:40])
	}
	copy(body[i:], mustHex(t, "dd00010001"))
	body = append(body[:i+len(header)], append([]byte{0x80}, body[i+len(header):]...)...)
	if _, err := DecodeBody(body); !errors.As(err, &pe) || !strings.Contains(err.Error(), "at most") {
		t.Fatalf("decoding one record more: %v", err)
	}
}

// FlushDone.failed came after the first release of version 1: an older daemon's FlushDone
// (without it) decodes with Failed 0.
func TestFlushDoneFromAnOlderDaemon(t *testing.T) {
	m, err := DecodeFrame(mustHex(t, "0000002383a474797065a9466c757368446f6e65a8636f6d706c657465c3a770656e64696e6700"))
	if err != nil {
		t.Fatal(err)
	}
	if got := *m.(*FlushDone); got != (FlushDone{Complete: true}) {
		t.Fatalf("got %+v", got)
	}
}
