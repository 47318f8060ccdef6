package clock

import (
	"sort"
	"sync"
	"time"
)

// Fake is a Clock that moves only when Advance or Set is called. The zero
// value starts at the zero time; use NewFake to start elsewhere.
type Fake struct {
	// mu guards now and waiters.
	mu      sync.Mutex
	now     time.Time
	waiters []waiter
}

type waiter struct {
	at time.Time
	ch chan time.Time
}

// NewFake returns a Fake clock set to start.
func NewFake(start time.Time) *Fake { return &Fake{now: start} }

// Now implements Clock.
func (f *Fake) Now() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()

	return f.now
}

// After implements Clock: the channel fires when the clock is advanced to or
// past now+d. A d of zero or less fires at once.
func (f *Fake) After(d time.Duration) <-chan time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()

	ch := make(chan time.Time, 1)
	if d <= 0 {
		ch <- f.now

		return ch
	}

	f.waiters = append(f.waiters, waiter{at: f.now.Add(d), ch: ch})

	return ch
}

// Advance moves the clock forward by d and fires every timer that is due.
func (f *Fake) Advance(d time.Duration) {
	f.mu.Lock()
	f.now = f.now.Add(d)
	f.fireLocked()
	f.mu.Unlock()
}

// Waiters returns how many timers are pending; tests use it to know that a
// controller is blocked on the clock before they advance it.
func (f *Fake) Waiters() int {
	f.mu.Lock()
	defer f.mu.Unlock()

	return len(f.waiters)
}

// NextDeadline returns the earliest pending timer and whether there is one.
func (f *Fake) NextDeadline() (time.Time, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()

	if len(f.waiters) == 0 {
		return time.Time{}, false
	}

	sort.Slice(f.waiters, func(i, j int) bool { return f.waiters[i].at.Before(f.waiters[j].at) })

	return f.waiters[0].at, true
}

func (f *Fake) fireLocked() {
	kept := f.waiters[:0]

	for _, w := range f.waiters {
		if w.at.After(f.now) {
			kept = append(kept, w)

			continue
		}

		w.ch <- f.now
	}

	f.waiters = kept
}
