// Command sluice-go-produce sends N records to a Sluice daemon through the Go client, waits
// for every acknowledgement and prints a JSON summary on stdout (its last line):
//
//	{"sent":…, "acked":…, "failed":…, "refused":…, "pending":…, "errors":{NAME:count},
//	 "first_error":…, "timed_out":…, "elapsed_s":…, "records_per_s":…, "cpu_s":…,
//	 "latency_ms":{"p50":…, "p99":…, "p999":…}, "reconnects":…, "disconnects":[cause, …],
//	 "client_id":…, "run":…}
//
// sent: records Send accepted; acked/failed: their outcomes; refused: Send failed; pending:
// no outcome when -timeout passed (timed_out). Latency is sampled once per acknowledged
// group of -frame-records records (a Produce frame, unless a linger split it): the Send of
// its first record to that record's acknowledgement, as the benchmark's socket runner times
// its frames; the other records' callbacks only count (no clock, no allocation). Timing and
// CPU cover sending and acknowledgements, not connecting or building the records.
//
// Record i (0-based) is built before timing: its value is "RUN-i-" followed by seeded
// letters up to -value-size bytes (with -distinct-values N > 0, the value of record i mod N:
// records share N values, as the benchmark's Python runners share theirs); with -keyed its
// key is "k" + (i mod -keys) padded with '.' to -key-size bytes (one slice per distinct
// key); with -headers it carries the headers i=<i>, run=RUN and nothing=<null>. Records that
// repeat (with -distinct-values, record i is record i mod the period of its value and key) are
// built once, as the Python runners build one Rec per distinct value and key. The daemon chooses partitions. -results FILE writes one line per record:
// "i partition offset timestamp error", error being NONE, a Sluice/Kafka error name,
// CONNECTION_LOST, CLOSED, PENDING (no outcome by -timeout) or UNSENT.
//
// With -no-ack the records go fire-and-forget (ack=false): acked and failed then come from the
// daemon's FlushDone (completed and failed records), with no latency and no -results.
//
// With -ack-every N (N > 1) the records go in groups of -frame-records, and only every N-th
// group is acknowledged (Send, one acked Produce frame); the others go fire-and-forget
// (Produce, ack=false frames), as the benchmark's Python socket runner frames them. Latency is
// then over the acknowledged groups; acked and failed come from the daemon's
// FlushDone (failed: every record it counted failed, with the acknowledged groups' error
// names; FAILED_PER_FLUSHDONE for the rest); no -results.
//
// With -wait-start the command connects, builds its records, prints {"ready":true,...} and
// waits for a line on stdin before it sends (benchmarks start clients together that way).
//
// Exit status: 0 every record sent was acknowledged (all -count of them, unless -duration
// stopped sending first); 1 some failed or were refused; 2 bad usage or no connection; 3
// -timeout passed with records pending.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math/rand"
	"os"
	"runtime/pprof"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	sluice "sluice.dev/clients/go"
)

// paceEvery is how many records go between two looks at the clock under -rate.
const paceEvery = 64

// closeTimeout bounds the final Close (Goodbye and the daemon's hang-up), unless -timeout
// already passed: then the connection is closed at once.
const closeTimeout = 10 * time.Second

type options struct {
	socket, topic, name, run, results  string
	cpuProfile                         string
	count, valueSize, keySize, keys    int
	frameRecords, batchBytes, inFlight int
	ackEvery, distinctValues           int
	keyed, headers, waitStart, noAck   bool
	linger, timeout, connectTimeout    time.Duration
	duration                           time.Duration
	reconnectTimeout                   time.Duration
	rate                               float64
	seed                               int64
}

func parseFlags() options {
	var o options
	flag.StringVar(&o.socket, "socket", os.Getenv("SLUICE_SOCKET"), "the daemon's socket (default $SLUICE_SOCKET, else "+sluice.DefaultSocketPath+")")
	flag.StringVar(&o.topic, "topic", "", "topic to produce to (required)")
	flag.IntVar(&o.count, "count", 10000, "records to send")
	flag.IntVar(&o.valueSize, "value-size", 100, "bytes per value (at least the \"RUN-i-\" prefix)")
	flag.IntVar(&o.distinctValues, "distinct-values", 0, "records cycle through this many distinct values (0: every value distinct)")
	flag.BoolVar(&o.keyed, "keyed", false, "give every record a key")
	flag.IntVar(&o.keySize, "key-size", 16, "bytes per key, with -keyed")
	flag.IntVar(&o.keys, "keys", 1000, "distinct keys, with -keyed")
	flag.BoolVar(&o.headers, "headers", false, "give every record three headers (one with a null value)")
	flag.DurationVar(&o.linger, "linger", sluice.DefaultLinger, "how long a batch waits for more records (0: none)")
	flag.IntVar(&o.batchBytes, "batch-bytes", sluice.DefaultBatchBytes, "bytes per Produce frame at most")
	flag.IntVar(&o.frameRecords, "frame-records", sluice.DefaultBatchRecords, "records per Produce frame at most")
	flag.IntVar(&o.inFlight, "max-in-flight", sluice.DefaultMaxInFlightRecords, "records between Send and their outcome at most")
	flag.Float64Var(&o.rate, "rate", 0, "records per second (0: as fast as possible)")
	flag.DurationVar(&o.timeout, "timeout", 5*time.Minute, "deadline for sending and every acknowledgement, from the first send")
	flag.DurationVar(&o.duration, "duration", 0, "stop sending after this long, not a failure (0: send -count records)")
	flag.DurationVar(&o.connectTimeout, "connect-timeout", 10*time.Second, "deadline for the connection and the handshake")
	flag.DurationVar(&o.reconnectTimeout, "reconnect-timeout", sluice.DefaultReconnectTimeout, "how long to try reconnecting after a drop")
	flag.StringVar(&o.name, "name", "sluice-go-produce", "client name in the daemon's logs and stats")
	flag.StringVar(&o.run, "run", "", "run id in every value (default: random)")
	flag.StringVar(&o.results, "results", "", "write one line per record's outcome to this file")
	flag.IntVar(&o.ackEvery, "ack-every", 1, "acknowledge every N-th group of -frame-records records only; the others go fire and forget (1: every record acknowledged)")
	flag.BoolVar(&o.noAck, "no-ack", false, "fire and forget (Produce with ack=false): acked/failed come from the daemon's FlushDone; no latency, no -results")
	flag.BoolVar(&o.waitStart, "wait-start", false, "print a ready line and wait for a line on stdin before sending")
	flag.Int64Var(&o.seed, "seed", 1, "seed of the value padding")
	flag.StringVar(&o.cpuProfile, "cpuprofile", "", "write a CPU profile of the timed section to this file")
	flag.Parse()
	if o.topic == "" || o.count < 0 || flag.NArg() > 0 || o.ackEvery < 1 || o.distinctValues < 0 || o.keys < 1 || ((o.noAck || o.ackEvery > 1) && o.results != "") {
		fmt.Fprintln(os.Stderr, "usage: sluice-go-produce -topic T [flags]")
		flag.PrintDefaults()
		os.Exit(2)
	}
	if o.run == "" {
		o.run = strconv.FormatUint(rand.Uint64()>>20, 36)
	}
	if o.linger <= 0 {
		o.linger = sluice.NoLinger
	}
	return o
}

// build makes every record before timing.
func build(o options) []sluice.Record {
	const letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
	rng := rand.New(rand.NewSource(o.seed))
	pad := make([]byte, o.valueSize)
	for i := range pad {
		pad[i] = letters[rng.Intn(len(letters))]
	}
	run := []byte(o.run)
	n := o.count
	if o.distinctValues > 0 && !o.headers { // headers name the record: every record differs
		period := o.distinctValues
		if o.keyed {
			period = lcm(period, o.keys)
		}
		n = min(n, period)
	}
	recs := make([]sluice.Record, n)
	keys := make([][]byte, min(o.keys, n))
	for i := range recs {
		if o.distinctValues > 0 && i >= o.distinctValues {
			recs[i].Value = recs[i%o.distinctValues].Value
		} else {
			v := append(append(append(make([]byte, 0, o.valueSize), run...), '-'), strconv.Itoa(i)...)
			v = append(v, '-')
			if len(v) < o.valueSize {
				v = append(v, pad[len(v):]...)
			}
			recs[i].Value = v
		}
		if o.keyed {
			k := keys[i%o.keys]
			if k == nil {
				k = append([]byte{'k'}, strconv.Itoa(i%o.keys)...)
				for len(k) < o.keySize {
					k = append(k, '.')
				}
				keys[i%o.keys] = k
			}
			recs[i].Key = k
		}
		if o.headers {
			recs[i].Headers = []sluice.Header{{Key: "i", Value: []byte(strconv.Itoa(i))}, {Key: "run", Value: run}, {Key: "nothing"}}
		}
	}
	return recs
}

func lcm(a, b int) int {
	x, y := a, b
	for y != 0 {
		x, y = y, x%y
	}
	return a / x * b
}

// outcome of one record, written by the producer's callback (kept with -results only).
type outcome struct {
	md   sluice.RecordMetadata
	err  error
	done bool
}

// tally is what the callbacks count; mu orders their writes before the final read.
type tally struct {
	mu         sync.Mutex
	acked      int64
	failed     int64
	errors     map[string]int64
	firstError string
	latency    []int64 // ns, Send to acknowledgement, of the timed records
	outcomes   []outcome
}

// settle counts one record's outcome: i is its index (-1: no result line to write), lat its
// latency (-1: not timed).
func (t *tally) settle(i int, lat int64, md sluice.RecordMetadata, err error) {
	t.mu.Lock()
	if err == nil {
		t.acked++
		if lat >= 0 {
			t.latency = append(t.latency, lat)
		}
	} else {
		t.failed++
		t.errors[errorName(err)]++
		if t.firstError == "" {
			t.firstError = err.Error()
		}
	}
	if t.outcomes != nil && i >= 0 {
		t.outcomes[i] = outcome{md: md, err: err, done: true}
	}
	t.mu.Unlock()
}

type summary struct {
	Sent        int64              `json:"sent"`
	Acked       int64              `json:"acked"`
	Failed      int64              `json:"failed"`
	Refused     int64              `json:"refused"`
	Pending     int64              `json:"pending"`
	Errors      map[string]int64   `json:"errors"`
	FirstError  string             `json:"first_error"`
	TimedOut    bool               `json:"timed_out"`
	ElapsedS    float64            `json:"elapsed_s"`
	RecordsPerS float64            `json:"records_per_s"`
	CPUS        float64            `json:"cpu_s"`
	LatencyMS   map[string]float64 `json:"latency_ms"`
	Reconnects  int64              `json:"reconnects"`
	Disconnects []string           `json:"disconnects"`
	ClientID    uint64             `json:"client_id"`
	Run         string             `json:"run"`
}

func errorName(err error) string {
	var e *sluice.Error
	switch {
	case err == nil:
		return "NONE"
	case errors.Is(err, sluice.ErrConnectionLost):
		return "CONNECTION_LOST"
	case errors.As(err, &e):
		return e.Name
	case errors.Is(err, sluice.ErrClosed):
		return "CLOSED"
	case errors.Is(err, context.DeadlineExceeded):
		return "TIMEOUT"
	}
	return "ERROR"
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

func emit(v any) {
	b, _ := json.Marshal(v)
	os.Stdout.Write(append(b, '\n'))
}

func fatal(code int, format string, args ...any) {
	emit(map[string]string{"error": fmt.Sprintf(format, args...)})
	os.Exit(code)
}

func main() {
	o := parseFlags()
	var disconnects []string // the causes, in order; read after Close
	var disconnectsMu sync.Mutex
	ctx, cancel := context.WithTimeout(context.Background(), o.connectTimeout)
	p, err := sluice.Connect(ctx, sluice.Config{
		SocketPath: o.socket, ClientName: o.name, Linger: o.linger, BatchRecords: o.frameRecords,
		BatchBytes: o.batchBytes, MaxInFlightRecords: o.inFlight, ReconnectTimeout: o.reconnectTimeout,
		OnDisconnect: func(cause error) {
			disconnectsMu.Lock()
			disconnects = append(disconnects, cause.Error())
			disconnectsMu.Unlock()
		},
	})
	if err == nil {
		_, err = p.Lookup(ctx, o.topic)
	}
	cancel()
	if err != nil {
		fatal(2, "connecting: %v", err)
	}
	recs := build(o) // record i is recs[i % len(recs)]
	// Every per-record slot is written before timing, so no page is first touched while timed.
	t := &tally{errors: map[string]int64{}, latency: make([]int64, 0, o.count/o.frameRecords+1)}
	if o.results != "" {
		t.outcomes = make([]outcome, o.count)
		for i := range t.outcomes {
			t.outcomes[i].md.Partition = -1
		}
	}
	sent := make([]bool, o.count)
	if o.waitStart {
		emit(map[string]any{"ready": true, "client_id": p.Welcome().ClientID, "pid": os.Getpid()})
		if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
			fatal(2, "waiting for the start line: %v", err)
		}
	}

	var frozen atomic.Bool // set at the deadline: later outcomes are not counted
	var s summary
	s.Errors = map[string]int64{}
	s.Run = o.run
	if o.cpuProfile != "" {
		f, err := os.Create(o.cpuProfile)
		if err == nil {
			err = pprof.StartCPUProfile(f)
		}
		if err != nil {
			fatal(2, "cpu profile: %v", err)
		}
		defer f.Close()
	}
	cpu0 := cpuSeconds()
	t0 := time.Now()
	ctx, cancel = context.WithTimeout(context.Background(), o.timeout)
	defer cancel()
	count := func(md sluice.RecordMetadata, err error) { // the untimed records' callback, shared
		if !frozen.Load() {
			t.settle(-1, -1, md, err)
		}
	}
	for i := range o.count {
		rec := &recs[i%len(recs)]
		var err error
		switch {
		case o.noAck || (i/o.frameRecords+1)%o.ackEvery != 0:
			err = p.Produce(ctx, o.topic, *rec)
		case i%o.frameRecords == 0: // the group's first record: timed
			at := time.Since(t0)
			err = p.SendFunc(ctx, o.topic, *rec, func(md sluice.RecordMetadata, err error) {
				if !frozen.Load() {
					t.settle(i, int64(time.Since(t0)-at), md, err)
				}
			})
		case t.outcomes != nil:
			err = p.SendFunc(ctx, o.topic, *rec, func(md sluice.RecordMetadata, err error) {
				if !frozen.Load() {
					t.settle(i, -1, md, err)
				}
			})
		default:
			err = p.SendFunc(ctx, o.topic, *rec, count)
		}
		if err != nil {
			s.Refused++
			s.Errors[errorName(err)]++
			if s.FirstError == "" {
				s.FirstError = err.Error()
			}
			if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, sluice.ErrClosed) {
				break // nothing later would get through either
			}
			continue
		}
		s.Sent++
		sent[i] = true
		if i%paceEvery == paceEvery-1 {
			if o.rate > 0 {
				if ahead := time.Duration(float64(i+1)/o.rate*1e9) - time.Since(t0); ahead > 0 {
					time.Sleep(ahead)
				}
			}
			if o.duration > 0 && time.Since(t0) >= o.duration {
				break
			}
		}
	}
	flushErr := p.Flush(ctx)
	if errors.Is(flushErr, context.DeadlineExceeded) {
		s.TimedOut = true
	} else if flushErr != nil && s.FirstError == "" {
		s.FirstError = "flush: " + flushErr.Error()
	}
	frozen.Store(true)
	elapsed := time.Since(t0)
	s.CPUS = cpuSeconds() - cpu0
	pprof.StopCPUProfile()
	t.mu.Lock()
	lats := t.latency
	s.Acked, s.Failed = t.acked, t.failed
	for name, n := range t.errors {
		s.Errors[name] += n
	}
	if s.FirstError == "" {
		s.FirstError = t.firstError
	}
	t.mu.Unlock()
	if (o.noAck || o.ackEvery > 1) && flushErr == nil {
		// The daemon's FlushDone counted every failed record, acknowledged or not; the rest
		// completed.
		if all := int64(p.FlushFailed()); all > s.Failed {
			s.Errors["FAILED_PER_FLUSHDONE"] = all - s.Failed
			s.Failed = all
		}
		s.Acked = s.Sent - s.Failed
	}
	s.Pending = s.Sent - s.Acked - s.Failed
	s.ElapsedS = elapsed.Seconds()
	if s.ElapsedS > 0 {
		s.RecordsPerS = float64(s.Acked) / s.ElapsedS
	}
	s.LatencyMS = percentiles(lats)
	s.Reconnects = p.Reconnects()
	s.ClientID = p.Welcome().ClientID

	wait := closeTimeout
	if s.TimedOut {
		wait = 0 // the daemon did not answer in time: do not wait for it again
	}
	closeCtx, closeCancel := context.WithTimeout(context.Background(), wait)
	if err := p.Close(closeCtx); err != nil && s.FirstError == "" && !s.TimedOut {
		s.FirstError = "close: " + err.Error()
	}
	closeCancel()
	disconnectsMu.Lock()
	s.Disconnects = append([]string{}, disconnects...)
	disconnectsMu.Unlock()
	if o.results != "" {
		if err := writeResults(o.results, sent, t.outcomes); err != nil {
			fatal(2, "writing %s: %v", o.results, err)
		}
	}
	emit(s)
	switch {
	case s.TimedOut:
		os.Exit(3)
	case s.Acked != s.Sent || s.Refused > 0:
		os.Exit(1)
	}
}

func percentiles(ns []int64) map[string]float64 {
	if len(ns) == 0 {
		return nil
	}
	sort.Slice(ns, func(a, b int) bool { return ns[a] < ns[b] })
	at := func(q float64) float64 {
		return float64(ns[min(len(ns)-1, int(q*float64(len(ns))))]) / 1e6
	}
	return map[string]float64{"p50": at(0.50), "p99": at(0.99), "p999": at(0.999)}
}

func writeResults(path string, sent []bool, outcomes []outcome) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	w := bufio.NewWriter(f)
	for i, oc := range outcomes {
		name := "UNSENT"
		md := sluice.RecordMetadata{Partition: -1, Offset: -1, Timestamp: -1}
		if sent[i] {
			name = "PENDING"
		}
		if oc.done {
			name, md = errorName(oc.err), oc.md
		}
		fmt.Fprintf(w, "%d %d %d %d %s\n", i, md.Partition, md.Offset, md.Timestamp, name)
	}
	if err := w.Flush(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
