// Package sluice is a Go client of Sluice, the local ingestion daemon for Apache Kafka. It
// talks the daemon's socket protocol (docs/PROTOCOL.md of the Sluice repository: length-
// prefixed msgpack frames on a Unix socket) and needs no shared memory, cgo or Kafka library.
//
// A Producer batches records per topic (by linger time, record count and bytes) into Produce
// frames that ask for a ProduceAck, and resolves each record's Future from it:
//
//	p, err := sluice.Connect(ctx, sluice.Config{SocketPath: "/run/sluice/sluice.sock"})
//	if err != nil { ... }
//	defer p.Close(context.Background())
//	f, err := p.Send(ctx, "payments", sluice.Record{Key: []byte("user-42"), Value: body})
//	if err != nil { ... }                  // refused before sending: unknown topic, too large, ...
//	md, err := f.Wait(ctx)                 // md.Partition, md.Offset; or an *Error from Kafka/Sluice
//
// The daemon chooses the partition (murmur2 of the key, as Kafka's producers do) unless the
// record names one.
//
// # Errors
//
// Failures the daemon reports are *Error values carrying the wire's code and name (Kafka's
// codes below 1000, Sluice's own from 1001); errors.Is matches them by code against the
// sentinels (ErrShuttingDown, ErrBufferFull, ...), and (*Error).Retriable says whether
// sending again may succeed. A record whose frame was written on a connection that dropped
// before its acknowledgement fails with a ConnectionLostError (errors.Is(err,
// ErrConnectionLost)): the daemon may have read it, so sending it again may duplicate it.
// Records that were still queued when the connection dropped, and the unanswered ones when
// the daemon said SHUTTING_DOWN before closing (it had not read them), are sent on the next
// connection, never twice.
//
// # Concurrency and memory
//
// A Producer is safe for concurrent use. The records between Send and their outcome are
// bounded (Config.MaxInFlightRecords, MaxInFlightBytes); at the bound Send waits (until its
// context ends) or, with Config.FailWhenFull, fails with ErrInFlightFull.
//
// The codec (Encoder, FrameReader, DecodeBody and the message types) covers the whole
// protocol in both directions and may be used on its own.
package sluice
