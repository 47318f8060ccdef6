package ratelimit

import (
	"fmt"
	"net/netip"
	"testing"
	"time"
)

func TestKeyAndGlobalBuckets(t *testing.T) {
	l := New(1, 3, 1, 5)
	now := time.Now()
	n := 0
	for range 10 {
		if l.Allow("a", now) {
			n++
		}
	}
	if n != 3 {
		t.Fatalf("key burst: %d allowed, want 3", n)
	}
	// The global bucket is empty now: one light key gets the reserve's
	// single token, and then nobody passes.
	if !l.Allow("b", now) || !l.Allow("c", now) || !l.Allow("d", now) || l.Allow("e", now) {
		t.Fatal("the global bucket and its reserve did not bound the sum of keys")
	}
	if !l.Allow("a", now.Add(time.Second)) {
		t.Fatal("a key's bucket did not refill")
	}
}

func TestNoGlobalBucket(t *testing.T) {
	l := New(1, 1, 0, 0)
	now := time.Now()
	for i := range 1000 {
		if !l.Allow(fmt.Sprint(i), now) {
			t.Fatalf("key %d refused without a global bucket", i)
		}
	}
}

// TestBoundedKeys: a flood of new keys keeps the map bounded, and a key
// that finds no room is still limited to its burst for that call.
func TestBoundedKeys(t *testing.T) {
	l := New(1, 1, 0, 0)
	now := time.Now()
	for i := range maxKeys + 10 {
		l.Allow(fmt.Sprint(i), now)
	}
	if len(l.keys) != maxKeys {
		t.Fatalf("kept %d keys, want %d", len(l.keys), maxKeys)
	}
	l.Allow("late", now.Add(2*keyIdle))
	if len(l.keys) != 1 {
		t.Fatalf("after the idle keys expired: %d keys, want only the new one", len(l.keys))
	}
}

// TestLightKeysGetThroughAFlood: 200 sources, each flooding at 100 calls a
// second for two seconds (20 times the global rate within their own
// limits), keep the global bucket empty; a source that called little still
// gets through, from the reserve.
func TestLightKeysGetThroughAFlood(t *testing.T) {
	l := New(5, 20, 50, 50)
	now := time.Now()
	passed, node := 0, false
	for step := range 200 {
		at := now.Add(time.Duration(step) * 10 * time.Millisecond)
		for i := range 200 {
			// Sources that started at different times refill at different times.
			if step >= i%20 && l.Allow(fmt.Sprint("flood", i), at) {
				passed++
			}
		}
		if step == 150 {
			node = l.Allow("node", at)
		}
	}
	// The global bucket (50 burst + 50/s) and the reserve (5 + 5/s) bound
	// the flood, whatever the number of sources.
	if limit := 50 + 2*50 + 5 + 2*5; passed > limit {
		t.Fatalf("%d flood calls passed, at most %d may", passed, limit)
	}
	if !node {
		t.Fatal("a light key was refused while others flooded")
	}
}

func TestSourceKey(t *testing.T) {
	for in, want := range map[string]string{
		"10.0.0.1":               "10.0.0.1",
		"::ffff:10.0.0.1":        "10.0.0.1",
		"2001:db8:1:2:3:4:5:6":   "2001:db8:1:2::/64",
		"2001:db8:1:2:ffff::abc": "2001:db8:1:2::/64",
	} {
		if got := SourceKey(netip.MustParseAddr(in)); got != want {
			t.Errorf("SourceKey(%s) = %s, want %s", in, got, want)
		}
	}
}
