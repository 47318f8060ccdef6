package clock_test

import (
	"testing"
	"time"

	"github.com/sovra-dev/sovra/agent/runtime/clock"
)

func TestFakeFiresOnlyWhenDue(t *testing.T) {
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	f := clock.NewFake(start)

	ch := f.After(time.Second)
	if f.Waiters() != 1 {
		t.Fatalf("waiters = %d, want 1", f.Waiters())
	}

	f.Advance(999 * time.Millisecond)

	select {
	case <-ch:
		t.Fatal("timer fired early")
	default:
	}

	f.Advance(time.Millisecond)

	select {
	case got := <-ch:
		if !got.Equal(start.Add(time.Second)) {
			t.Fatalf("fired at %v", got)
		}
	default:
		t.Fatal("timer did not fire")
	}

	if f.Waiters() != 0 {
		t.Fatalf("waiters = %d after firing", f.Waiters())
	}
}
