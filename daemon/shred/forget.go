package shred

import (
	"context"
	"time"

	"go.uber.org/zap"
	"k8s.io/utils/clock"
)

// deletion is a node record's delete as this replica saw it.
type deletion struct {
	node     string
	revision int64
	// requested is when this replica first saw the delete requested (or the
	// delete itself, when it saw no request); seen is when it saw the delete.
	requested, seen time.Time
}

// job is a compaction to do once due: for a delete (node set) or for the
// periodic round (node empty).
type job struct {
	node      string
	revision  int64
	requested time.Time
	due       time.Time
}

// forgetter makes the datastore forget: it compacts to each delete's
// revision once it has settled, and periodically to the revision current
// a settle before, and checkpoints after each compaction.
type forgetter struct {
	ds               Datastore
	settle, interval time.Duration
	clock            clock.WithTicker
	log              *zap.Logger
	deletions        chan deletion
}

func (f *forgetter) run(ctx context.Context) {
	tick := f.clock.NewTicker(f.interval)
	defer tick.Stop()
	var pending []job
	for {
		var wake <-chan time.Time
		var timer clock.Timer
		if len(pending) > 0 {
			timer = f.clock.NewTimer(earliest(pending).Sub(f.clock.Now()))
			wake = timer.C()
		}
		select {
		case <-ctx.Done():
			if timer != nil {
				timer.Stop()
			}
			return
		case d := <-f.deletions:
			pending = append(pending, job{node: d.node, revision: d.revision, requested: d.requested, due: d.seen.Add(f.settle)})
		case <-tick.C():
			rev, err := f.ds.Revision(ctx)
			if err != nil {
				f.log.Warn("reading the datastore revision failed; compacting at the next round", zap.Error(err))
				break
			}
			pending = append(pending, job{revision: rev, due: f.clock.Now().Add(f.settle)})
		case <-wake:
		}
		if timer != nil {
			timer.Stop()
		}
		pending = f.forgetDue(ctx, pending)
	}
}

func earliest(jobs []job) time.Time {
	t := jobs[0].due
	for _, j := range jobs[1:] {
		if j.due.Before(t) {
			t = j.due
		}
	}
	return t
}

// forgetDue compacts to the highest revision among the due jobs and
// checkpoints, logs each delete so shredded, and returns the jobs left:
// those not due, and on failure the due ones again, for a retry.
func (f *forgetter) forgetDue(ctx context.Context, pending []job) []job {
	now := f.clock.Now()
	var due, rest []job
	var target int64
	for _, j := range pending {
		if j.due.After(now) {
			rest = append(rest, j)
			continue
		}
		due = append(due, j)
		target = max(target, j.revision)
	}
	if len(due) == 0 {
		return pending
	}
	if err := f.forget(ctx, target); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		f.log.Warn("compacting the datastore failed; retrying", zap.Int64("revision", target), zap.Error(err))
		for i := range due {
			due[i].due = now.Add(forgetRetry)
		}
		return append(rest, due...)
	}
	end := f.clock.Now()
	for _, j := range due {
		if j.node != "" {
			f.log.Info("key salt of deleted node record shredded from the datastore",
				zap.String("node", j.node), zap.Int64("revision", j.revision),
				zap.Int64("compactedTo", target), zap.Duration("took", end.Sub(j.requested)))
		}
	}
	f.log.Debug("datastore compacted and checkpointed", zap.Int64("revision", target), zap.Duration("took", end.Sub(now)))
	return rest
}

func (f *forgetter) forget(ctx context.Context, revision int64) error {
	if err := f.ds.Compact(ctx, revision); err != nil {
		return err
	}
	return f.ds.Checkpoint(ctx)
}
