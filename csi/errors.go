package csi

import (
	"context"
	"errors"
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/blockd/blockd/api"
)

// apiStatus turns a master API error into the gRPC status the CSI spec
// names for its case. what says which call failed ("create volume x").
func apiStatus(what string, err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok && !isAPIError(err) {
		return err
	}
	code := codes.Internal
	var ae *api.Error
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	case errors.As(err, &ae):
		switch ae.Code {
		case api.CodeNotFound:
			code = codes.NotFound
		case api.CodeAlreadyExists:
			code = codes.AlreadyExists
		case api.CodeBadRequest, api.CodeUnknownPreset:
			code = codes.InvalidArgument
		case api.CodeBadSize:
			code = codes.OutOfRange
		case api.CodeInsufficientServers:
			code = codes.ResourceExhausted
		case api.CodeNotLeader, api.CodeUnavailable, api.CodeNoPrimary:
			code = codes.Unavailable
		case api.CodeEpochChanged, api.CodeBusy:
			code = codes.Aborted
		case api.CodeNotPrimary:
			code = codes.Unavailable
		case api.CodeNoSpace:
			code = codes.ResourceExhausted
		case api.CodeImageConflict:
			code = codes.FailedPrecondition
		case api.CodeForbidden:
			code = codes.PermissionDenied
		}
	default:
		code = codes.Unavailable // transport: no master answered
	}
	return status.Errorf(code, "%s: %v", what, err)
}

func isAPIError(err error) bool {
	var ae *api.Error
	return errors.As(err, &ae)
}

// inflight is the per-volume lock: a second operation on a volume while
// one is running is refused with Aborted, as the spec asks, instead of
// queueing behind it (the CO retries with backoff).
type inflight struct {
	mu   sync.Mutex
	busy map[string]string // key -> operation holding it
}

// acquire takes key for op, or fails with Aborted naming the operation in
// flight. The returned function releases it.
func (f *inflight) acquire(key, op string) (func(), error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.busy == nil {
		f.busy = map[string]string{}
	}
	if cur, ok := f.busy[key]; ok {
		return nil, status.Errorf(codes.Aborted, "%s %s: an operation (%s) is already in flight on this volume", op, key, cur)
	}
	f.busy[key] = op
	return func() {
		f.mu.Lock()
		delete(f.busy, key)
		f.mu.Unlock()
	}, nil
}
