package daemonconn

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Backoff defaults.
const (
	DefaultBackoffBase = 500 * time.Millisecond
	DefaultBackoffMax  = 30 * time.Second
)

// Backoff is exponential backoff with full jitter. The zero value uses the
// defaults above and retries until the context ends.
type Backoff struct {
	Base, Max time.Duration
	// Attempts bounds the tries; zero means until ctx is done.
	Attempts int
	// Sleep waits; nil means a timer honouring ctx. Tests replace it.
	Sleep func(context.Context, time.Duration) error
}

// Retryable reports whether err is worth trying again soon: the daemon was
// unreachable, busy, or did not answer within the call's deadline. Refusals
// (bad evidence, policy) are not: they wait for the next interval. The end
// of the caller's own context is not either.
func Retryable(err error) bool {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return false
	}

	s, ok := status.FromError(err)
	if !ok {
		return true // local TPM or I/O hiccup
	}

	switch s.Code() {
	case codes.Unavailable, codes.DeadlineExceeded, codes.ResourceExhausted, codes.Aborted, codes.Internal, codes.Unknown:
		return true
	}

	return false
}

// Do calls fn until it succeeds, returns an error that is not Retryable, or
// ctx ends, sleeping between tries.
func (b Backoff) Do(ctx context.Context, fn func(context.Context) error) error {
	base, maxWait := b.Base, b.Max
	if base <= 0 {
		base = DefaultBackoffBase
	}

	if maxWait <= 0 {
		maxWait = DefaultBackoffMax
	}

	sleep := b.Sleep
	if sleep == nil {
		sleep = sleepCtx
	}

	wait := base

	for attempt := 1; ; attempt++ {
		err := fn(ctx)
		if err == nil || !Retryable(err) || (b.Attempts > 0 && attempt >= b.Attempts) {
			return err
		}

		d := time.Duration(rand.Int64N(int64(wait)) + 1)
		if serr := sleep(ctx, d); serr != nil {
			return fmt.Errorf("retrying: %w", errors.Join(err, serr))
		}

		wait = min(wait*2, maxWait)
	}
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()

	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
