module sluice.dev/clients/go

go 1.22

// msgpack: the protocol's frames are msgpack maps (docs/PROTOCOL.md). vmihailenco/msgpack is
// the maintained, widely used Go implementation; this package writes and reads each value with
// its low-level calls (lengths, strings, bin, integers; generic maps only for the stats), so the
// bytes are exactly the reference encoder's and decoding can be as strict as the specification.
require github.com/vmihailenco/msgpack/v5 v5.4.1

require github.com/vmihailenco/tagparser/v2 v2.0.0 // indirect
