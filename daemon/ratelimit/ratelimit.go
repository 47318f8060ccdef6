// Package ratelimit bounds how often callers may call: a token bucket per key
// (a source address, a node) and, optionally, one bucket over all keys with
// a reserve for light callers, so that heavy callers cannot spend the global
// budget of the others. It remembers a bounded number of keys, so a flood of
// new keys cannot grow it without bound.
package ratelimit

import (
	"net/netip"
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
	// lightTokens: a key whose bucket holds at least its burst less this
	// many tokens has called little lately; it may draw on the reserve
	// when the global bucket is empty.
	lightTokens = 2
	// reserveShare is the reserve's rate and burst as a share of the
	// global bucket's.
	reserveShare = 10
	// ipv6Prefix is how much of an IPv6 address names one source: a host
	// usually holds a whole /64.
	ipv6Prefix = 64
)

// Keyed is a token bucket per key plus an optional global bucket. It is
// safe for concurrent use.
type Keyed struct {
	rate  rate.Limit
	burst int
	// global bounds all keys together; reserve serves light keys when
	// global is empty. Both nil without a global limit.
	global, reserve *rate.Limiter

	mu   sync.Mutex // guards keys
	keys map[string]*bucket
}

type bucket struct {
	lim  *rate.Limiter
	last time.Time
}

// New returns a Keyed with perKey tokens a second and burst per key, and,
// when global is positive, a global bucket of global tokens a second and
// globalBurst, with a reserve of a tenth of it for keys that called little.
func New(perKey rate.Limit, burst int, global rate.Limit, globalBurst int) *Keyed {
	k := &Keyed{rate: perKey, burst: burst, keys: map[string]*bucket{}}
	if global > 0 {
		k.global = rate.NewLimiter(global, globalBurst)
		k.reserve = rate.NewLimiter(global/reserveShare, max(1, globalBurst/reserveShare))
	}
	return k
}

// Allow takes a token for key at now, then one from the global bucket. A
// key over its own limit does not use up the global budget, and a key that
// called little lately gets through an empty global bucket from the reserve:
// a flood from some sources cannot starve the others.
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
	light := b.lim.TokensAt(now) >= float64(k.burst-lightTokens)
	okKey := b.lim.AllowN(now, 1)
	k.mu.Unlock()
	switch {
	case !okKey:
		return false
	case k.global == nil || k.global.AllowN(now, 1):
		return true
	default:
		return light && k.reserve.AllowN(now, 1)
	}
}

// SourceKey is the key of a source address: the address itself for IPv4,
// its /64 for IPv6 (one host commonly holds a whole /64, so keying single
// IPv6 addresses would give it countless budgets).
func SourceKey(a netip.Addr) string {
	a = a.Unmap()
	if a.Is6() {
		return netip.PrefixFrom(a, ipv6Prefix).Masked().String()
	}
	return a.String()
}
