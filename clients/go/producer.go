package sluice

import (
	"context"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Defaults of Config's zero fields.
const (
	DefaultSocketPath         = "/run/sluice/sluice.sock"
	DefaultLinger             = 5 * time.Millisecond
	DefaultBatchRecords       = 1000
	DefaultBatchBytes         = 1 << 20
	DefaultMaxInFlightRecords = 100_000
	DefaultMaxInFlightBytes   = 64 << 20
	DefaultReconnectTimeout   = 60 * time.Second
)

// NoLinger as Config.Linger closes a batch as soon as the goroutine that sends it runs: the
// records that arrived meanwhile share a frame, no more waiting than that.
const NoLinger = time.Duration(-1)

// NoReconnect as Config.ReconnectTimeout fails the producer when its connection drops.
const NoReconnect = time.Duration(-1)

// defaultFlushTimeout is the Flush request's timeout_ms when Flush's context has no deadline.
const defaultFlushTimeout = 5 * time.Minute

// Config configures a Producer. The zero value of every field but SocketPath means its
// default.
type Config struct {
	// SocketPath is the daemon's Unix socket (default $SLUICE_SOCKET, else
	// DefaultSocketPath).
	SocketPath string
	// ClientName appears in the daemon's logs and stats (default "sluice-go").
	ClientName string
	// Linger is how long a topic's batch waits for more records before it is sent
	// (default DefaultLinger; NoLinger for no waiting).
	Linger time.Duration
	// BatchRecords and BatchBytes bound one Produce frame (defaults DefaultBatchRecords,
	// DefaultBatchBytes; at most MaxProduceRecords and MaxFrameBytes). A full batch is sent
	// at once.
	BatchRecords int
	BatchBytes   int
	// MaxInFlightRecords and MaxInFlightBytes bound the records sent but not yet complete
	// (defaults DefaultMaxInFlightRecords, DefaultMaxInFlightBytes): the producer's memory.
	// A record larger than MaxInFlightBytes is let through alone.
	MaxInFlightRecords int
	MaxInFlightBytes   int
	// FailWhenFull makes Send return ErrInFlightFull at once when a bound is reached,
	// instead of waiting for room (until its context ends).
	FailWhenFull bool
	// ReconnectTimeout is how long the producer tries to reconnect after its connection
	// drops before it fails for good (default DefaultReconnectTimeout; NoReconnect for
	// none).
	ReconnectTimeout time.Duration
	// Dial opens a connection to the daemon (default: the Unix socket at SocketPath).
	Dial func(ctx context.Context) (net.Conn, error)
	// OnDisconnect, when set, is called (on the producer's sending goroutine) each time a
	// connection ends other than by Close, with the cause: an *Error such as
	// SHUTTING_DOWN, ErrDaemonClosed, an I/O or protocol error. The producer then reconnects
	// or, for a fatal cause, fails. For logs; it must return quickly.
	OnDisconnect func(cause error)
}

func (c Config) withDefaults() Config {
	if c.SocketPath == "" {
		c.SocketPath = os.Getenv("SLUICE_SOCKET")
		if c.SocketPath == "" {
			c.SocketPath = DefaultSocketPath
		}
	}
	if c.ClientName == "" {
		c.ClientName = "sluice-go"
	}
	if c.Linger == 0 {
		c.Linger = DefaultLinger
	}
	if c.Linger < 0 {
		c.Linger = 0
	}
	if c.BatchRecords <= 0 {
		c.BatchRecords = DefaultBatchRecords
	}
	c.BatchRecords = min(c.BatchRecords, MaxProduceRecords)
	if c.BatchBytes <= 0 {
		c.BatchBytes = DefaultBatchBytes
	}
	if c.BatchBytes > MaxFrameBytes {
		c.BatchBytes = MaxFrameBytes
	}
	if c.MaxInFlightRecords <= 0 {
		c.MaxInFlightRecords = DefaultMaxInFlightRecords
	}
	if c.MaxInFlightBytes <= 0 {
		c.MaxInFlightBytes = DefaultMaxInFlightBytes
	}
	if c.ReconnectTimeout == 0 {
		c.ReconnectTimeout = DefaultReconnectTimeout
	}
	if c.Dial == nil {
		path := c.SocketPath
		c.Dial = func(ctx context.Context) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}
	}
	return c
}

// RecordMetadata is where a record was written.
type RecordMetadata struct {
	Topic     string
	Partition int32 // -1 when the record failed before a partition was chosen
	Offset    int64 // -1 on failure, and for profiles with acks=0
	Timestamp int64 // ms since the epoch as the daemon reported it; -1 when unknown
}

// Future is the outcome of one sent record. Its zero value is not usable.
type Future struct {
	b *batch
	i int
}

// Done is closed when the record's outcome is known.
func (f Future) Done() <-chan struct{} { return f.b.done }

// Wait returns the record's metadata once it is acknowledged, or its error: an *Error the
// daemon reported (Kafka's or Sluice's code), ErrConnectionLost (the outcome is unknown), or
// ErrClosed. If ctx ends first, it returns ctx.Err() and the record stays in flight.
func (f Future) Wait(ctx context.Context) (RecordMetadata, error) {
	select {
	case <-f.b.done:
		return f.b.result(f.i)
	case <-ctx.Done():
		return RecordMetadata{Topic: f.b.topic, Partition: -1, Offset: -1, Timestamp: -1}, ctx.Err()
	}
}

// batch is the records of one topic that travel in one Produce frame, and their outcome.
type batch struct {
	topic string
	ack   bool // acknowledged (Send) or fire-and-forget (Produce)
	// The records, encoded as Send took them (Rec maps back to back, appendRecord): the
	// frame's middle part. Kept until the outcome: after SHUTTING_DOWN the batch is sent again.
	enc    []byte
	closed bool // no longer open: in the queue or written (p.mu)
	n      int  // records
	bytes  int  // sum of recordSizeBound of its records
	// futures: Send handed out a Future, which may read the results after the outcome; else
	// the results are only the callbacks' and are not kept.
	futures bool
	cbs     []func(RecordMetadata, error)
	timer   *time.Timer
	done    chan struct{}
	// Written once, before done is closed.
	results []RecordResult
	err     error
}

func (b *batch) result(i int) (RecordMetadata, error) {
	if b.err != nil {
		return RecordMetadata{Topic: b.topic, Partition: -1, Offset: -1, Timestamp: -1}, b.err
	}
	r := &b.results[i]
	md := RecordMetadata{Topic: b.topic, Partition: r.Partition, Offset: r.Offset, Timestamp: r.Timestamp}
	if r.ErrorCode != 0 {
		return md, errorOf(r)
	}
	return md, nil
}

// request is a TopicLookup or StatsRequest waiting for its reply; done gets the reply or the
// error (a non-fatal ErrorReply as *Error). Both are safe to ask again, so a request whose
// connection dropped is sent again on the next one.
type request struct {
	msg  Message
	done func(Message, error)
}

// topicEntry is a topic's cached TopicInfo, or the lookup in progress.
type topicEntry struct {
	ready chan struct{} // closed when the first lookup answered
	info  *TopicInfo
	err   error
}

// Producer sends records to a Sluice daemon over its socket. It is safe for concurrent use.
//
// Policies:
//
//   - Batching: each topic has one open batch (and one of fire-and-forget records); it is
//     closed after Config.Linger, or when it holds Config.BatchRecords records or
//     Config.BatchBytes bytes, and sent as one Produce frame, with ack=true and a sequence
//     number unique for the producer's lifetime unless it is fire-and-forget. Frames
//     go out in the order their batches closed, so the records of one partition keep Send's
//     order (as long as no connection drops in between).
//   - Outcomes: the daemon answers each frame with a ProduceAck once all its records are
//     complete; each record's Future gets its RecordMetadata or its *Error.
//   - Memory: at most Config.MaxInFlightRecords records (and MaxInFlightBytes bytes) are
//     between Send and their outcome; Send waits for room, or fails with ErrInFlightFull
//     under Config.FailWhenFull.
//   - Reconnection: when the connection drops, the producer connects again, re-says Hello
//     and refreshes its topics; Send keeps accepting meanwhile. Records not yet written stay
//     queued and go out on the next connection, so they are neither lost nor duplicated. When
//     the daemon said SHUTTING_DOWN first, the frames it left unanswered were never read
//     (docs/PROTOCOL.md: it answers every frame it read before that), so they are sent again
//     too. After any other drop, records whose frame was written and not acknowledged fail
//     with a ConnectionLostError: the daemon may have read them, so sending them again may
//     duplicate them. After Config.ReconnectTimeout without a connection the producer fails
//     for good: every queued record and later Send fail with ErrClosed.
//   - Fatal errors other than SHUTTING_DOWN (NOT_ALLOWED, UNSUPPORTED_PROTOCOL_VERSION,
//     BAD_FRAME, UNEXPECTED_MESSAGE) and protocol errors fail the producer at once: they
//     would only repeat.
type Producer struct {
	cfg Config

	mu       sync.Mutex
	budget   budget
	infos    atomic.Pointer[map[string]*TopicInfo] // the known topics, copied on write: Send reads it without a lock
	lastInfo atomic.Pointer[TopicInfo]             // the latest one Send found there: most Sends are to it again
	last     *batch                                // the open batch the latest Send added to
	topics   map[string]*topicEntry
	open     map[batchKey]*batch
	sizeHint map[batchKey]int // encoded bytes of each key's last batch
	spare    [][]byte         // written fire-and-forget batches' buffers, for new batches
	queue    []*batch         // closed, not yet written, in order
	ctrl     []*request
	inflight map[uint64]*batch // written, waiting for the ProduceAck, by seq
	pending  map[*batch]struct{}
	seq      uint64
	// Fire-and-forget records were written since the last Flush request went out: the next
	// Flush asks the daemon (FlushDone) rather than only waiting for acknowledgements.
	unflushed bool
	closing   bool
	failed    error // what Send returns once the producer is over (wraps ErrClosed)
	cause     error // why it is over, when that is not Close
	welcome   *Welcome
	current   *session // the latest connection

	wake       chan struct{} // a batch closed or a request queued
	goodbye    chan struct{} // closed by Close once its flush is over
	abort      chan struct{} // closed by Close when its context ends
	stopped    chan struct{} // closed when the sending goroutine has returned
	byeOnce    sync.Once
	abortOnce  sync.Once
	reconnects atomic.Int64
	// Records the daemon counted as failed in its FlushDone answers.
	flushFailed atomic.Uint64
}

// batchKey: a topic's acknowledged and fire-and-forget records travel in separate frames.
type batchKey struct {
	topic string
	ack   bool
}

// Connect says Hello to the daemon and returns a Producer once it answered Welcome. ctx
// bounds the connection and the handshake only. A refusal is an *Error (NOT_ALLOWED,
// UNSUPPORTED_PROTOCOL_VERSION, ...).
func Connect(ctx context.Context, cfg Config) (*Producer, error) {
	cfg = cfg.withDefaults()
	p := &Producer{
		cfg:      cfg,
		budget:   budget{maxRecords: cfg.MaxInFlightRecords, maxBytes: cfg.MaxInFlightBytes},
		topics:   make(map[string]*topicEntry),
		open:     make(map[batchKey]*batch),
		sizeHint: make(map[batchKey]int),
		inflight: make(map[uint64]*batch),
		pending:  make(map[*batch]struct{}),
		wake:     make(chan struct{}, 1),
		goodbye:  make(chan struct{}),
		abort:    make(chan struct{}),
		stopped:  make(chan struct{}),
	}
	s, err := p.dial(ctx)
	if err != nil {
		return nil, err
	}
	go p.run(s)
	return p, nil
}

// Welcome returns the daemon's answer to the latest Hello (its client id, for the logs).
func (p *Producer) Welcome() Welcome {
	p.mu.Lock()
	defer p.mu.Unlock()
	return *p.welcome
}

// Reconnects returns how many times the producer connected again after a drop.
func (p *Producer) Reconnects() int64 { return p.reconnects.Load() }

// Send queues rec for topic and returns its Future. ctx bounds only what Send waits for: the
// topic's first lookup and room under the in-flight bounds; use Future.Wait for the outcome.
// An unknown topic or a record larger than the topic's max_request_size fails here with its
// *Error, before anything is sent.
func (p *Producer) Send(ctx context.Context, topic string, rec Record) (Future, error) {
	return p.send(ctx, topic, &rec, nil, true)
}

// Produce sends rec fire-and-forget: in Produce frames with ack=false, which the daemon never
// answers. Nothing is kept once the frame is written; the daemon counts the record's failure
// in its stats and in the next FlushDone (see FlushFailed), and Flush waits until the daemon
// has completed it. A record whose frame was in flight when the connection dropped is
// neither reported nor sent again (its outcome is unknown). Errors are Send's: refused
// before anything is sent.
func (p *Producer) Produce(ctx context.Context, topic string, rec Record) error {
	_, err := p.send(ctx, topic, &rec, nil, false)
	return err
}

// FlushFailed returns how many records the daemon reported failed in its FlushDone answers to
// this producer's Flushes: the fire-and-forget records' failures (acknowledged records'
// failures, counted there too, also came with their outcomes).
func (p *Producer) FlushFailed() uint64 { return p.flushFailed.Load() }

// SendFunc is Send with a callback instead of a Future: cb gets the record's outcome, on the
// producer's reading goroutine, so it must return quickly and must not wait for the producer
// (a Send that waits for room would wait forever: the outcomes that make room come on that
// goroutine). When SendFunc returns an error, cb is not called. Flush returns after the
// callbacks of the records it waited for have run.
func (p *Producer) SendFunc(ctx context.Context, topic string, rec Record, cb func(RecordMetadata, error)) error {
	_, err := p.send(ctx, topic, &rec, cb, true)
	return err
}

func (p *Producer) send(ctx context.Context, topic string, rec *Record, cb func(RecordMetadata, error), ack bool) (Future, error) {
	if err := ctx.Err(); err != nil {
		return Future{}, err
	}
	info := p.knownInfo(topic)
	if info == nil {
		var err error
		if info, err = p.Lookup(ctx, topic); err != nil {
			return Future{}, err
		}
	}
	if err := checkRecord(topic, rec, info); err != nil {
		return Future{}, err
	}
	size := recordSizeBound(rec)
	p.mu.Lock()
	for {
		if err := p.unusableLocked(); err != nil {
			p.mu.Unlock()
			return Future{}, err
		}
		if p.budget.take(size) {
			break
		}
		if p.cfg.FailWhenFull {
			p.mu.Unlock()
			return Future{}, ErrInFlightFull
		}
		room := p.budget.wait()
		p.mu.Unlock()
		select {
		case <-room:
		case <-ctx.Done():
			return Future{}, ctx.Err()
		}
		p.mu.Lock()
	}
	limit := p.cfg.BatchBytes - produceOverheadBound(topic)
	key := batchKey{topic, ack}
	b := p.last // most Sends go where the previous one went: no map lookup then
	if b == nil || b.closed || b.ack != ack || b.topic != topic {
		b = p.open[key]
	}
	if b != nil && b.bytes+size > limit {
		p.closeBatchLocked(b)
		b = nil
	}
	if b == nil {
		b = p.openBatchLocked(key)
	}
	enc, err := appendRecord(b.enc, rec)
	if err != nil { // checkRecord refused what appendRecord refuses: not reached
		p.budget.release(1, size)
		p.mu.Unlock()
		return Future{}, err
	}
	b.enc = enc
	p.last = b
	i := b.n
	b.n++
	b.bytes += size
	if cb != nil {
		if b.cbs == nil {
			b.cbs = make([]func(RecordMetadata, error), i, i+1)
		}
		b.cbs = append(b.cbs[:i], cb)
	} else {
		b.futures = ack
		if b.cbs != nil {
			b.cbs = append(b.cbs, nil)
		}
	}
	if b.n >= p.cfg.BatchRecords || b.bytes >= limit {
		p.closeBatchLocked(b)
	}
	p.mu.Unlock()
	return Future{b: b, i: i}, nil
}

// openBatchLocked opens the batch of key, its buffer sized like the key's previous batch (a
// busy topic's buffers do not grow by doubling, an idle one's do not hold room they never
// use) or a spare one (p.mu held).
func (p *Producer) openBatchLocked(key batchKey) *batch {
	var buf []byte
	if n := len(p.spare); n > 0 {
		buf, p.spare = p.spare[n-1], p.spare[:n-1]
	} else {
		buf = make([]byte, 0, p.sizeHint[key])
	}
	b := &batch{topic: key.topic, ack: key.ack, done: make(chan struct{}), enc: buf}
	p.open[key] = b
	p.pending[b] = struct{}{}
	b.timer = time.AfterFunc(p.cfg.Linger, func() { p.lingerOver(b) })
	return b
}

// knownInfo returns the topic's TopicInfo if it was looked up, without a lock.
func (p *Producer) knownInfo(topic string) *TopicInfo {
	if info := p.lastInfo.Load(); info != nil && info.Topic == topic {
		return info
	}
	if m := p.infos.Load(); m != nil {
		if info := (*m)[topic]; info != nil {
			if info.Topic == topic { // the daemon's answer names the topic looked up
				p.lastInfo.Store(info)
				if p.infos.Load() != m { // setInfoLocked ran meanwhile: info may be stale
					p.lastInfo.Store(nil)
				}
			}
			return info
		}
	}
	return nil
}

// setInfoLocked records a topic's TopicInfo, for Lookup and for knownInfo (p.mu held).
func (p *Producer) setInfoLocked(topic string, e *topicEntry, info *TopicInfo) {
	e.info = info
	m := make(map[string]*TopicInfo, len(p.topics))
	if old := p.infos.Load(); old != nil {
		for k, v := range *old {
			m[k] = v
		}
	}
	m[topic] = info
	p.infos.Store(&m)
	p.lastInfo.Store(nil) // it may be this topic's previous TopicInfo
}

// checkRecord refuses what the daemon would refuse for sure, before the record is queued.
func checkRecord(topic string, rec *Record, info *TopicInfo) error {
	if rec.Partition != nil && *rec.Partition < 0 {
		return fmt.Errorf("sluice: partition %d is negative", *rec.Partition)
	}
	if !rec.Timestamp.IsZero() && rec.Timestamp.UnixMilli() < 0 {
		return fmt.Errorf("sluice: timestamp %v is before the epoch", rec.Timestamp)
	}
	body := recordBodySize(rec)
	if int64(body) > int64(info.MaxRequestSize)-batchOverhead || recordSizeBound(rec)+produceOverheadBound(topic) > MaxFrameBytes {
		return &Error{Code: CodeMessageTooLarge, Name: "MESSAGE_TOO_LARGE",
			Message: fmt.Sprintf("record body of %d bytes; the topic's max_request_size is %d (%d bytes for the batch)",
				body, info.MaxRequestSize, batchOverhead)}
	}
	return nil
}

func (p *Producer) unusableLocked() error {
	if p.failed != nil {
		return p.failed
	}
	if p.closing {
		return ErrClosed
	}
	return nil
}

// closeBatchLocked moves b from the open batches to the queue (p.mu held).
func (p *Producer) closeBatchLocked(b *batch) {
	b.closed = true
	if key := (batchKey{b.topic, b.ack}); p.open[key] == b {
		delete(p.open, key)
		p.sizeHint[key] = len(b.enc)
	}
	b.timer.Stop()
	p.queue = append(p.queue, b)
	p.signal()
}

func (p *Producer) lingerOver(b *batch) {
	p.mu.Lock()
	if p.open[batchKey{b.topic, b.ack}] == b {
		p.closeBatchLocked(b)
	}
	p.mu.Unlock()
}

func (p *Producer) signal() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// Lookup returns the topic's TopicInfo, from the cache when the topic was looked up before.
// An unknown topic is an *Error (UNKNOWN_TOPIC_OR_PARTITION); failures are not cached.
func (p *Producer) Lookup(ctx context.Context, topic string) (*TopicInfo, error) {
	p.mu.Lock()
	if err := p.unusableLocked(); err != nil {
		p.mu.Unlock()
		return nil, err
	}
	e := p.topics[topic]
	if e != nil && e.info != nil {
		info := e.info
		p.mu.Unlock()
		return info, nil
	}
	if e == nil {
		e = &topicEntry{ready: make(chan struct{})}
		p.topics[topic] = e
		p.ctrl = append(p.ctrl, &request{msg: &TopicLookup{Topic: topic}, done: func(m Message, err error) {
			p.looked(topic, e, m, err)
		}})
		p.signal()
	}
	p.mu.Unlock()
	select {
	case <-e.ready:
		return e.info, e.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (p *Producer) looked(topic string, e *topicEntry, m Message, err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if info, ok := m.(*TopicInfo); ok && err == nil {
		p.setInfoLocked(topic, e, info)
	} else {
		if err == nil {
			err = protocolErrorf("%s in answer to TopicLookup", m.MessageType())
		}
		e.err = err
		if p.topics[topic] == e {
			delete(p.topics, topic)
		}
	}
	close(e.ready)
}

// Stats returns the daemon's counters (StatsRequest).
func (p *Producer) Stats(ctx context.Context) (map[string]any, error) {
	m, err := p.ask(ctx, &StatsRequest{})
	if err != nil {
		return nil, err
	}
	reply, ok := m.(*StatsReply)
	if !ok {
		return nil, protocolErrorf("%s in answer to StatsRequest", m.MessageType())
	}
	return reply.Stats, nil
}

// ask sends a request and waits for its reply (a non-fatal ErrorReply is an *Error), or for
// ctx to end. Close does not stop it: its own Flush asks too.
func (p *Producer) ask(ctx context.Context, msg Message) (Message, error) {
	type answer struct {
		m   Message
		err error
	}
	ch := make(chan answer, 1)
	p.mu.Lock()
	if p.failed != nil {
		p.mu.Unlock()
		return nil, p.failed
	}
	p.ctrl = append(p.ctrl, &request{msg: msg, done: func(m Message, err error) { ch <- answer{m, err} }})
	p.signal()
	p.mu.Unlock()
	select {
	case a := <-ch:
		return a.m, a.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Flush sends every open batch at once and waits until every record sent before the call
// has its outcome, or ctx ends (then it returns ctx.Err()). The outcomes themselves are the
// Futures'; Flush does not fail for a failed record. When fire-and-forget records (Produce)
// were written since the last Flush, it then asks the daemon to flush (a Flush request,
// bounded by ctx's deadline or defaultFlushTimeout) and adds the FlushDone's failed count to
// FlushFailed; a FlushDone that is not complete is an error.
func (p *Producer) Flush(ctx context.Context) error {
	p.mu.Lock()
	for _, b := range p.open {
		p.closeBatchLocked(b)
	}
	waits := make([]*batch, 0, len(p.pending))
	for b := range p.pending {
		waits = append(waits, b)
	}
	p.mu.Unlock()
	for _, b := range waits {
		select {
		case <-b.done:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	p.mu.Lock()
	ask := p.unflushed
	p.unflushed = false
	p.mu.Unlock()
	if !ask {
		return nil
	}
	timeout := defaultFlushTimeout
	if deadline, ok := ctx.Deadline(); ok {
		timeout = max(time.Until(deadline), time.Millisecond)
	}
	m, err := p.ask(ctx, &Flush{TimeoutMS: uint64(timeout.Milliseconds())})
	if err != nil {
		return err
	}
	done, ok := m.(*FlushDone)
	if !ok {
		return protocolErrorf("%s in answer to Flush", m.MessageType())
	}
	p.flushFailed.Add(done.Failed)
	if !done.Complete {
		return fmt.Errorf("sluice: the daemon's flush timed out with %d records pending", done.Pending)
	}
	return nil
}

// Close flushes (see Flush), says Goodbye, waits for the daemon to close the connection (at
// most 10 s) and returns. When ctx ends first, the connection is closed at once: records whose frame was
// written fail with a ConnectionLostError, the others with ErrClosed, and Close returns
// ctx.Err(). Send fails with ErrClosed once Close has begun. Close returns the producer's
// earlier failure, if it had failed for good.
func (p *Producer) Close(ctx context.Context) error {
	p.mu.Lock()
	p.closing = true
	p.mu.Unlock()
	err := p.Flush(ctx)
	p.byeOnce.Do(func() { close(p.goodbye) })
	if err != nil {
		p.giveUp()
	}
	select {
	case <-p.stopped:
	case <-ctx.Done():
		p.giveUp()
		<-p.stopped
		if err == nil {
			err = ctx.Err()
		}
	}
	if err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cause
}

// giveUp ends Close's wait: the connection is closed at once (a write blocked by a daemon
// that stopped reading returns) and reconnecting stops.
func (p *Producer) giveUp() {
	p.abortOnce.Do(func() { close(p.abort) })
	p.mu.Lock()
	s := p.current
	p.mu.Unlock()
	if s != nil {
		_ = s.conn.Close()
	}
}
