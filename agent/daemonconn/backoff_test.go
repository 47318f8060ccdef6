package daemonconn

import (
	"context"
	"errors"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestBackoffRetriesOnlyUnreachable(t *testing.T) {
	var waits []time.Duration

	b := Backoff{Base: time.Second, Max: 4 * time.Second, Sleep: func(_ context.Context, d time.Duration) error {
		waits = append(waits, d)

		return nil
	}}
	calls := 0

	err := b.Do(context.Background(), func(context.Context) error {
		calls++
		if calls < 5 {
			return status.Error(codes.Unavailable, "down")
		}

		return nil
	})
	if err != nil || calls != 5 {
		t.Fatalf("Do = %v after %d calls", err, calls)
	}

	caps := []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 4 * time.Second}
	for i, w := range waits {
		if w <= 0 || w > caps[i] {
			t.Errorf("wait %d = %v, want in (0, %v]", i, w, caps[i])
		}
	}

	calls = 0
	refused := status.Error(codes.PermissionDenied, "policy violated")

	if err := b.Do(context.Background(), func(context.Context) error { calls++; return refused }); !errors.Is(err, refused) || calls != 1 {
		t.Fatalf("a refusal was retried: %v after %d calls", err, calls)
	}
}

func TestBackoffStopsWithContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()

	err := Backoff{}.Do(ctx, func(context.Context) error { return status.Error(codes.Unavailable, "down") })
	if err == nil {
		t.Fatal("Do kept going after the context ended")
	}
}
