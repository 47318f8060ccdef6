// Package clock makes time a dependency of the agent's controllers: they take
// a Clock, production passes Real, and tests and the bootstrap simulation pass
// a Fake that they advance by hand.
package clock

import "time"

// Clock tells the time and waits. A nil Clock is never valid; use Real.
type Clock interface {
	// Now returns the current time.
	Now() time.Time
	// After returns a channel that receives the time once d has passed.
	After(d time.Duration) <-chan time.Time
}

// Real is the wall clock of the machine.
type Real struct{}

// Now implements Clock.
func (Real) Now() time.Time { return time.Now() }

// After implements Clock.
func (Real) After(d time.Duration) <-chan time.Time { return time.After(d) }
