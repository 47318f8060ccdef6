package shred

import (
	"context"
	"fmt"
	"sync"
	"time"

	"go.uber.org/zap"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/types"
	toolscache "k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/utils/clock"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
)

// shredder keeps the finalizer on node records that hold a salt, removes
// the salt from deleted ones, and hands their deletes to the forgetter.
type shredder struct {
	client client.Client
	clock  clock.Clock
	log    *zap.Logger
	// queue holds the names of records with finalizer work.
	queue workqueue.TypedRateLimitingInterface[string]
	// forget receives the records' deletes.
	forget chan<- deletion

	// mu guards requested: when this replica first saw each record's
	// delete requested, by UID, until the record is gone.
	mu        sync.Mutex
	requested map[types.UID]time.Time
}

// observe queues a record that needs finalizer work, and notes when its
// delete was requested.
func (s *shredder) observe(obj any) {
	n, ok := obj.(*v1alpha1.SovraNode)
	if !ok {
		return
	}
	if n.DeletionTimestamp != nil {
		s.mu.Lock()
		if _, ok := s.requested[n.UID]; !ok {
			s.requested[n.UID] = s.clock.Now()
		}
		s.mu.Unlock()
	}
	if needsWork(n) {
		s.queue.Add(n.Name)
	}
}

// needsWork: a record holding a salt lacks the finalizer, or a deleted
// record still has it.
func needsWork(n *v1alpha1.SovraNode) bool {
	has := controllerutil.ContainsFinalizer(n, v1alpha1.FinalizerShred)
	if n.DeletionTimestamp != nil {
		return has
	}
	return len(n.Status.KeySalt) > 0 && !has
}

// deleted hands a record's delete to the forgetter. The object of a delete
// event carries the delete's revision: a revision the API server's watch
// has read. A delete this replica missed (it saw only the record's absence
// on a relist) has no revision; the periodic compaction covers it.
func (s *shredder) deleted(ctx context.Context, obj any) {
	n, ok := obj.(*v1alpha1.SovraNode)
	if !ok {
		if tomb, isTomb := obj.(toolscache.DeletedFinalStateUnknown); isTomb {
			if n, ok := tomb.Obj.(*v1alpha1.SovraNode); ok {
				s.done(n.UID)
				s.log.Debug("node record delete missed; the periodic compaction covers it", zap.String("node", n.Name))
			}
		}
		return
	}
	now := s.clock.Now()
	requested := s.done(n.UID)
	if requested.IsZero() {
		requested = now
	}
	rev, err := revision(n.ResourceVersion)
	if err != nil {
		s.log.Warn("node record delete without a revision; the periodic compaction covers it", zap.String("node", n.Name))
		return
	}
	select {
	case s.forget <- deletion{node: n.Name, revision: rev, requested: requested, seen: now}:
	case <-ctx.Done():
	}
}

// done forgets when record uid's delete was requested, and returns it.
func (s *shredder) done(uid types.UID) time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.requested[uid]
	delete(s.requested, uid)
	return t
}

// next works on one queued record; it returns false once the queue is shut.
func (s *shredder) next(ctx context.Context) bool {
	name, quit := s.queue.Get()
	if quit {
		return false
	}
	defer s.queue.Done(name)
	if err := s.reconcile(ctx, name); err != nil {
		if apierrors.IsConflict(err) {
			s.log.Debug("node record changed while its finalizer was worked on; retrying", zap.String("node", name))
		} else {
			s.log.Warn("node record finalizer work failed; retrying", zap.String("node", name), zap.Error(err))
		}
		s.queue.AddRateLimited(name)
		return true
	}
	s.queue.Forget(name)
	return true
}

// reconcile reads record name from the API (not the cache: the cache
// holds no salts) and does its finalizer work. Every write carries the
// resourceVersion it read, so the finalizer goes only from a version whose
// salt is gone: a salt written meanwhile (by a KMS that raced the delete)
// makes the write fail, and the next round removes it too.
func (s *shredder) reconcile(ctx context.Context, name string) error {
	var n v1alpha1.SovraNode
	if err := s.client.Get(ctx, client.ObjectKey{Name: name}, &n); err != nil {
		if apierrors.IsNotFound(err) {
			return nil
		}
		return fmt.Errorf("reading node record %s: %w", name, err)
	}
	if !needsWork(&n) {
		return nil
	}
	if n.DeletionTimestamp == nil {
		controllerutil.AddFinalizer(&n, v1alpha1.FinalizerShred)
		if err := s.client.Update(ctx, &n); err != nil {
			return fmt.Errorf("adding the shred finalizer to node record %s: %w", name, err)
		}
		s.log.Debug("shred finalizer added", zap.String("node", name))
		return nil
	}
	if len(n.Status.KeySalt) > 0 {
		n.Status.KeySalt = nil
		if err := s.client.Status().Update(ctx, &n); err != nil {
			return fmt.Errorf("removing the key salt of deleted node record %s: %w", name, err)
		}
	}
	controllerutil.RemoveFinalizer(&n, v1alpha1.FinalizerShred)
	if err := s.client.Update(ctx, &n); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("removing the shred finalizer of node record %s: %w", name, err)
	}
	s.log.Debug("key salt removed from deleted node record", zap.String("node", name))
	return nil
}
