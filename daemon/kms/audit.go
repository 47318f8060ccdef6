package kms

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/time/rate"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
)

const (
	// auditQueue bounds the events waiting to be written. Past it an event
	// is dropped and counted; the decision's log line is already written.
	auditQueue = 16 << 10
	// auditWriters write events in parallel.
	auditWriters = 4
	// auditWriteTimeout bounds one event write.
	auditWriteTimeout = 10 * time.Second
	// dropReportInterval paces the report of dropped events.
	dropReportInterval = 10 * time.Second
	// backgroundRate and backgroundBurst pace the KMS's writes off the
	// request path (audit events, release times): in a boot storm the API
	// server's CPU goes to answering nodes first, and the trail follows
	// within seconds (1000 boots: about 10 s). The log lines are immediate.
	backgroundRate  = rate.Limit(200)
	backgroundBurst = 50
	// quietPeriod and maxDefer: background writes wait until no call came
	// for quietPeriod, but never longer than maxDefer, so that during a
	// boot storm the CPU answers nodes first.
	quietPeriod = 200 * time.Millisecond
	maxDefer    = 30 * time.Second
)

// pacer paces the KMS's background writes: a rate limit, and a deferral
// while calls keep coming.
type pacer struct {
	limit *rate.Limiter
	// lastCall is the UnixNano time of the latest call.
	lastCall atomic.Int64
}

func newPacer() *pacer { return &pacer{limit: rate.NewLimiter(backgroundRate, backgroundBurst)} }

// called notes a call.
func (p *pacer) called() { p.lastCall.Store(time.Now().UnixNano()) }

// Wait blocks until a background write may go, or ctx ends.
func (p *pacer) Wait(ctx context.Context) error {
	start := time.Now()
	for {
		since := time.Since(time.Unix(0, p.lastCall.Load()))
		if since >= quietPeriod || time.Since(start) >= maxDefer {
			return p.limit.Wait(ctx)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(quietPeriod - since):
		}
	}
}

type auditEvent struct {
	ref             *v1alpha1.SovraNode
	warning         bool
	reason, message string
}

// auditor writes decision events off the request path, so a boot storm's
// latency does not depend on the datastore's write rate.
type auditor struct {
	queue   chan auditEvent
	dropped atomic.Int64
	// pace is shared by every background writer of the KMS.
	pace   *pacer
	logger *zap.Logger
}

func newAuditor(pace *pacer, logger *zap.Logger) *auditor {
	return &auditor{queue: make(chan auditEvent, auditQueue), pace: pace, logger: logger}
}

// event queues an event about ref without blocking.
func (a *auditor) event(ref *v1alpha1.SovraNode, warning bool, reason, message string) {
	select {
	case a.queue <- auditEvent{ref: ref, warning: warning, reason: reason, message: message}:
	default:
		a.dropped.Add(1)
	}
}

// run writes queued events until ctx ends, then what is left, briefly.
func (a *auditor) run(ctx context.Context, st Store) {
	var wg sync.WaitGroup
	for range auditWriters {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-ctx.Done():
					return
				case ev := <-a.queue:
					a.write(ctx, st, ev)
				}
			}
		}()
	}
	tick := time.NewTicker(dropReportInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			wg.Wait()
			return
		case <-tick.C:
			if n := a.dropped.Swap(0); n > 0 {
				a.logger.Warn("audit events dropped: the queue was full (the decisions are in this log)", zap.Int64("count", n))
			}
		}
	}
}

func (a *auditor) write(ctx context.Context, st Store, ev auditEvent) {
	if err := a.pace.Wait(ctx); err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, auditWriteTimeout)
	defer cancel()
	if err := st.Event(ctx, ev.ref, ev.warning, ev.reason, ev.message); err != nil {
		a.logger.Warn("recording audit event", zap.String("node", ev.ref.Name), zap.String("reason", ev.reason), zap.Error(err))
	}
}
