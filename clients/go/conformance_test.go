package sluice

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"reflect"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/vmihailenco/msgpack/v5"
)

// conformanceFile holds the protocol's byte-exact conversations (clients/conformance/README.md
// describes the format), relative to this package's directory, where `go test` runs.
const conformanceFile = "../conformance/protocol-v1.json"

type conformanceDoc struct {
	ProtocolVersion int                 `json:"protocol_version"`
	Format          int                 `json:"format"`
	Vectors         []conformanceVector `json:"vectors"`
}

type conformanceVector struct {
	Name   string   `json:"name"`
	Client []string `json:"client"`
	Daemon []struct {
		Frame string            `json:"frame"`
		Vary  map[string]string `json:"vary"`
	} `json:"daemon"`
	Then string `json:"then"`
}

func loadConformance(t *testing.T) conformanceDoc {
	t.Helper()
	raw, err := os.ReadFile(conformanceFile)
	if err != nil {
		t.Fatalf("the conformance vectors: %v", err)
	}
	var doc conformanceDoc
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	if doc.Format != 1 || doc.ProtocolVersion != ProtocolVersion {
		t.Fatalf("format %d, protocol version %d: this test reads format 1 of version %d", doc.Format, doc.ProtocolVersion, ProtocolVersion)
	}
	if len(doc.Vectors) == 0 {
		t.Fatal("no vectors")
	}
	return doc
}

func isClientMessage(m Message) bool {
	switch m.(type) {
	case *Hello, *SegmentOffer, *TopicLookup, *Produce, *Flush, *StatsRequest, *Goodbye:
		return true
	}
	return false
}

// The client frames: each well-formed one decodes as a client message and encodes back to
// the same bytes; the deliberately malformed one of a bad-frame-* vector (its last) is
// refused.
func TestConformanceClientFrames(t *testing.T) {
	for _, v := range loadConformance(t).Vectors {
		for i, h := range v.Client {
			frame := mustHex(t, h)
			m, err := DecodeFrame(frame)
			bad := strings.HasPrefix(v.Name, "bad-frame-") && i == len(v.Client)-1
			if bad {
				if err == nil && isClientMessage(m) {
					t.Errorf("%s: malformed client frame %d accepted as %#v", v.Name, i, m)
				}
				continue
			}
			if err != nil {
				t.Errorf("%s: client frame %d: %v", v.Name, i, err)
				continue
			}
			if !isClientMessage(m) {
				t.Errorf("%s: client frame %d is a %s", v.Name, i, m.MessageType())
				continue
			}
			again, err := EncodeFrame(m)
			if err != nil || !bytes.Equal(again, frame) {
				t.Errorf("%s: client frame %d re-encoded\n got  %x (%v)\n want %x", v.Name, i, again, err, frame)
			}
		}
	}
}

// The daemon frames: each decodes as a daemon message and encodes back to the same bytes
// (a StatsReply to the same map: Go maps have no key order), and a FrameReader reads a
// vector's frames back to back whatever the chunking.
func TestConformanceDaemonFrames(t *testing.T) {
	for _, v := range loadConformance(t).Vectors {
		var stream []byte
		var want []Message
		for i, d := range v.Daemon {
			frame := mustHex(t, d.Frame)
			stream = append(stream, frame...)
			m, err := DecodeFrame(frame)
			if err != nil {
				t.Errorf("%s: daemon frame %d: %v", v.Name, i, err)
				continue
			}
			want = append(want, m)
			if isClientMessage(m) {
				t.Errorf("%s: daemon frame %d is a %s", v.Name, i, m.MessageType())
			}
			again, err := EncodeFrame(m)
			if err != nil {
				t.Errorf("%s: daemon frame %d: %v", v.Name, i, err)
				continue
			}
			if _, ok := m.(*StatsReply); ok {
				var a, b any
				if msgpack.Unmarshal(again[4:], &a) != nil || msgpack.Unmarshal(frame[4:], &b) != nil || !reflect.DeepEqual(a, b) {
					t.Errorf("%s: StatsReply re-encoded to another value", v.Name)
				}
				continue
			}
			if !bytes.Equal(again, frame) {
				t.Errorf("%s: daemon frame %d re-encoded\n got  %x\n want %x", v.Name, i, again, frame)
			}
		}
		fr := NewFrameReader(iotest.HalfReader(bytes.NewReader(stream)))
		for i, w := range want {
			got, err := fr.Next()
			if err != nil || !reflect.DeepEqual(got, w) {
				t.Errorf("%s: streamed frame %d: %#v, %v", v.Name, i, got, err)
			}
		}
	}
}

// What this client sends, built by hand as the Producer builds it, is the vectors' bytes.
func TestConformanceEncoderBuildsTheVectorsFrames(t *testing.T) {
	vectors := map[string]conformanceVector{}
	for _, v := range loadConformance(t).Vectors {
		vectors[v.Name] = v
	}
	topic := "sluice-conformance-v1"
	cases := []struct {
		vector string
		index  int
		msg    Message
	}{
		{"hello-welcome", 0, &Hello{Version: 1, ClientName: "conformance"}},
		{"produce-ack", 1, &Produce{Topic: topic, Records: []Record{{
			Key: []byte("k1"), Value: []byte("hello"), Headers: []Header{{"h", []byte("v")}, {"n", nil}},
			Timestamp: time.UnixMilli(1_700_000_000_000),
		}}, Ack: true, Seq: 1}},
		{"stats", 1, &StatsRequest{}},
	}
	for _, c := range cases {
		v, ok := vectors[c.vector]
		if !ok || len(v.Client) <= c.index {
			t.Fatalf("vector %s (client frame %d) is not in the file", c.vector, c.index)
		}
		got, err := EncodeFrame(c.msg)
		if err != nil {
			t.Fatal(err)
		}
		if want := v.Client[c.index]; hex.EncodeToString(got) != want {
			t.Errorf("%s: frame %d\n got  %x\n want %s", c.vector, c.index, got, want)
		}
		if m, ok := c.msg.(*Produce); ok {
			// The Producer's own path: records encoded as they are sent, the frame around them.
			if got := producerFrame(t, m); hex.EncodeToString(got) != v.Client[c.index] {
				t.Errorf("%s: the Producer's frame %d\n got  %x\n want %s", c.vector, c.index, got, v.Client[c.index])
			}
		}
	}
}

// A failed result's error decodes into an *Error that errors.Is matches by code.
func TestConformanceFailedResultIsAnError(t *testing.T) {
	for _, v := range loadConformance(t).Vectors {
		if v.Name != "produce-unknown-topic-ack" {
			continue
		}
		m, err := DecodeFrame(mustHex(t, v.Daemon[len(v.Daemon)-1].Frame))
		if err != nil {
			t.Fatal(err)
		}
		ack := m.(*ProduceAck)
		b := &batch{topic: "x", n: len(ack.Results), results: ack.Results}
		_, rerr := b.result(0)
		if !errors.Is(rerr, ErrUnknownTopicOrPartition) || !IsRetriable(rerr) {
			t.Fatalf("result %+v gave %v", ack.Results[0], rerr)
		}
		return
	}
	t.Fatal("vector produce-unknown-topic-ack is not in the file")
}

// producerFrame builds m's frame as the Producer does: each record appended to the batch's
// buffer when it is sent, then the frame's head and tail around them.
func producerFrame(t *testing.T, m *Produce) []byte {
	t.Helper()
	var recs []byte
	for i := range m.Records {
		var err error
		if recs, err = appendRecord(recs, &m.Records[i]); err != nil {
			t.Fatal(err)
		}
	}
	parts, h, err := appendFrameAround(nil, m.Topic, len(m.Records), len(recs), m.Ack, m.Seq)
	if err != nil {
		t.Fatal(err)
	}
	return append(append(append([]byte(nil), parts[:h]...), recs...), parts[h:]...)
}
