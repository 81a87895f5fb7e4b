package sluice

// The producer's connection to the daemon: the handshake, the reading goroutine that settles
// batches from ProduceAcks and answers requests in order, the sending goroutine that writes
// requests and batches, and what happens when a connection ends (resend, fail, reconnect).

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"sync"
	"time"
)

// goodbyeTimeout bounds Close's wait for the daemon to hang up after Goodbye (it does at once
// when nothing is pending, which Close's flush made sure of), whatever Close's context.
const goodbyeTimeout = 10 * time.Second

// readerGrace bounds how long a failed write waits for the reading goroutine to read what the
// daemon sent before it hung up: its last frame (a fatal ErrorReply such as SHUTTING_DOWN)
// says why, and decides what happens to the frames it left unanswered.
const readerGrace = 2 * time.Second

// writeBufferBytes is the buffer in front of the socket: small frames written in a row go
// out in one write.
const writeBufferBytes = 256 * 1024

// maxSpareBuffers bounds the written fire-and-forget batches' buffers kept for new batches.
const maxSpareBuffers = 4

// Reconnect backoff: the first retry comes soon (a restarting daemon is back in well under a
// second), later ones no more often than once a second.
const (
	reconnectFirstBackoff = 20 * time.Millisecond
	reconnectMaxBackoff   = time.Second
)

// session is one connection to the daemon, from its Welcome to its end.
type session struct {
	conn    net.Conn
	frames  *FrameReader
	welcome *Welcome
	mu      sync.Mutex
	waiting []*request    // written, in order; the daemon answers them in order
	dead    chan struct{} // closed when the reader has ended
	err     error         // why, set before dead is closed
}

// dial connects, says Hello and waits for the Welcome (bounded by ctx), then starts the
// session's reading goroutine.
func (p *Producer) dial(ctx context.Context) (*session, error) {
	conn, err := p.cfg.Dial(ctx)
	if err != nil {
		return nil, err
	}
	// The handshake's reads and writes end when ctx does.
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	s, err := p.handshake(conn)
	if !stop() && err == nil {
		err = ctx.Err() // ctx ended as the Welcome came: the deadline is set, give up
	}
	if err != nil {
		_ = conn.Close()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("sluice: connecting to the daemon: %w", ctx.Err())
		}
		return nil, err
	}
	p.mu.Lock()
	p.welcome = s.welcome
	p.current = s
	p.mu.Unlock()
	go p.read(s)
	return s, nil
}

func (p *Producer) handshake(conn net.Conn) (*session, error) {
	frame, err := EncodeFrame(&Hello{Version: ProtocolVersion, ClientName: p.cfg.ClientName, PID: uint64(os.Getpid())})
	if err != nil {
		return nil, err
	}
	if _, err := conn.Write(frame); err != nil {
		return nil, err
	}
	frames := NewFrameReader(conn)
	m, err := frames.Next()
	if err == io.EOF {
		return nil, ErrDaemonClosed
	}
	if err != nil {
		return nil, err
	}
	switch m := m.(type) {
	case *Welcome:
		if m.Version < 1 || m.Version > ProtocolVersion {
			return nil, protocolErrorf("Welcome with version %d; this client speaks 1..%d", m.Version, ProtocolVersion)
		}
		return &session{conn: conn, frames: frames, welcome: m, dead: make(chan struct{})}, nil
	case *ErrorReply:
		return nil, replyError(m)
	default:
		return nil, protocolErrorf("%s in answer to Hello", m.MessageType())
	}
}

func replyError(m *ErrorReply) *Error {
	return &Error{Code: m.Code, Name: m.Name, Message: m.Message, Fatal: m.Fatal}
}

// read is the session's reading goroutine: it resolves batches from ProduceAcks and hands
// other replies to the oldest waiting request, until the connection ends.
func (p *Producer) read(s *session) {
	var err error
	for err == nil {
		var m Message
		// ProduceAck results are decoded into the reader's reused slice: resolve settles them
		// (and copies them for Futures) before the next frame is read.
		if m, err = s.frames.next(true); err != nil {
			break
		}
		switch m := m.(type) {
		case *ProduceAck:
			err = p.acked(m)
		case *ErrorReply:
			if m.Fatal {
				err = replyError(m)
			} else {
				err = s.answer(nil, replyError(m))
			}
		case *TopicInfo, *StatsReply, *FlushDone:
			err = s.answer(m, nil)
		default:
			err = protocolErrorf("unexpected %s from the daemon", m.MessageType())
		}
	}
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		err = ErrDaemonClosed
	}
	s.err = err
	_ = s.conn.Close()
	close(s.dead)
}

func (s *session) answer(m Message, err error) error {
	s.mu.Lock()
	if len(s.waiting) == 0 {
		s.mu.Unlock()
		if m == nil {
			return protocolErrorf("ErrorReply with no request waiting: %v", err)
		}
		return protocolErrorf("%s with no request waiting", m.MessageType())
	}
	r := s.waiting[0]
	s.waiting = s.waiting[1:]
	s.mu.Unlock()
	r.done(m, err)
	return nil
}

func (p *Producer) acked(m *ProduceAck) error {
	p.mu.Lock()
	b := p.inflight[m.Seq]
	delete(p.inflight, m.Seq)
	p.mu.Unlock()
	if b == nil {
		return protocolErrorf("ProduceAck for seq %d, which is not in flight", m.Seq)
	}
	if len(m.Results) != b.n {
		err := protocolErrorf("ProduceAck %d has %d results for %d records", m.Seq, len(m.Results), b.n)
		p.resolve(b, nil, err)
		return err
	}
	p.resolve(b, m.Results, nil)
	return nil
}

// resolve gives every record of b its outcome and releases its room; a batch already
// resolved is left alone.
func (p *Producer) resolve(b *batch, results []RecordResult, err error) {
	p.mu.Lock()
	_, ok := p.pending[b]
	delete(p.pending, b)
	if ok {
		p.budget.release(b.n, b.bytes)
	}
	p.mu.Unlock()
	if !ok {
		return
	}
	if b.futures && results != nil {
		results = slices.Clone(results) // results is the reader's reused slice
	}
	b.results, b.err, b.enc = results, err, nil
	for i, cb := range b.cbs { // before done closes: once a Future is done, so are the callbacks
		if cb != nil {
			cb(b.result(i))
		}
	}
	if !b.futures {
		b.results = nil
	}
	close(b.done)
}

// run is the sending goroutine: it writes the queued requests and batches on the current
// session, and reconnects when it ends.
func (p *Producer) run(s *session) {
	defer close(p.stopped)
	for {
		cause := p.serve(s)
		p.endSession(s, cause)
		if errors.Is(cause, ErrClosed) {
			p.fail(ErrClosed)
			return
		}
		if p.cfg.OnDisconnect != nil {
			p.cfg.OnDisconnect(cause)
		}
		if permanent(cause) {
			p.fail(cause)
			return
		}
		if s = p.reconnect(cause); s == nil {
			return
		}
	}
}

// permanent reports whether a connection that ended with err would end the same way again.
func permanent(err error) bool {
	var e *Error
	if errors.As(err, &e) {
		return e.Fatal && e.Code != CodeShuttingDown
	}
	var pe *ProtocolError
	return errors.As(err, &pe)
}

// serve writes on s until it ends; it returns why. After Close's flush it says Goodbye and
// waits for the daemon to close the connection (or for Close's context to end).
func (p *Producer) serve(s *session) error {
	w := bufio.NewWriterSize(s.conn, writeBufferBytes)
	enc := NewEncoder()
	bw := &batchWriter{}
	for {
		p.mu.Lock()
		ctrl, queue := p.ctrl, p.queue
		p.ctrl, p.queue = nil, nil
		p.mu.Unlock()
		if len(ctrl) == 0 && len(queue) == 0 {
			select {
			case <-p.wake:
				continue
			case <-s.dead:
				return s.err
			case <-p.goodbye:
				if p.hasWork() {
					continue // what Close's flush left (its context ended) goes out first
				}
				return p.sayGoodbye(s, w, enc)
			}
		}
		if err := p.write(s, w, enc, bw, ctrl, queue); err != nil {
			// A daemon that hangs up while we write (it stopped reading at SHUTTING_DOWN) makes
			// the write fail before the reader has its last frame: let the reader finish.
			select {
			case <-s.dead:
			case <-time.After(readerGrace):
				_ = s.conn.Close()
				<-s.dead
			}
			if e := (*Error)(nil); errors.As(s.err, &e) && e.Fatal {
				return s.err
			}
			return err
		}
	}
}

func (p *Producer) hasWork() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.ctrl) > 0 || len(p.queue) > 0
}

// write sends ctrl, then queue. On an error the requests and batches not written are put
// back at the head of their queues, for the next connection.
func (p *Producer) write(s *session, w *bufio.Writer, enc *Encoder, bw *batchWriter, ctrl []*request, queue []*batch) error {
	for i, r := range ctrl {
		frame, err := enc.Encode(r.msg)
		if err != nil {
			r.done(nil, err)
			continue
		}
		s.mu.Lock()
		s.waiting = append(s.waiting, r)
		s.mu.Unlock()
		if _, err := w.Write(frame); err != nil {
			p.requeue(ctrl[i+1:], queue)
			return err
		}
	}
	if err := w.Flush(); err != nil { // the requests go first
		p.requeue(nil, queue)
		return err
	}
	if len(queue) == 0 {
		return nil
	}
	return p.writeBatches(s.conn, bw, queue)
}

// batchWriter is the sending goroutine's scratch for writeBatches, reused from call to call.
type batchWriter struct {
	parts   []byte      // the frames' heads and tails
	bufs    net.Buffers // head, records, tail of each frame, for one writev
	ends    []int       // each frame's end, in bytes from the first frame's start
	seqs    []uint64    // each frame's seq (acknowledged batches)
	batches []*batch    // the batches of those frames
}

// writeBatches writes the batches' frames with one gathered write (writev): each frame is its
// head, the batch's encoded records (not copied) and its tail. Acknowledged batches are in
// flight from before the write (their outcome is the daemon's to tell); fire-and-forget ones
// are settled once written. On an error, the batches none of whose bytes were written leave
// the in-flight ones and go back to the head of the queue; the others count as written.
func (p *Producer) writeBatches(conn net.Conn, bw *batchWriter, queue []*batch) error {
	need := 0
	for _, b := range queue {
		need += produceOverheadBound(b.topic)
	}
	if cap(bw.parts) < need {
		bw.parts = make([]byte, 0, need) // sized so that appending never moves what bufs holds
	}
	parts, bufs, ends, seqs, batches := bw.parts[:0], bw.bufs[:0], bw.ends[:0], bw.seqs[:0], bw.batches[:0]
	total := 0
	for _, b := range queue {
		var seq uint64
		if b.ack {
			p.mu.Lock()
			p.seq++
			seq = p.seq
			p.mu.Unlock()
		}
		start := len(parts)
		var h int
		var err error
		if parts, h, err = appendFrameAround(parts, b.topic, b.n, len(b.enc), b.ack, seq); err != nil {
			p.resolve(b, nil, err) // the batch bounds keep frames within the limits: not reached
			continue
		}
		if b.ack {
			// From here on the batch counts as written: its outcome is the daemon's to tell.
			p.mu.Lock()
			p.inflight[seq] = b
			p.mu.Unlock()
		}
		bufs = append(bufs, parts[start:h:h], b.enc, parts[h:len(parts):len(parts)])
		total += len(parts) - start + len(b.enc)
		ends, seqs, batches = append(ends, total), append(seqs, seq), append(batches, b)
	}
	bw.parts, bw.bufs, bw.ends, bw.seqs, bw.batches = parts, bufs, ends, seqs, batches
	_, err := bufs.WriteTo(conn) // consumes bufs: what is left was not written
	done := total
	if err != nil {
		for _, part := range bufs {
			done -= len(part)
		}
	}
	clear(bw.bufs[:cap(bw.bufs)]) // the scratch does not hold the batches' buffers
	var unwritten []*batch
	for i, b := range batches {
		start := 0
		if i > 0 {
			start = ends[i-1]
		}
		if start >= done {
			if b.ack {
				p.mu.Lock()
				delete(p.inflight, seqs[i])
				p.mu.Unlock()
			}
			unwritten = append(unwritten, b)
			continue
		}
		if !b.ack {
			// Written: nothing more is known of it, its room is free, its buffer spare.
			buf := b.enc
			p.resolve(b, nil, nil)
			p.mu.Lock()
			p.unflushed = true
			if len(p.spare) < maxSpareBuffers {
				p.spare = append(p.spare, buf[:0])
			}
			p.mu.Unlock()
		}
	}
	clear(bw.batches[:cap(bw.batches)])
	if err != nil {
		p.requeue(nil, unwritten)
	}
	return err
}

func (p *Producer) requeue(ctrl []*request, queue []*batch) {
	p.mu.Lock()
	p.ctrl = append(append([]*request(nil), ctrl...), p.ctrl...)
	p.queue = append(append([]*batch(nil), queue...), p.queue...)
	p.mu.Unlock()
}

func (p *Producer) sayGoodbye(s *session, w *bufio.Writer, enc *Encoder) error {
	frame, err := enc.Encode(&Goodbye{})
	if err == nil {
		if _, err = w.Write(frame); err == nil {
			err = w.Flush()
		}
	}
	if err == nil {
		select {
		case <-s.dead: // the daemon sent what was pending and closed
		case <-p.abort:
		case <-time.After(goodbyeTimeout):
		}
	}
	_ = s.conn.Close()
	<-s.dead
	return ErrClosed
}

// endSession settles the batches that were written on s and not acknowledged: after the
// daemon's SHUTTING_DOWN they were never read (it answers every frame it read first), so they
// go back to the head of the queue, in their order, for the next connection; after any other
// end their outcome is unknown and they fail with a ConnectionLostError. The requests still
// waiting for a reply go back in the queue too (asking again is harmless).
func (p *Producer) endSession(s *session, cause error) {
	p.mu.Lock()
	lost := p.inflight
	p.inflight = make(map[uint64]*batch)
	p.mu.Unlock()
	if errors.Is(cause, ErrShuttingDown) {
		seqs := make([]uint64, 0, len(lost))
		for seq := range lost {
			seqs = append(seqs, seq)
		}
		slices.Sort(seqs)
		unread := make([]*batch, len(seqs))
		for i, seq := range seqs {
			unread[i] = lost[seq]
		}
		p.requeue(nil, unread)
		lost = nil
	}
	for _, b := range lost {
		p.resolve(b, nil, &ConnectionLostError{Cause: cause})
	}
	s.mu.Lock()
	waiting := s.waiting
	s.waiting = nil
	s.mu.Unlock()
	p.requeue(waiting, nil)
}

// reconnect dials until it gets a session, the reconnect timeout passes, or Close gives up.
// It returns nil after failing the producer.
func (p *Producer) reconnect(cause error) *session {
	if p.cfg.ReconnectTimeout < 0 {
		p.fail(cause)
		return nil
	}
	deadline := time.Now().Add(p.cfg.ReconnectTimeout)
	backoff := reconnectFirstBackoff
	for {
		if p.closingIdle() {
			p.fail(ErrClosed)
			return nil
		}
		ctx, cancel := context.WithDeadline(context.Background(), deadline)
		go func() {
			select {
			case <-p.abort:
				cancel()
			case <-ctx.Done():
			}
		}()
		s, err := p.dial(ctx)
		cancel()
		if err == nil {
			p.reconnects.Add(1)
			p.refreshTopics()
			return s
		}
		if permanent(err) {
			p.fail(err)
			return nil
		}
		select {
		case <-p.abort:
			p.fail(ErrClosed)
			return nil
		default:
		}
		if time.Now().Add(backoff).After(deadline) {
			p.fail(fmt.Errorf("sluice: no connection to the daemon for %v (%v; last attempt: %w)", p.cfg.ReconnectTimeout, cause, err))
			return nil
		}
		select {
		case <-time.After(backoff):
		case <-p.abort:
			p.fail(ErrClosed)
			return nil
		}
		backoff = min(2*backoff, reconnectMaxBackoff)
	}
}

// closingIdle reports whether Close is waiting and nothing is left to send.
func (p *Producer) closingIdle() bool {
	select {
	case <-p.goodbye:
	default:
		return false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.pending) == 0
}

// refreshTopics looks up every cached topic again on the new connection (the daemon may have
// a new config); until the answers come, the old TopicInfo serves.
func (p *Producer) refreshTopics() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for name, e := range p.topics {
		if e.info == nil {
			continue // its first lookup is still queued
		}
		e := e
		p.ctrl = append(p.ctrl, &request{msg: &TopicLookup{Topic: name}, done: func(m Message, err error) {
			if info, ok := m.(*TopicInfo); ok && err == nil {
				p.mu.Lock()
				p.setInfoLocked(name, e, info)
				p.mu.Unlock()
			}
		}})
	}
	p.signal()
}

// fail ends the producer for good: every record not yet complete fails with err (ErrClosed
// wrapped around it), every waiting request too, and so does every later Send.
func (p *Producer) fail(err error) {
	closed := err
	if !errors.Is(err, ErrClosed) {
		closed = fmt.Errorf("%w: %w", ErrClosed, err)
	}
	p.mu.Lock()
	if p.failed == nil {
		p.failed = closed
		if err != ErrClosed {
			p.cause = err
		}
	}
	var left []*batch
	for b := range p.pending {
		left = append(left, b)
		b.timer.Stop()
	}
	p.open = make(map[batchKey]*batch)
	p.last = nil
	p.queue = nil
	ctrl := p.ctrl
	p.ctrl = nil
	p.mu.Unlock()
	for _, b := range left {
		p.resolve(b, nil, closed)
	}
	for _, r := range ctrl {
		r.done(nil, closed)
	}
}
