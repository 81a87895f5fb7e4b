package sluice

// The msgpack this protocol uses, both ways, written directly over byte slices: the client's
// per-record paths (encoding each Rec into its batch's frame, decoding each RecordResult of a
// ProduceAck) are a few appends and comparisons, with no reflection, no io.Reader and no
// allocation. Only StatsReply's free-form map goes through the msgpack library (see
// decodeStats and StatsReply.encode).
//
// Encoding writes what the reference encoder writes (shm/control.py, msgspec): every integer
// and length in its shortest form, str 8 from 32 bytes on, bin for bytes, nil for a nil slice.
// A test holds these functions to the msgpack library's output over the boundaries of every
// form (codec_test.go).
//
// Decoding is as strict as docs/PROTOCOL.md: a value of the wrong family is an error (a str
// where bin is expected, a float or nil where an integer is), integers must fit their field,
// strings must be UTF-8, and every length is checked against the bytes left before anything
// is allocated or sliced, so a corrupt frame is an error, never a panic or a huge allocation.
// Skipping an unknown key's value is iterative: nesting depth cannot exhaust the stack.

import (
	"errors"
	"fmt"
	"math"
	"unicode/utf8"
)

// msgpack type codes (the specification's names).
const (
	codeFixMapLow   = 0x80
	codeFixMapHigh  = 0x8f
	codeFixArrLow   = 0x90
	codeFixArrHigh  = 0x9f
	codeFixStrLow   = 0xa0
	codeFixStrHigh  = 0xbf
	codeNil         = 0xc0
	codeNeverUsed   = 0xc1
	codeFalse       = 0xc2
	codeTrue        = 0xc3
	codeBin8        = 0xc4
	codeBin16       = 0xc5
	codeBin32       = 0xc6
	codeExt8        = 0xc7
	codeExt16       = 0xc8
	codeExt32       = 0xc9
	codeFloat32     = 0xca
	codeFloat64     = 0xcb
	codeUint8       = 0xcc
	codeUint16      = 0xcd
	codeUint32      = 0xce
	codeUint64      = 0xcf
	codeInt8        = 0xd0
	codeInt16       = 0xd1
	codeInt32       = 0xd2
	codeInt64       = 0xd3
	codeFixExt1     = 0xd4
	codeFixExt16    = 0xd8
	codeStr8        = 0xd9
	codeStr16       = 0xda
	codeStr32       = 0xdb
	codeArray16     = 0xdc
	codeArray32     = 0xdd
	codeMap16       = 0xde
	codeMap32       = 0xdf
	codeNegFixLow   = 0xe0
	maxFixStr       = 31
	maxFixContainer = 15
)

// --- encoding ----------------------------------------------------------------------------------

func appendUint(b []byte, v uint64) []byte {
	switch {
	case v <= math.MaxInt8:
		return append(b, byte(v))
	case v <= math.MaxUint8:
		return append(b, codeUint8, byte(v))
	case v <= math.MaxUint16:
		return append(b, codeUint16, byte(v>>8), byte(v))
	case v <= math.MaxUint32:
		return append(b, codeUint32, byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
	}
	return append(b, codeUint64, byte(v>>56), byte(v>>48), byte(v>>40), byte(v>>32),
		byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
}

func appendInt(b []byte, v int64) []byte {
	switch {
	case v >= 0:
		return appendUint(b, uint64(v))
	case v >= -32: // negative fixint
		return append(b, byte(v))
	case v >= math.MinInt8:
		return append(b, codeInt8, byte(v))
	case v >= math.MinInt16:
		return append(b, codeInt16, byte(v>>8), byte(v))
	case v >= math.MinInt32:
		return append(b, codeInt32, byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
	}
	return append(b, codeInt64, byte(v>>56), byte(v>>48), byte(v>>40), byte(v>>32),
		byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
}

func appendBool(b []byte, v bool) []byte {
	if v {
		return append(b, codeTrue)
	}
	return append(b, codeFalse)
}

// appendLen writes a length with the fix form's base code (when n fits it) or the 8/16/32-bit
// codes; code8 0 means the family has no 8-bit form (arrays, maps).
func appendLen(b []byte, n int, fixBase byte, fixMax int, code8, code16, code32 byte) []byte {
	switch {
	case n <= fixMax:
		return append(b, fixBase|byte(n))
	case code8 != 0 && n <= math.MaxUint8:
		return append(b, code8, byte(n))
	case n <= math.MaxUint16:
		return append(b, code16, byte(n>>8), byte(n))
	}
	return append(b, code32, byte(n>>24), byte(n>>16), byte(n>>8), byte(n))
}

func appendMapLen(b []byte, n int) []byte {
	return appendLen(b, n, codeFixMapLow, maxFixContainer, 0, codeMap16, codeMap32)
}

func appendArrayLen(b []byte, n int) []byte {
	return appendLen(b, n, codeFixArrLow, maxFixContainer, 0, codeArray16, codeArray32)
}

func appendStr(b []byte, s string) []byte {
	return append(appendLen(b, len(s), codeFixStrLow, maxFixStr, codeStr8, codeStr16, codeStr32), s...)
}

// appendBin writes bin, or nil for a nil slice (an empty non-nil slice is an empty bin).
func appendBin(b []byte, v []byte) []byte {
	if v == nil {
		return append(b, codeNil)
	}
	// bin has no fix form: a max of -1 sends every length to the 8/16/32-bit codes.
	return append(appendLen(b, len(v), 0, -1, codeBin8, codeBin16, codeBin32), v...)
}

// --- decoding ----------------------------------------------------------------------------------

// errTruncated: a value claims more bytes than the body has.
var errTruncated = errors.New("unexpected EOF: the value runs past the end of the body")

// decoder reads strictly typed msgpack values from one body, front to back.
type decoder struct {
	b   []byte
	off int
	// reuse, when set, is reused for a ProduceAck's results (the Producer's reading
	// goroutine); nil: a new slice per ProduceAck.
	reuse *[]RecordResult
}

func newDecoder(body []byte) *decoder { return &decoder{b: body} }

// left is how many bytes are not read yet.
func (d *decoder) left() int { return len(d.b) - d.off }

func (d *decoder) peek() (byte, error) {
	if d.off >= len(d.b) {
		return 0, errTruncated
	}
	return d.b[d.off], nil
}

// take returns the next n bytes (a slice of the body) and moves past them.
func (d *decoder) take(n int) ([]byte, error) {
	if n < 0 || n > d.left() {
		return nil, errTruncated
	}
	v := d.b[d.off : d.off+n : d.off+n]
	d.off += n
	return v, nil
}

// be reads an n-byte big-endian unsigned number (n is 1, 2, 4 or 8).
func (d *decoder) be(n int) (uint64, error) {
	v, err := d.take(n)
	if err != nil {
		return 0, err
	}
	var u uint64
	for _, c := range v {
		u = u<<8 | uint64(c)
	}
	return u, nil
}

// length reads the length that follows a 8/16/32-bit code (size 1, 2 or 4 bytes).
func (d *decoder) length(size int) (int, error) {
	n, err := d.be(size)
	return int(n), err
}

// container reads a map's or an array's header: the fix form (fixLow + up to 15) or the
// 16/32-bit codes. what names the family in errors.
func (d *decoder) container(fixLow, code16, code32 byte, what string) (int, error) {
	c, err := d.peek()
	if err != nil {
		return 0, err
	}
	var n int
	switch {
	case c >= fixLow && c <= fixLow|maxFixContainer:
		d.off++
		n = int(c & maxFixContainer)
	case c == code16:
		d.off++
		n, err = d.length(2)
	case c == code32:
		d.off++
		n, err = d.length(4)
	default:
		return 0, fmt.Errorf("code %#x is not %s", c, what)
	}
	if err == nil && n > d.left() { // every entry takes a byte at least
		err = errTruncated
	}
	return n, err
}

func (d *decoder) mapLen() (int, error) {
	return d.container(codeFixMapLow, codeMap16, codeMap32, "a map")
}

func (d *decoder) arrayLen() (int, error) {
	return d.container(codeFixArrLow, codeArray16, codeArray32, "an array")
}

// isNil reads a nil if one is next.
func (d *decoder) isNil() (bool, error) {
	c, err := d.peek()
	if err != nil {
		return false, err
	}
	if c == codeNil {
		d.off++
		return true, nil
	}
	return false, nil
}

// rawStrBytes reads a str and returns its bytes (a slice of the body) without the UTF-8
// check (keys are checked when they are not one of the protocol's ASCII names).
func (d *decoder) rawStrBytes() ([]byte, error) {
	c, err := d.peek()
	if err != nil {
		return nil, err
	}
	var n int
	switch {
	case c >= codeFixStrLow && c <= codeFixStrHigh:
		d.off++
		n = int(c & maxFixStr)
	case c == codeStr8:
		d.off++
		n, err = d.length(1)
	case c == codeStr16:
		d.off++
		n, err = d.length(2)
	case c == codeStr32:
		d.off++
		n, err = d.length(4)
	default:
		return nil, fmt.Errorf("code %#x is not a str", c)
	}
	if err != nil {
		return nil, err
	}
	return d.take(n)
}

// rawStr reads a str (a slice of the body) and checks it is UTF-8.
func (d *decoder) rawStr() ([]byte, error) {
	b, err := d.rawStrBytes()
	if err == nil && !utf8.Valid(b) {
		err = errors.New("str is not UTF-8")
	}
	return b, err
}

func (d *decoder) str() (string, error) {
	b, err := d.rawStr()
	if err != nil {
		return "", err
	}
	if string(b) == "NONE" { // every successful result's error_name: no allocation for it
		return "NONE", nil
	}
	return string(b), nil
}

// binOrNil returns nil for msgpack nil and a new non-nil slice (empty for bin of length 0)
// for bin: the message does not refer to the body, which the FrameReader reuses.
func (d *decoder) binOrNil() ([]byte, error) {
	c, err := d.peek()
	if err != nil {
		return nil, err
	}
	var n int
	switch c {
	case codeNil:
		d.off++
		return nil, nil
	case codeBin8:
		d.off++
		n, err = d.length(1)
	case codeBin16:
		d.off++
		n, err = d.length(2)
	case codeBin32:
		d.off++
		n, err = d.length(4)
	default:
		return nil, fmt.Errorf("code %#x is not bin (bytes must be msgpack bin, not str)", c)
	}
	if err != nil {
		return nil, err
	}
	v, err := d.take(n)
	if err != nil {
		return nil, err
	}
	return append(make([]byte, 0, n), v...), nil
}

// int reads any msgpack integer that fits int64.
func (d *decoder) int() (int64, error) {
	c, err := d.peek()
	if err != nil {
		return 0, err
	}
	if c <= math.MaxInt8 || c >= codeNegFixLow { // positive and negative fixint
		d.off++
		return int64(int8(c)), nil
	}
	var u uint64
	switch c {
	case codeUint8, codeInt8:
		d.off++
		u, err = d.be(1)
	case codeUint16, codeInt16:
		d.off++
		u, err = d.be(2)
	case codeUint32, codeInt32:
		d.off++
		u, err = d.be(4)
	case codeUint64, codeInt64:
		d.off++
		u, err = d.be(8)
	default:
		return 0, fmt.Errorf("code %#x is not an integer", c)
	}
	if err != nil {
		return 0, err
	}
	switch c {
	case codeInt8:
		return int64(int8(u)), nil
	case codeInt16:
		return int64(int16(u)), nil
	case codeInt32:
		return int64(int32(u)), nil
	case codeInt64:
		return int64(u), nil
	case codeUint64:
		if u > math.MaxInt64 {
			return 0, fmt.Errorf("integer %d out of range", u)
		}
	}
	return int64(u), nil
}

// uint reads a msgpack integer >= 0 (a uint64 may use all 64 bits).
func (d *decoder) uint() (uint64, error) {
	c, err := d.peek()
	if err != nil {
		return 0, err
	}
	if c == codeUint64 {
		d.off++
		return d.be(8)
	}
	n, err := d.int()
	if err != nil {
		return 0, err
	}
	if n < 0 {
		return 0, fmt.Errorf("integer %d is negative where a uint is required", n)
	}
	return uint64(n), nil
}

func (d *decoder) uintMax(limit uint64) (uint64, error) {
	n, err := d.uint()
	if err == nil && n > limit {
		err = fmt.Errorf("integer %d is above %d", n, limit)
	}
	return n, err
}

func (d *decoder) boolean() (bool, error) {
	c, err := d.peek()
	if err != nil {
		return false, err
	}
	if c != codeTrue && c != codeFalse {
		return false, fmt.Errorf("code %#x is not a bool", c)
	}
	d.off++
	return c == codeTrue, nil
}

// skipValue skips one value of any type, however nested: it counts the values still to skip
// instead of recursing, and a container's count is checked against the bytes left.
func (d *decoder) skipValue() error {
	for pending := 1; pending > 0; pending-- {
		c, err := d.peek()
		if err != nil {
			return err
		}
		d.off++
		var size, n int // bytes to skip; a length of that many bytes to read first
		switch {
		case c <= math.MaxInt8 || c >= codeNegFixLow, c == codeNil, c == codeFalse, c == codeTrue:
		case c <= codeFixMapHigh:
			pending += 2 * int(c&maxFixContainer)
		case c <= codeFixArrHigh:
			pending += int(c & maxFixContainer)
		case c <= codeFixStrHigh:
			size = int(c & maxFixStr)
		case c == codeNeverUsed:
			return fmt.Errorf("code %#x is not msgpack", c)
		case c == codeBin8, c == codeStr8:
			n = 1
		case c == codeBin16, c == codeStr16:
			n = 2
		case c == codeBin32, c == codeStr32:
			n = 4
		case c >= codeExt8 && c <= codeExt32:
			n, size = 1<<(c-codeExt8), 1 // the length, then the type byte and the data
		case c == codeFloat32:
			size = 4
		case c == codeFloat64:
			size = 8
		case c >= codeUint8 && c <= codeUint64:
			size = 1 << (c - codeUint8)
		case c >= codeInt8 && c <= codeInt64:
			size = 1 << (c - codeInt8)
		case c >= codeFixExt1 && c <= codeFixExt16:
			size = 1 + 1<<(c-codeFixExt1)
		case c == codeArray16, c == codeArray32, c == codeMap16, c == codeMap32:
			d.off--
			var count int
			if c <= codeArray32 {
				count, err = d.arrayLen()
			} else {
				count, err = d.mapLen()
				count *= 2
			}
			if err != nil {
				return err
			}
			pending += count
		}
		if n > 0 {
			l, err := d.length(n)
			if err != nil {
				return err
			}
			size += l
		}
		if _, err := d.take(size); err != nil {
			return err
		}
		if pending > d.left()+1 { // each value still to skip takes a byte at least
			return errTruncated
		}
	}
	return nil
}
