package kms

import (
	"sync"
	"time"

	"golang.org/x/time/rate"
)

const (
	// maxLimiters bounds the per-node limiters kept; past it idle ones go.
	maxLimiters = 100_000
	// limiterIdle is how long an unused per-node limiter is kept.
	limiterIdle = time.Minute
)

// limiter is a global token bucket plus one per node UUID.
type limiter struct {
	global *rate.Limiter
	rate   rate.Limit
	burst  int

	// mu guards nodes.
	mu    sync.Mutex
	nodes map[string]*nodeLimiter
}

type nodeLimiter struct {
	lim  *rate.Limiter
	last time.Time
}

func newLimiter(c Config) *limiter {
	return &limiter{
		global: rate.NewLimiter(c.GlobalRate, c.GlobalBurst),
		rate:   c.NodeRate, burst: c.NodeBurst,
		nodes: map[string]*nodeLimiter{},
	}
}

// allow takes a token for uuid, then one from the global bucket. A node
// over its own limit does not use up the global budget.
func (l *limiter) allow(uuid string, now time.Time) bool {
	l.mu.Lock()
	n, ok := l.nodes[uuid]
	if !ok {
		if len(l.nodes) >= maxLimiters {
			for k, v := range l.nodes {
				if now.Sub(v.last) > limiterIdle {
					delete(l.nodes, k)
				}
			}
		}
		n = &nodeLimiter{lim: rate.NewLimiter(l.rate, l.burst)}
		if len(l.nodes) < maxLimiters {
			l.nodes[uuid] = n
		}
	}
	n.last = now
	okNode := n.lim.AllowN(now, 1)
	l.mu.Unlock()
	return okNode && l.global.AllowN(now, 1)
}
