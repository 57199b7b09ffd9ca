package api

import (
	"errors"
	"fmt"
	"net/http"
)

// Stable error codes.
const (
	CodeNotFound            = "not_found"
	CodeAlreadyExists       = "already_exists"
	CodeBadRequest          = "bad_request"
	CodeBadSize             = "bad_size"
	CodeInsufficientServers = "insufficient_servers"
	CodeUnknownPreset       = "unknown_preset"
	CodeNotLeader           = "not_leader"
	CodePromoteRejected     = "promote_rejected"
	CodeEpochChanged        = "epoch_changed"
	CodeNoPrimary           = "no_primary"
	CodeInternal            = "internal"
	CodeAddressInUse        = "address_in_use" // a heartbeat claims an endpoint a live server holds
	CodeUnavailable         = "unavailable"    // transport: no master answered
	// CodeForbidden (403): the client certificate's identity may not make this call.
	CodeForbidden = "forbidden"
	// CodeNotPrimary (409, the server API): this server is not the
	// volume's primary with a live lease; Error.Primary names the primary
	// it last heard of.
	CodeNotPrimary = "not_primary"
	// CodeBusy (409): the object is in use (a snapshot an NBD client or an
	// export has open).
	CodeBusy = "busy"
)

// Error is the JSON body of every non-2xx reply, and the error type Client
// returns for them.
type Error struct {
	Code    string `json:"code"`
	Message string `json:"message"`
	// Leader is the leader's API address on not_leader replies ("" if unknown).
	Leader string `json:"leader,omitempty"`
	// Candidates is set on promote_rejected: the evaluated candidates.
	Candidates []Candidate `json:"candidates,omitempty"`
	// Primary is set on not_primary: the volume's primary as the
	// answering server last heard it from the master.
	Primary *ServerRef `json:"primary,omitempty"`
	// Placement is set on insufficient_servers from a create: every server
	// placement considered, each with its rejection and reason.
	Placement []PlacementCandidate `json:"placement,omitempty"`
	// Status is the HTTP status (not sent on the wire).
	Status int `json:"-"`
}

func (e *Error) Error() string {
	if e.Message == "" {
		return e.Code
	}
	return fmt.Sprintf("%s: %s", e.Code, e.Message)
}

// Errorf builds an *Error.
func Errorf(code, format string, a ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, a...), Status: StatusFor(code)}
}

// StatusFor maps a code to its HTTP status.
func StatusFor(code string) int {
	switch code {
	case CodeExpandCancelled, CodeExpandBusy: // types.go
		return http.StatusConflict
	case CodeNotFound:
		return http.StatusNotFound
	case CodeAlreadyExists, CodePromoteRejected, CodeEpochChanged, CodeAddressInUse, CodeNotPrimary, CodeBusy:
		return http.StatusConflict
	case CodeBadRequest, CodeBadSize, CodeUnknownPreset:
		return http.StatusBadRequest
	case CodeInsufficientServers:
		return http.StatusUnprocessableEntity
	case CodeNotLeader, CodeUnavailable, CodeNoPrimary:
		return http.StatusServiceUnavailable
	default:
		return http.StatusInternalServerError
	}
}

// IsCode reports whether err is (or wraps) an *Error with the given code.
func IsCode(err error, code string) bool {
	var e *Error
	return errors.As(err, &e) && e.Code == code
}
