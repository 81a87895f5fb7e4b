package sluice

import (
	"errors"
	"fmt"
)

// Sluice's own error codes (docs/PROTOCOL.md, "Errors"). Codes below 1000 are Kafka's, with
// Kafka's names.
const (
	CodeUnsupportedProtocolVersion = 1001
	CodeBadFrame                   = 1002
	CodeUnexpectedMessage          = 1003
	CodeNotAllowed                 = 1004
	CodeSegmentRefused             = 1005
	CodeShuttingDown               = 1006
	CodeBufferFull                 = 1007
	CodeOutcomeUnknown             = 1008
)

// Kafka error codes this package refers to by name.
const (
	CodeUnknownTopicOrPartition = 3
	CodeMessageTooLarge         = 10
	CodeInvalidTopic            = 17
)

// Error is an error the daemon reported: an ErrorReply, or a record's failure in a
// ProduceAck. Code and Name are the wire's (a Kafka code below 1000, a Sluice code above).
//
// errors.Is(err, target) holds for two *Error with the same Code, so the sentinels below
// work: errors.Is(err, sluice.ErrShuttingDown).
type Error struct {
	Code    int64
	Name    string
	Message string // the daemon's detail, when it sent one
	// Fatal: the daemon closed the connection after this error.
	Fatal bool
}

func (e *Error) Error() string {
	if e.Message != "" && e.Message != e.Name {
		return fmt.Sprintf("sluice: %s (%d): %s", e.Name, e.Code, e.Message)
	}
	return fmt.Sprintf("sluice: %s (%d)", e.Name, e.Code)
}

// Is reports whether target is an *Error with the same code.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Code == e.Code
}

// Retriable reports whether sending the record again may succeed: Kafka's retriable codes
// (as Kafka 4.1's exceptions classify them; the daemon has already retried them until its
// delivery timeout, and a request may have been written with its answer lost, so sending
// again may duplicate), BUFFER_FULL and SHUTTING_DOWN (the record never reached Kafka:
// sending it again does not duplicate it), and OUTCOME_UNKNOWN (the daemon stopped before the
// outcome came: the record may still be delivered, so sending it again may duplicate it).
// docs/PROTOCOL.md, "Retries", is the full list.
func (e *Error) Retriable() bool {
	return retriableCodes[e.Code]
}

// retriableCodes are the codes whose exception extends RetriableException in Kafka 4.1
// (org.apache.kafka.common.protocol.Errors), as in shm/errors.py, plus Sluice's BUFFER_FULL.
var retriableCodes = map[int64]bool{
	2: true, 3: true, 5: true, 6: true, 7: true, 9: true, 13: true, 14: true, 15: true, 16: true,
	19: true, 20: true, 41: true, 51: true, 56: true, 70: true, 71: true, 72: true, 74: true,
	75: true, 78: true, 80: true, 83: true, 84: true, 88: true, 89: true, 100: true, 103: true,
	106: true, 122: true, 123: true, 133: true,
	CodeBufferFull: true, CodeShuttingDown: true, CodeOutcomeUnknown: true,
}

// Sentinels for errors.Is on Sluice's own codes.
var (
	ErrUnsupportedProtocolVersion = &Error{Code: CodeUnsupportedProtocolVersion, Name: "UNSUPPORTED_PROTOCOL_VERSION"}
	ErrBadFrame                   = &Error{Code: CodeBadFrame, Name: "BAD_FRAME"}
	ErrUnexpectedMessage          = &Error{Code: CodeUnexpectedMessage, Name: "UNEXPECTED_MESSAGE"}
	ErrNotAllowed                 = &Error{Code: CodeNotAllowed, Name: "NOT_ALLOWED"}
	ErrShuttingDown               = &Error{Code: CodeShuttingDown, Name: "SHUTTING_DOWN"}
	ErrBufferFull                 = &Error{Code: CodeBufferFull, Name: "BUFFER_FULL"}
	ErrOutcomeUnknown             = &Error{Code: CodeOutcomeUnknown, Name: "OUTCOME_UNKNOWN"}
	ErrMessageTooLarge            = &Error{Code: CodeMessageTooLarge, Name: "MESSAGE_TOO_LARGE"}
	ErrUnknownTopicOrPartition    = &Error{Code: CodeUnknownTopicOrPartition, Name: "UNKNOWN_TOPIC_OR_PARTITION"}
)

// ErrConnectionLost: the connection to the daemon dropped after the record's Produce frame was
// written and before its ProduceAck came, without the daemon's SHUTTING_DOWN. The daemon may
// have read the record (it delivers what it read even when the client is gone), so the
// outcome is unknown: sending it again is safe only where a duplicate is acceptable. Records
// whose frame was never written, and after SHUTTING_DOWN those whose frame the daemon did not
// answer (it answers every frame it read before saying SHUTTING_DOWN), are not failed with
// it: the producer sends them on the next connection.
var ErrConnectionLost = errors.New("sluice: connection to the daemon lost before the record was acknowledged; it may or may not have been delivered")

// ErrClosed: the producer was closed (or failed for good) before the record was sent, or
// Send was called after Close.
var ErrClosed = errors.New("sluice: producer closed")

// ErrInFlightFull: Send would have to wait for room (Config.MaxInFlightRecords or
// MaxInFlightBytes) and Config.FailWhenFull is set. Nothing was sent; it may be retried.
var ErrInFlightFull = errors.New("sluice: too many records in flight")

// IsRetriable reports whether a Send or a record's outcome failed in a way that may succeed
// if the record is sent again: a retriable *Error, ErrInFlightFull, or ErrConnectionLost
// (which may duplicate the record; see its comment).
func IsRetriable(err error) bool {
	if errors.Is(err, ErrInFlightFull) || errors.Is(err, ErrConnectionLost) {
		return true
	}
	var e *Error
	return errors.As(err, &e) && e.Retriable()
}

// errorOf turns a failed RecordResult into its *Error.
func errorOf(r *RecordResult) *Error {
	return &Error{Code: r.ErrorCode, Name: r.ErrorName}
}

// ConnectionLostError fails the records whose Produce frame was written on a connection that
// dropped before their ProduceAck came. errors.Is(err, ErrConnectionLost) holds; Cause says
// why the connection ended (an *Error such as SHUTTING_DOWN, an I/O error, ...).
type ConnectionLostError struct {
	Cause error
}

func (e *ConnectionLostError) Error() string {
	return fmt.Sprintf("%v (%v)", ErrConnectionLost, e.Cause)
}

// Is makes errors.Is(err, ErrConnectionLost) hold.
func (e *ConnectionLostError) Is(target error) bool { return target == ErrConnectionLost }

// Unwrap returns the cause.
func (e *ConnectionLostError) Unwrap() error { return e.Cause }

// ErrDaemonClosed: the daemon closed the connection without saying why.
var ErrDaemonClosed = errors.New("sluice: the daemon closed the connection")
