package ratelimit

import (
	"fmt"
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
	if !l.Allow("b", now) || !l.Allow("c", now) || l.Allow("d", now) {
		t.Fatal("the global bucket did not bound the sum of keys")
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
