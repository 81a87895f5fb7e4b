package sluice

// The producer's memory bound: records (and their bytes) between Send and their outcome.
// Acquiring waits for a release, or fails at once when the caller will not wait.

import (
	"context"
	"sync"
)

// budget counts the records (and their bytes) between Send and their outcome.
type budget struct {
	mu         sync.Mutex
	records    int
	bytes      int
	maxRecords int
	maxBytes   int
	room       chan struct{} // closed at the next release, for those waiting
}

func (b *budget) acquire(ctx context.Context, size int, wait bool) error {
	b.mu.Lock()
	for {
		if b.records < b.maxRecords && (b.bytes+size <= b.maxBytes || b.records == 0) {
			b.records++
			b.bytes += size
			b.mu.Unlock()
			return nil
		}
		if !wait {
			b.mu.Unlock()
			return ErrInFlightFull
		}
		if b.room == nil {
			b.room = make(chan struct{})
		}
		room := b.room
		b.mu.Unlock()
		select {
		case <-room:
		case <-ctx.Done():
			return ctx.Err()
		}
		b.mu.Lock()
	}
}

func (b *budget) release(records, bytes int) {
	b.mu.Lock()
	b.records -= records
	b.bytes -= bytes
	if b.room != nil {
		close(b.room)
		b.room = nil
	}
	b.mu.Unlock()
}
