package sluice

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeDaemon answers the protocol over in-memory pipes (net.Pipe): Welcome, TopicInfo for
// the topics it knows (an ErrorReply otherwise), StatsReply, and for each Produce whatever
// its produce hook says. Tests script failures through the hooks. Real deliveries are
// tested against a real daemon and broker in tests/integration/test_go_client.py.
type fakeDaemon struct {
	t      *testing.T
	topics map[string]uint64

	// hello answers the Hello of connection n (0-based); nil: a Welcome.
	hello func(n int) Message
	// produce answers a Produce on connection n; a nil reply sends nothing, hangUp closes
	// the connection after the reply. nil: every record succeeds.
	produce func(n int, m *Produce) (reply Message, hangUp bool)
	// afterLookup runs after a TopicInfo was sent on connection n; true closes it.
	afterLookup func(n int) bool

	mu       sync.Mutex
	conns    int
	refuse   bool // dial fails
	hellos   int
	lookups  map[string]int
	produces []*Produce
	offsets  map[int32]int64
	goodbyes int
	flushes  int
	failed   uint64 // FlushDone.failed of the next Flush
}

func newFakeDaemon(t *testing.T) *fakeDaemon {
	return &fakeDaemon{t: t, topics: map[string]uint64{"t": 3}, lookups: map[string]int{}, offsets: map[int32]int64{}}
}

func (d *fakeDaemon) config() Config {
	return Config{Dial: d.dial, Linger: time.Millisecond, ReconnectTimeout: 5 * time.Second}
}

func (d *fakeDaemon) dial(ctx context.Context) (net.Conn, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.refuse {
		return nil, errors.New("fake daemon: connection refused")
	}
	client, server := net.Pipe()
	n := d.conns
	d.conns++
	go d.serve(n, server)
	return client, nil
}

func (d *fakeDaemon) setRefuse(v bool) {
	d.mu.Lock()
	d.refuse = v
	d.mu.Unlock()
}

// ack is the default answer: every record succeeds; the partition is the record's own or
// the key's length modulo 3, offsets count per partition.
func (d *fakeDaemon) ack(m *Produce) *ProduceAck {
	d.mu.Lock()
	defer d.mu.Unlock()
	res := make([]RecordResult, len(m.Records))
	for i, r := range m.Records {
		p := int32(len(r.Key) % 3)
		if r.Partition != nil {
			p = *r.Partition
		}
		res[i] = RecordResult{Partition: p, Offset: d.offsets[p], Timestamp: -1, ErrorName: "NONE"}
		d.offsets[p]++
	}
	return &ProduceAck{Seq: m.Seq, Results: res}
}

func (d *fakeDaemon) serve(n int, conn net.Conn) {
	defer conn.Close()
	fr := NewFrameReader(conn)
	send := func(m Message) bool {
		frame, err := EncodeFrame(m)
		if err != nil {
			d.t.Errorf("fake daemon: %v", err)
			return false
		}
		_, err = conn.Write(frame)
		return err == nil
	}
	for {
		m, err := fr.Next()
		if err != nil {
			return
		}
		switch m := m.(type) {
		case *Hello:
			d.mu.Lock()
			d.hellos++
			d.mu.Unlock()
			var reply Message = &Welcome{Version: 1, Workers: 2, RequestRingBytes: 1 << 20, CompletionRingBytes: 1 << 16, ClientID: uint64(n + 1)}
			if d.hello != nil {
				if reply = d.hello(n); reply == nil {
					continue // no answer at all
				}
			}
			if !send(reply) {
				return
			}
			if e, ok := reply.(*ErrorReply); ok && e.Fatal {
				return
			}
		case *TopicLookup:
			d.mu.Lock()
			d.lookups[m.Topic]++
			parts, ok := d.topics[m.Topic]
			d.mu.Unlock()
			var reply Message = &ErrorReply{Code: 3, Name: "UNKNOWN_TOPIC_OR_PARTITION", Message: m.Topic}
			if ok {
				reply = &TopicInfo{Topic: m.Topic, TopicID: 1, Partitions: parts, Profile: "default",
					MaxRequestSize: 1 << 20, OnFull: "block", MaxBlockMS: 60000, BatchSize: 16384, LingerMS: 5}
			}
			if !send(reply) {
				return
			}
			if ok && d.afterLookup != nil && d.afterLookup(n) {
				return
			}
		case *Produce:
			d.mu.Lock()
			d.produces = append(d.produces, m)
			d.mu.Unlock()
			var reply Message
			hangUp := false
			switch {
			case d.produce != nil:
				reply, hangUp = d.produce(n, m)
			case m.Ack:
				reply = d.ack(m)
			}
			if reply != nil && !send(reply) {
				return
			}
			if hangUp {
				return
			}
		case *Flush:
			d.mu.Lock()
			d.flushes++
			failed := d.failed
			d.mu.Unlock()
			if !send(&FlushDone{Complete: true, Failed: failed}) {
				return
			}
		case *StatsRequest:
			if !send(&StatsReply{Stats: map[string]any{"connections": int8(1)}}) {
				return
			}
		case *Goodbye:
			d.mu.Lock()
			d.goodbyes++
			d.mu.Unlock()
			return
		default:
			d.t.Errorf("fake daemon: unexpected %s", m.MessageType())
			return
		}
	}
}

func (d *fakeDaemon) produced() []*Produce {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]*Produce(nil), d.produces...)
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func connect(t *testing.T, cfg Config) *Producer {
	t.Helper()
	p, err := Connect(testCtx(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = p.Close(ctx)
	})
	return p
}

func TestBatchesAreBoundedAndAcksReachTheirRecords(t *testing.T) {
	d := newFakeDaemon(t)
	cfg := d.config()
	cfg.BatchRecords = 7
	p := connect(t, cfg)
	ctx := testCtx(t)
	const n = 100
	futs := make([]Future, n)
	for i := range futs {
		var err error
		futs[i], err = p.Send(ctx, "t", Record{Key: make([]byte, i%3), Value: []byte(fmt.Sprint(i))})
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := p.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	next := map[int32]int64{}
	for i, f := range futs {
		md, err := f.Wait(ctx)
		if err != nil {
			t.Fatalf("record %d: %v", i, err)
		}
		// The fake daemon numbers each partition's records in the order it read them, so
		// Send's order per partition is kept exactly when these are consecutive.
		if md.Topic != "t" || md.Partition != int32(i%3) || md.Offset != next[md.Partition] {
			t.Fatalf("record %d: %+v, want partition %d offset %d", i, md, i%3, next[md.Partition])
		}
		next[md.Partition]++
	}
	seqs := map[uint64]bool{}
	total := 0
	for _, m := range d.produced() {
		if !m.Ack || seqs[m.Seq] || len(m.Records) > 7 || len(m.Records) == 0 {
			t.Fatalf("frame seq %d ack %v with %d records (seen: %v)", m.Seq, m.Ack, len(m.Records), seqs[m.Seq])
		}
		seqs[m.Seq] = true
		total += len(m.Records)
	}
	if total != n {
		t.Fatalf("%d records in frames, want %d", total, n)
	}
}

func TestLingerSendsAPartialBatch(t *testing.T) {
	d := newFakeDaemon(t)
	cfg := d.config()
	cfg.Linger = 30 * time.Millisecond
	p := connect(t, cfg)
	start := time.Now()
	f, err := p.Send(testCtx(t), "t", Record{Value: []byte("one")})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Wait(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	if waited := time.Since(start); waited < 30*time.Millisecond {
		t.Fatalf("acknowledged after %v, before the linger", waited)
	}
	if got := len(d.produced()); got != 1 {
		t.Fatalf("%d frames", got)
	}
}

func TestBatchBytesSplitFrames(t *testing.T) {
	d := newFakeDaemon(t)
	cfg := d.config()
	cfg.BatchBytes = 4096
	p := connect(t, cfg)
	ctx := testCtx(t)
	for i := 0; i < 10; i++ {
		if _, err := p.Send(ctx, "t", Record{Value: make([]byte, 1000)}); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	for _, m := range d.produced() {
		frame, _ := EncodeFrame(m)
		if len(frame) > 4096 {
			t.Fatalf("frame of %d bytes, batch bytes 4096", len(frame))
		}
	}
	if got := len(d.produced()); got < 3 {
		t.Fatalf("%d frames for 10 kB at 4 kB a frame", got)
	}
}

func TestUnknownTopicFailsSendAndIsNotCached(t *testing.T) {
	d := newFakeDaemon(t)
	p := connect(t, d.config())
	for i := 0; i < 2; i++ {
		_, err := p.Send(testCtx(t), "nope", Record{Value: []byte("x")})
		var e *Error
		if !errors.As(err, &e) || !errors.Is(err, ErrUnknownTopicOrPartition) || e.Fatal {
			t.Fatalf("send %d: %v", i, err)
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.lookups["nope"] != 2 {
		t.Fatalf("%d lookups of the unknown topic, want 2 (not cached)", d.lookups["nope"])
	}
	if len(d.produces) != 0 {
		t.Fatal("a Produce was sent for an unknown topic")
	}
}

func TestKnownTopicIsLookedUpOnce(t *testing.T) {
	d := newFakeDaemon(t)
	p := connect(t, d.config())
	var wg sync.WaitGroup
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := p.Send(testCtx(t), "t", Record{}); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.lookups["t"] != 1 {
		t.Fatalf("%d lookups", d.lookups["t"])
	}
}

// The size check is the daemon's (PROTOCOL.md, "Record size"): with max_request_size
// 1,048,576 and a 1-byte key, the largest value is 1,048,480 bytes.
func TestTooLargeRecordFailsBeforeSending(t *testing.T) {
	d := newFakeDaemon(t)
	p := connect(t, d.config())
	if _, err := p.Send(testCtx(t), "t", Record{Key: []byte("k"), Value: make([]byte, 1_048_480)}); err != nil {
		t.Fatalf("largest record: %v", err)
	}
	_, err := p.Send(testCtx(t), "t", Record{Key: []byte("k"), Value: make([]byte, 1_048_481)})
	if !errors.Is(err, ErrMessageTooLarge) {
		t.Fatalf("one byte more: %v", err)
	}
	_, err = p.Send(testCtx(t), "t", Record{Timestamp: time.UnixMilli(-5)})
	if err == nil {
		t.Fatal("a timestamp before the epoch was accepted")
	}
}

func TestRecordErrorsAreReportedPerRecord(t *testing.T) {
	d := newFakeDaemon(t)
	d.produce = func(_ int, m *Produce) (Message, bool) {
		ack := d.ack(m)
		ack.Results[0] = RecordResult{Partition: 2, Offset: -1, Timestamp: -1, ErrorCode: CodeBufferFull, ErrorName: "BUFFER_FULL"}
		return ack, false
	}
	p := connect(t, d.config())
	ctx := testCtx(t)
	bad, _ := p.Send(ctx, "t", Record{Value: []byte("a")})
	good, _ := p.Send(ctx, "t", Record{Value: []byte("b")})
	md, err := bad.Wait(ctx)
	if !errors.Is(err, ErrBufferFull) || !IsRetriable(err) || md.Partition != 2 || md.Offset != -1 {
		t.Fatalf("failed record: %+v, %v", md, err)
	}
	if _, err := good.Wait(ctx); err != nil {
		t.Fatalf("the other record of the frame: %v", err)
	}
}

func TestInFlightBoundBlocksOrFails(t *testing.T) {
	d := newFakeDaemon(t)
	release := make(chan struct{})
	d.produce = func(_ int, m *Produce) (Message, bool) {
		<-release
		return d.ack(m), false
	}
	cfg := d.config()
	cfg.MaxInFlightRecords = 2
	p := connect(t, cfg)
	ctx := testCtx(t)
	var futs []Future
	for i := 0; i < 2; i++ {
		f, err := p.Send(ctx, "t", Record{})
		if err != nil {
			t.Fatal(err)
		}
		futs = append(futs, f)
	}
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if _, err := p.Send(short, "t", Record{}); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("blocking send at the bound: %v", err)
	}
	if _, err := futs[0].Wait(short); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("waiting for a held ack: %v", err)
	}
	// A send that waits gets through once acks make room.
	done := make(chan error, 1)
	go func() {
		f, err := p.Send(ctx, "t", Record{})
		if err == nil {
			_, err = f.Wait(ctx)
		}
		done <- err
	}()
	time.Sleep(20 * time.Millisecond)
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	cfg.FailWhenFull = true
	d2 := newFakeDaemon(t)
	hold := make(chan struct{})
	defer close(hold)
	d2.produce = func(_ int, m *Produce) (Message, bool) { <-hold; return d2.ack(m), false }
	cfg.Dial = d2.dial
	p2 := connect(t, cfg)
	for i := 0; i < 2; i++ {
		if _, err := p2.Send(ctx, "t", Record{}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := p2.Send(ctx, "t", Record{}); !errors.Is(err, ErrInFlightFull) || !IsRetriable(err) {
		t.Fatalf("FailWhenFull: %v", err)
	}
}

func TestRefusedHelloIsReturnedByConnect(t *testing.T) {
	d := newFakeDaemon(t)
	d.hello = func(int) Message {
		return &ErrorReply{Code: CodeNotAllowed, Name: "NOT_ALLOWED", Message: "uid 1000", Fatal: true}
	}
	_, err := Connect(testCtx(t), d.config())
	var e *Error
	if !errors.Is(err, ErrNotAllowed) || !errors.As(err, &e) || !e.Fatal || e.Message != "uid 1000" {
		t.Fatalf("got %v", err)
	}
}

func TestConnectTimesOutWhenTheDaemonDoesNotAnswer(t *testing.T) {
	d := newFakeDaemon(t)
	d.hello = func(int) Message { return nil }
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := Connect(ctx, d.config())
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 2*time.Second {
		t.Fatalf("got %v after %v", err, time.Since(start))
	}
}

func TestNewerWelcomeVersionIsAProtocolError(t *testing.T) {
	d := newFakeDaemon(t)
	d.hello = func(int) Message { return &Welcome{Version: 2} }
	_, err := Connect(testCtx(t), d.config())
	var pe *ProtocolError
	if !errors.As(err, &pe) {
		t.Fatalf("got %v", err)
	}
}

// The connection drops without a word with a frame written and not acknowledged: that
// record fails with ErrConnectionLost (the daemon may have read it); the producer connects
// again, says Hello, refreshes its topic, and later records are delivered.
func TestHangUpFailsTheUnacknowledgedAndReconnects(t *testing.T) {
	d := newFakeDaemon(t)
	d.produce = func(n int, m *Produce) (Message, bool) {
		if n == 0 {
			return nil, true
		}
		return d.ack(m), false
	}
	cfg := d.config()
	causes := make(chan error, 10)
	cfg.OnDisconnect = func(cause error) { causes <- cause }
	p := connect(t, cfg)
	ctx := testCtx(t)
	lost, err := p.Send(ctx, "t", Record{Value: []byte("lost")})
	if err != nil {
		t.Fatal(err)
	}
	_, err = lost.Wait(ctx)
	var cl *ConnectionLostError
	if !errors.Is(err, ErrConnectionLost) || !errors.Is(err, ErrDaemonClosed) || !errors.As(err, &cl) || !IsRetriable(err) {
		t.Fatalf("record on the dropped connection: %v", err)
	}
	f, err := p.Send(ctx, "t", Record{Value: []byte("after")})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Wait(ctx); err != nil {
		t.Fatalf("record after the reconnect: %v", err)
	}
	if p.Reconnects() != 1 || p.Welcome().ClientID != 2 {
		t.Fatalf("reconnects %d, client id %d", p.Reconnects(), p.Welcome().ClientID)
	}
	if len(causes) != 1 || !errors.Is(<-causes, ErrDaemonClosed) {
		t.Fatalf("OnDisconnect called %d times, want once with ErrDaemonClosed", len(causes)+1)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.hellos != 2 || d.lookups["t"] != 2 {
		t.Fatalf("hellos %d, lookups %d: want 2 and 2 (re-Hello, re-lookup)", d.hellos, d.lookups["t"])
	}
}

// After SHUTTING_DOWN the frames the daemon left unanswered were never read (PROTOCOL.md,
// daemon shutdown): they go out again on the next connection, in their order, and succeed.
func TestShuttingDownResendsTheUnansweredFrames(t *testing.T) {
	d := newFakeDaemon(t)
	var first []*Produce
	d.produce = func(n int, m *Produce) (Message, bool) {
		if n > 0 {
			return d.ack(m), false
		}
		first = append(first, m)
		if len(first) < 3 {
			return nil, false // read, as far as the test goes, but answered below
		}
		return &ErrorReply{Code: CodeShuttingDown, Name: "SHUTTING_DOWN", Message: "SIGTERM", Fatal: true}, true
	}
	cfg := d.config()
	cfg.BatchRecords = 2
	p := connect(t, cfg)
	ctx := testCtx(t)
	var futs []Future
	for i := 0; i < 6; i++ {
		f, err := p.Send(ctx, "t", Record{Value: []byte{byte(i)}})
		if err != nil {
			t.Fatal(err)
		}
		futs = append(futs, f)
	}
	for i, f := range futs {
		if _, err := f.Wait(ctx); err != nil {
			t.Fatalf("record %d: %v", i, err)
		}
	}
	var again []byte
	for _, m := range d.produced()[3:] {
		for _, r := range m.Records {
			again = append(again, r.Value[0])
		}
	}
	if string(again) != "\x00\x01\x02\x03\x04\x05" || p.Reconnects() != 1 {
		t.Fatalf("sent again after SHUTTING_DOWN: %v (want 0..5 in order); reconnects %d", again, p.Reconnects())
	}
}

// Records still in an open batch when the connection drops were never written: they go out
// on the next connection and succeed, once.
func TestUnwrittenRecordsSurviveAReconnect(t *testing.T) {
	d := newFakeDaemon(t)
	d.afterLookup = func(n int) bool { return n == 0 } // hang up right after the first TopicInfo
	cfg := d.config()
	cfg.Linger = 200 * time.Millisecond
	p := connect(t, cfg)
	ctx := testCtx(t)
	var futs []Future
	for i := 0; i < 5; i++ {
		f, err := p.Send(ctx, "t", Record{Value: []byte{byte(i)}})
		if err != nil {
			t.Fatal(err)
		}
		futs = append(futs, f)
	}
	for i, f := range futs {
		if _, err := f.Wait(ctx); err != nil {
			t.Fatalf("record %d: %v", i, err)
		}
	}
	seen := 0
	for _, m := range d.produced() {
		seen += len(m.Records)
	}
	if seen != 5 || p.Reconnects() != 1 {
		t.Fatalf("%d records reached the daemon (want 5, once each); %d reconnects", seen, p.Reconnects())
	}
}

func TestReconnectGivesUpAfterItsTimeout(t *testing.T) {
	d := newFakeDaemon(t)
	var dropped atomic.Bool
	d.produce = func(n int, m *Produce) (Message, bool) {
		d.setRefuse(true)
		dropped.Store(true)
		return nil, true
	}
	cfg := d.config()
	cfg.ReconnectTimeout = 150 * time.Millisecond
	p := connect(t, cfg)
	ctx := testCtx(t)
	f, _ := p.Send(ctx, "t", Record{})
	if _, err := f.Wait(ctx); !errors.Is(err, ErrConnectionLost) {
		t.Fatalf("written record: %v", err)
	}
	// Sent while reconnecting: queued, then failed when the producer gives up.
	queued, err := p.Send(ctx, "t", Record{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := queued.Wait(ctx); !errors.Is(err, ErrClosed) {
		t.Fatalf("queued record: %v", err)
	}
	if _, err := p.Send(ctx, "t", Record{}); !errors.Is(err, ErrClosed) {
		t.Fatalf("send after giving up: %v", err)
	}
	if !dropped.Load() {
		t.Fatal("the fake daemon never dropped the connection")
	}
}

func TestFatalErrorFailsTheProducer(t *testing.T) {
	d := newFakeDaemon(t)
	d.produce = func(int, *Produce) (Message, bool) {
		return &ErrorReply{Code: CodeBadFrame, Name: "BAD_FRAME", Message: "bad", Fatal: true}, true
	}
	p := connect(t, d.config())
	ctx := testCtx(t)
	f, _ := p.Send(ctx, "t", Record{})
	if _, err := f.Wait(ctx); !errors.Is(err, ErrConnectionLost) || !errors.Is(err, ErrBadFrame) {
		t.Fatalf("record: %v", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, err := p.Send(ctx, "t", Record{})
		if errors.Is(err, ErrClosed) && errors.Is(err, ErrBadFrame) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("send after BAD_FRAME: %v", err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if p.Reconnects() != 0 {
		t.Fatal("reconnected after a fatal BAD_FRAME")
	}
	if err := p.Close(ctx); !errors.Is(err, ErrBadFrame) {
		t.Fatalf("Close: %v", err)
	}
}

func TestCloseFlushesSaysGoodbyeAndRefusesSends(t *testing.T) {
	d := newFakeDaemon(t)
	p := connect(t, Config{Dial: d.dial, Linger: time.Hour})
	ctx := testCtx(t)
	f, _ := p.Send(ctx, "t", Record{})
	if err := p.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Wait(ctx); err != nil {
		t.Fatalf("record sent before Close: %v", err)
	}
	if _, err := p.Send(ctx, "t", Record{}); !errors.Is(err, ErrClosed) {
		t.Fatalf("send after Close: %v", err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.goodbyes != 1 {
		t.Fatalf("%d Goodbyes", d.goodbyes)
	}
}

func TestCloseGivesUpWhenItsContextEnds(t *testing.T) {
	d := newFakeDaemon(t)
	hold := make(chan struct{})
	defer close(hold)
	d.produce = func(int, *Produce) (Message, bool) { <-hold; return nil, false }
	p := connect(t, d.config())
	f, _ := p.Send(testCtx(t), "t", Record{})
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := p.Close(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Close: %v", err)
	}
	if _, err := f.Wait(testCtx(t)); !errors.Is(err, ErrConnectionLost) {
		t.Fatalf("unacknowledged record after Close gave up: %v", err)
	}
}

func TestSendFuncCallsBackOnce(t *testing.T) {
	d := newFakeDaemon(t)
	p := connect(t, d.config())
	ctx := testCtx(t)
	var calls atomic.Int32
	got := make(chan RecordMetadata, 2)
	for i := 0; i < 2; i++ {
		err := p.SendFunc(ctx, "t", Record{Key: []byte("k")}, func(md RecordMetadata, err error) {
			calls.Add(1)
			if err != nil {
				t.Error(err)
			}
			got <- md
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := p.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	a, b := <-got, <-got
	if calls.Load() != 2 || a.Partition != 1 || b.Partition != 1 || a.Offset == b.Offset {
		t.Fatalf("calls %d, %+v %+v", calls.Load(), a, b)
	}
}

func TestStats(t *testing.T) {
	d := newFakeDaemon(t)
	p := connect(t, d.config())
	stats, err := p.Stats(testCtx(t))
	if err != nil || stats["connections"] != int8(1) {
		t.Fatalf("%v %v", stats, err)
	}
}

func TestFireAndForgetIsNeverAnsweredAndFlushAsksTheDaemon(t *testing.T) {
	d := newFakeDaemon(t)
	d.failed = 2
	p := connect(t, d.config())
	ctx := testCtx(t)
	acked, err := p.Send(ctx, "t", Record{Value: []byte("acked")})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 10; i++ {
		if err := p.Produce(ctx, "t", Record{Value: []byte{byte(i)}}); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := acked.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	noAck := 0
	for _, m := range d.produced() {
		if !m.Ack {
			if m.Seq != 0 {
				t.Fatalf("fire-and-forget frame with seq %d", m.Seq)
			}
			noAck += len(m.Records)
		} else if len(m.Records) != 1 {
			t.Fatalf("the acknowledged frame holds %d records", len(m.Records))
		}
	}
	d.mu.Lock()
	flushes := d.flushes
	d.mu.Unlock()
	if noAck != 10 || flushes != 1 || p.FlushFailed() != 2 {
		t.Fatalf("%d fire-and-forget records, %d Flush requests, FlushFailed %d", noAck, flushes, p.FlushFailed())
	}
	// Nothing fire-and-forget since: the next Flush does not ask the daemon.
	if err := p.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.flushes != 1 {
		t.Fatalf("%d Flush requests", d.flushes)
	}
}

// The daemon says SHUTTING_DOWN and hangs up while the producer is in the middle of writing a
// large frame: the write fails first, but the cause is the daemon's, and the unanswered frames
// go out again on the next connection instead of failing as lost.
func TestShuttingDownDuringAWriteStillResends(t *testing.T) {
	d := newFakeDaemon(t)
	d.produce = func(n int, m *Produce) (Message, bool) {
		if n == 0 {
			return &ErrorReply{Code: CodeShuttingDown, Name: "SHUTTING_DOWN", Fatal: true}, true
		}
		return d.ack(m), false
	}
	cfg := d.config()
	cfg.BatchRecords = 1
	var causes []error
	cfg.OnDisconnect = func(cause error) { causes = append(causes, cause) }
	p := connect(t, cfg)
	ctx := testCtx(t)
	var futs []Future
	for i := 0; i < 4; i++ {
		// Larger than the fake daemon's read buffer: the second frame is still being written
		// when it answers the first and hangs up.
		f, err := p.Send(ctx, "t", Record{Value: make([]byte, 200_000)})
		if err != nil {
			t.Fatal(err)
		}
		futs = append(futs, f)
	}
	for i, f := range futs {
		if _, err := f.Wait(ctx); err != nil {
			t.Fatalf("record %d: %v", i, err)
		}
	}
	if len(causes) != 1 || !errors.Is(causes[0], ErrShuttingDown) {
		t.Fatalf("disconnect causes %v, want one SHUTTING_DOWN", causes)
	}
}

// Send encodes the record before it returns: the caller's buffers may be reused at once, and
// what the daemon reads is what was sent.
func TestSendCopiesTheRecordsBytes(t *testing.T) {
	d := newFakeDaemon(t)
	cfg := d.config()
	cfg.Linger = time.Hour // the batch stays open until Flush, long after the buffers changed
	p := connect(t, cfg)
	ctx := testCtx(t)
	key, value, hval := []byte("key"), []byte("value"), []byte("hv")
	if _, err := p.Send(ctx, "t", Record{Key: key, Value: value, Headers: []Header{{"h", hval}}}); err != nil {
		t.Fatal(err)
	}
	copy(key, "KEY")
	copy(value, "VALUE")
	copy(hval, "HV")
	if err := p.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	frames := d.produced()
	if len(frames) != 1 || len(frames[0].Records) != 1 {
		t.Fatalf("frames: %+v", frames)
	}
	r := frames[0].Records[0]
	if string(r.Key) != "key" || string(r.Value) != "value" || string(r.Headers[0].Value) != "hv" {
		t.Fatalf("the daemon read %q %q %q", r.Key, r.Value, r.Headers[0].Value)
	}
}
