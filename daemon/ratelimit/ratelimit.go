// Package ratelimit bounds how often callers may call: a token bucket per key
// (a node, a peer address) and, optionally, one bucket over all keys. It
// remembers a bounded number of keys, so a flood of new keys cannot grow it
// without bound.
package ratelimit

import (
	"sync"
	"time"

	"golang.org/x/time/rate"
)

const (
	// maxKeys bounds the per-key buckets kept; past it idle ones go, and a
	// key that finds no room gets a fresh bucket that is not kept.
	maxKeys = 100_000
	// keyIdle is how long an unused per-key bucket is kept once the map is
	// full.
	keyIdle = time.Minute
)

// Keyed is a token bucket per key plus an optional global bucket. It is
// safe for concurrent use.
type Keyed struct {
	rate   rate.Limit
	burst  int
	global *rate.Limiter

	mu   sync.Mutex // guards keys
	keys map[string]*bucket
}

type bucket struct {
	lim  *rate.Limiter
	last time.Time
}

// New returns a Keyed with perKey tokens a second and burst per key, and,
// when global is positive, a global bucket of global tokens a second and
// globalBurst.
func New(perKey rate.Limit, burst int, global rate.Limit, globalBurst int) *Keyed {
	k := &Keyed{rate: perKey, burst: burst, keys: map[string]*bucket{}}
	if global > 0 {
		k.global = rate.NewLimiter(global, globalBurst)
	}
	return k
}

// Allow takes a token for key at now, then one from the global bucket. A
// key over its own limit does not use up the global budget.
func (k *Keyed) Allow(key string, now time.Time) bool {
	k.mu.Lock()
	b, ok := k.keys[key]
	if !ok {
		if len(k.keys) >= maxKeys {
			for name, v := range k.keys {
				if now.Sub(v.last) > keyIdle {
					delete(k.keys, name)
				}
			}
		}
		b = &bucket{lim: rate.NewLimiter(k.rate, k.burst)}
		if len(k.keys) < maxKeys {
			k.keys[key] = b
		}
	}
	b.last = now
	okKey := b.lim.AllowN(now, 1)
	k.mu.Unlock()
	return okKey && (k.global == nil || k.global.AllowN(now, 1))
}
