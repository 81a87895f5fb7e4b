package sluice

// The producer's memory bound: records (and their bytes) between Send and their outcome.
// The budget has no lock of its own: the Producer's mutex guards it, so a Send takes its room
// in the same critical section that adds the record to its batch (one lock per record), and
// a batch's outcome gives its room back in the one that removes the batch from the pending
// ones. A Send that finds no room waits on room (closed at the next release), or fails at
// once when it will not wait.

// budget counts the records (and their bytes) between Send and their outcome (Producer.mu
// held for every method).
type budget struct {
	records    int
	bytes      int
	maxRecords int
	maxBytes   int
	room       chan struct{} // closed at the next release, for those waiting
}

// take takes room for one record of size bytes, if there is room. A record larger than
// maxBytes is let through alone.
func (b *budget) take(size int) bool {
	if b.records < b.maxRecords && (b.bytes+size <= b.maxBytes || b.records == 0) {
		b.records++
		b.bytes += size
		return true
	}
	return false
}

// wait returns a channel closed at the next release.
func (b *budget) wait() <-chan struct{} {
	if b.room == nil {
		b.room = make(chan struct{})
	}
	return b.room
}

func (b *budget) release(records, bytes int) {
	b.records -= records
	b.bytes -= bytes
	if b.room != nil {
		close(b.room)
		b.room = nil
	}
}
