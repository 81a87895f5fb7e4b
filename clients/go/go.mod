module sluice.dev/clients/go

go 1.22

// msgpack: the protocol's frames are msgpack maps (docs/PROTOCOL.md). This package writes and
// reads the protocol's fixed fields itself (codec.go: the per-record paths must not allocate or
// reflect); vmihailenco/msgpack, the maintained, widely used Go implementation, encodes and
// decodes the free-form StatsReply map, and the tests hold codec.go's output to its.
require github.com/vmihailenco/msgpack/v5 v5.4.1

require github.com/vmihailenco/tagparser/v2 v2.0.0 // indirect
