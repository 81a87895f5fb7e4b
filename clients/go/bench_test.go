package sluice

import (
	"context"
	"testing"
)

// Per-record costs of the client's hot paths: go test -bench . -benchmem

func benchRecords(n int) []Record {
	recs := make([]Record, n)
	for i := range recs {
		recs[i] = Record{Key: []byte("key-0000000000"), Value: make([]byte, 100)}
	}
	return recs
}

func BenchmarkEncodeProduce1000(b *testing.B) {
	enc := NewEncoder()
	m := &Produce{Topic: "bench", Records: benchRecords(1000), Ack: true, Seq: 1}
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		if _, err := enc.Encode(m); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDecodeProduceAck1000(b *testing.B) {
	res := make([]RecordResult, 1000)
	for i := range res {
		res[i] = RecordResult{Partition: int32(i % 12), Offset: int64(i) << 20, Timestamp: -1, ErrorName: "NONE"}
	}
	frame, err := EncodeFrame(&ProduceAck{Seq: 1, Results: res})
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		if _, err := DecodeFrame(frame); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkSendAndAck(b *testing.B) {
	d := newFakeDaemon(&testing.T{})
	d.produce = func(_ int, m *Produce) (Message, bool) {
		res := make([]RecordResult, len(m.Records))
		for i := range res {
			res[i] = RecordResult{Offset: int64(i), Timestamp: -1, ErrorName: "NONE"}
		}
		return &ProduceAck{Seq: m.Seq, Results: res}, false
	}
	ctx := context.Background()
	p, err := Connect(ctx, Config{Dial: d.dial})
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close(ctx)
	rec := benchRecords(1)[0]
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := p.SendFunc(ctx, "t", rec, func(RecordMetadata, error) {}); err != nil {
			b.Fatal(err)
		}
	}
	if err := p.Flush(ctx); err != nil {
		b.Fatal(err)
	}
}
