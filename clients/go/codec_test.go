package sluice

import (
	"bytes"
	"errors"
	"math"
	"strings"
	"testing"

	"github.com/vmihailenco/msgpack/v5"
)

// lengths at and around every boundary between msgpack's forms of a length.
var boundaryLengths = []int{0, 1, 15, 16, 31, 32, 255, 256, 65535, 65536, 70000}

// The append functions write what the msgpack library writes (the bytes the conformance
// vectors hold were written by the reference encoder with the same rules), at every boundary.
func TestAppendersMatchTheMsgpackLibrary(t *testing.T) {
	check := func(what string, got []byte, encode func(e *msgpack.Encoder) error) {
		t.Helper()
		var want bytes.Buffer
		if err := encode(msgpack.NewEncoder(&want)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want.Bytes()) {
			t.Errorf("%s: got %x, want %x", what, head(got), head(want.Bytes()))
		}
	}
	ints := []int64{0, 1, 127, 128, 255, 256, 65535, 65536, math.MaxUint32, math.MaxUint32 + 1, math.MaxInt64,
		-1, -32, -33, -128, -129, -32768, -32769, math.MinInt32, math.MinInt32 - 1, math.MinInt64}
	for _, v := range ints {
		check("int", appendInt(nil, v), func(e *msgpack.Encoder) error { return e.EncodeInt(v) })
		if v >= 0 {
			check("uint", appendUint(nil, uint64(v)), func(e *msgpack.Encoder) error { return e.EncodeUint(uint64(v)) })
		}
	}
	check("uint64 max", appendUint(nil, math.MaxUint64), func(e *msgpack.Encoder) error { return e.EncodeUint(math.MaxUint64) })
	for _, n := range boundaryLengths {
		s := strings.Repeat("s", n)
		check("str", appendStr(nil, s), func(e *msgpack.Encoder) error { return e.EncodeString(s) })
		b := make([]byte, n)
		check("bin", appendBin(nil, b), func(e *msgpack.Encoder) error { return e.EncodeBytes(b) })
		check("map", appendMapLen(nil, n), func(e *msgpack.Encoder) error { return e.EncodeMapLen(n) })
		check("array", appendArrayLen(nil, n), func(e *msgpack.Encoder) error { return e.EncodeArrayLen(n) })
	}
	check("nil bin", appendBin(nil, nil), func(e *msgpack.Encoder) error { return e.EncodeBytes(nil) })
	check("true", appendBool(nil, true), func(e *msgpack.Encoder) error { return e.EncodeBool(true) })
	check("false", appendBool(nil, false), func(e *msgpack.Encoder) error { return e.EncodeBool(false) })
}

func head(b []byte) []byte { return b[:min(len(b), 12)] }

// The decoder reads back whatever the library writes, at every boundary, and skips it whole.
func TestDecoderReadsAndSkipsEveryForm(t *testing.T) {
	for _, n := range boundaryLengths {
		s := strings.Repeat("é", n/2) + strings.Repeat("s", n%2)
		values := []any{s, make([]byte, n), make([]any, n), map[string]any{"k": make([]byte, n)}, float32(1.5), 2.5,
			int64(-n - 1), uint64(n) << 40, nil, true, msgpack.RawMessage{0xd4, 1, 2}}
		for _, v := range values {
			raw, err := msgpack.Marshal(v)
			if err != nil {
				t.Fatal(err)
			}
			d := newDecoder(append(raw, 0x07))
			if err := d.skipValue(); err != nil || d.left() != 1 {
				t.Fatalf("skipping %T of %d: %v, %d bytes left", v, n, err, d.left())
			}
		}
		raw, _ := msgpack.Marshal(s)
		if got, err := newDecoder(raw).str(); err != nil || got != s {
			t.Fatalf("str of %d: %v", n, err)
		}
		raw, _ = msgpack.Marshal(make([]byte, n))
		if got, err := newDecoder(raw).binOrNil(); err != nil || len(got) != n || got == nil {
			t.Fatalf("bin of %d: %v", n, err)
		}
	}
	for _, v := range []int64{0, 127, 128, -1, -32, -33, -129, math.MinInt32 - 1, math.MaxInt64, math.MinInt64, math.MaxUint32 + 1} {
		raw, _ := msgpack.Marshal(v)
		if got, err := newDecoder(raw).int(); err != nil || got != v {
			t.Fatalf("int %d: got %d, %v", v, got, err)
		}
	}
	raw, _ := msgpack.Marshal(uint64(math.MaxUint64))
	if got, err := newDecoder(raw).uint(); err != nil || got != math.MaxUint64 {
		t.Fatalf("uint64 max: %d, %v", got, err)
	}
	if _, err := newDecoder(raw).int(); err == nil || !strings.Contains(err.Error(), "out of range") {
		t.Fatalf("uint64 max as an int64: %v", err)
	}
}

// A corrupt body is an error, never a panic, a huge allocation or a deep recursion.
func TestDecoderRefusesCorruptLengths(t *testing.T) {
	deep := bytes.Repeat([]byte{0x91}, 1<<20) // a million nested one-entry arrays, then nothing
	cases := map[string][]byte{
		"array32 past the end": {0xdd, 0xff, 0xff, 0xff, 0xff, 0x01},
		"map32 past the end":   {0xdf, 0x7f, 0xff, 0xff, 0xff},
		"str32 past the end":   {0xdb, 0x00, 0x10, 0x00, 0x00, 'a'},
		"bin16 past the end":   {0xc5, 0x01, 0x00},
		"ext32 past the end":   {0xc9, 0x00, 0x00, 0x00, 0x09, 0x01},
		"cut uint32":           {0xce, 0x00},
		"deep nesting, cut":    deep,
		"never-used code":      {0xc1},
	}
	for name, body := range cases {
		if err := newDecoder(body).skipValue(); err == nil {
			t.Errorf("%s: skipped without an error", name)
		}
	}
	if _, err := newDecoder([]byte{0xdd, 0xff, 0xff, 0xff, 0xff}).results(); !errors.Is(err, errTruncated) {
		t.Fatalf("a results array longer than the body: %v", err)
	}
	// Deep nesting that is complete skips fine.
	d := newDecoder(append(bytes.Clone(deep), 0xc0))
	if err := d.skipValue(); err != nil || d.left() != 0 {
		t.Fatalf("deep nesting: %v", err)
	}
}

// A ProduceAck decoded into a reused slice: same results, no new slice once it is big enough.
func TestProduceAckResultsReuseTheirSlice(t *testing.T) {
	want := []RecordResult{
		{Partition: 2, Offset: 7, Timestamp: 1_700_000_000_000, ErrorName: "NONE"},
		{Partition: -1, Offset: -1, Timestamp: -1, ErrorCode: 1007, ErrorName: "BUFFER_FULL"},
	}
	frame, err := EncodeFrame(&ProduceAck{Seq: 3, Results: want})
	if err != nil {
		t.Fatal(err)
	}
	reuse := make([]RecordResult, 0, 8)
	first := &reuse[:1][0]
	m, err := decodeBody(frame[prefixBytes:], &reuse)
	if err != nil {
		t.Fatal(err)
	}
	got := m.(*ProduceAck).Results
	if len(got) != 2 || got[0] != want[0] || got[1] != want[1] || &got[0] != first {
		t.Fatalf("got %+v (reused: %v)", got, &got[0] == first)
	}
}
