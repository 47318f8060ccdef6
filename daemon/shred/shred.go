// Package shred crypto-shreds revoked nodes. A SovraNode's key salt, with
// the daemon's master key, opens every key the node sealed; deleting the
// record (kubectl delete sovranode) revokes the node, and must leave no
// copy of the salt anywhere sovrad writes. The shredder runs in every
// replica whenever the API runs:
//
//   - it puts the finalizer v1alpha1.FinalizerShred on every record that
//     holds a salt (the KMS adds it itself before it writes a salt; this
//     covers records that got one some other way);
//   - when such a record is deleted, it removes the salt from it (a status
//     update), then the finalizer, each on the exact version it read: the
//     row the datastore writes for the delete holds no salt, and neither
//     does a record re-created under the same name (whose first row keeps
//     the deleted value as its predecessor);
//   - it makes the datastore forget: Settle after a delete reached this
//     replica, it compacts the datastore's history up to the delete's
//     revision and checkpoints it (on SQLite: secure_delete has zeroed the
//     rows, and the write-ahead log is emptied); and every Interval it does
//     the same up to the revision then current, so that superseded versions
//     of live records go too.
//
// The bounds that follow, documented in docs/operators.md: on SQLite no
// copy of a deleted record's salt is left in the data directory 30 seconds
// after the delete completes (Settle, about 5 seconds, plus retries). A
// value a live record replaced goes about Interval plus Settle after the
// record's next write (the datastore keeps each record's previous version
// beside the current one until then). On PostgreSQL the rows go as fast;
// their bytes stay in the table's files until VACUUM FULL.
package shred

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"go.uber.org/zap"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	toolscache "k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/utils/clock"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/attestation"
)

const (
	// DefaultSettle is how long the shredder waits, after a delete reached
	// this replica, before it compacts to the delete's revision: time for
	// every replica's datastore watch (which polls every second) to have
	// read past it, since compacting what a watch has not read loses it
	// events.
	DefaultSettle = 5 * time.Second
	// DefaultInterval paces the periodic compaction.
	DefaultInterval = time.Minute

	// retryBase and retryMax bound the backoff of a record whose finalizer
	// work failed (a conflict, the API unavailable): short, since the
	// shredding bound waits on it.
	retryBase = 50 * time.Millisecond
	retryMax  = 5 * time.Second
	// forgetRetry paces retries of a failed compaction or checkpoint.
	forgetRetry = 2 * time.Second
	// deletionBuffer is how many deletes may wait for the forgetter.
	deletionBuffer = 1024
)

// Datastore is what the shredder needs from the datastore (package
// datastore implements it).
type Datastore interface {
	// Revision is the newest revision the datastore delivered to watchers.
	Revision(ctx context.Context) (int64, error)
	// Compact forgets the history up to revision, which must already have
	// been delivered to watchers.
	Compact(ctx context.Context, revision int64) error
	// Checkpoint removes compacted rows from the storage's logs, where it can.
	Checkpoint(ctx context.Context) error
}

// Config is what the shredder runs with.
type Config struct {
	// Kubeconfig is the shredder's client configuration for the daemon's
	// API (in sovrad, its own identity).
	Kubeconfig *rest.Config
	// Datastore is the datastore under the API.
	Datastore Datastore
	// Settle is the wait between a delete reaching this replica and the
	// compaction to it; zero means DefaultSettle.
	Settle time.Duration
	// Interval paces the periodic compaction; zero means DefaultInterval.
	Interval time.Duration
	// Clock is the time source; nil means the real clock.
	Clock clock.WithTicker
}

// Run runs the shredder until ctx ends. It returns an error only when it
// cannot start.
func Run(ctx context.Context, cfg Config, log *zap.Logger) error {
	if cfg.Settle == 0 {
		cfg.Settle = DefaultSettle
	}
	if cfg.Interval == 0 {
		cfg.Interval = DefaultInterval
	}
	if cfg.Clock == nil {
		cfg.Clock = clock.RealClock{}
	}
	scheme, err := attestation.Scheme()
	if err != nil {
		return err
	}
	kcfg := rest.CopyConfig(cfg.Kubeconfig)
	kcfg.ContentType = runtime.ContentTypeJSON
	c, err := client.New(kcfg, client.Options{Scheme: scheme})
	if err != nil {
		return fmt.Errorf("creating the shredder's API client: %w", err)
	}
	f := &forgetter{
		ds: cfg.Datastore, settle: cfg.Settle, interval: cfg.Interval, clock: cfg.Clock, log: log,
		deletions: make(chan deletion, deletionBuffer),
	}
	s := &shredder{
		client: c, clock: cfg.Clock, log: log, forget: f.deletions,
		queue: workqueue.NewTypedRateLimitingQueue(
			workqueue.NewTypedItemExponentialFailureRateLimiter[string](retryBase, retryMax)),
		requested: map[types.UID]time.Time{},
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Add(1)
	go func() { defer wg.Done(); f.run(ctx) }()

	// The cache looks the kind up when it is created: after the CRDs.
	if err := attestation.WaitForCRDs(ctx, c); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	ca, err := cache.New(kcfg, cache.Options{Scheme: scheme, ByObject: map[client.Object]cache.ByObject{
		&v1alpha1.SovraNode{}: {Transform: slim},
	}})
	if err != nil {
		return fmt.Errorf("creating the shredder's node cache: %w", err)
	}
	inf, err := ca.GetInformer(ctx, &v1alpha1.SovraNode{})
	if err != nil {
		return fmt.Errorf("creating the shredder's node informer: %w", err)
	}
	if _, err := inf.AddEventHandler(toolscache.ResourceEventHandlerFuncs{
		AddFunc:    s.observe,
		UpdateFunc: func(_, obj any) { s.observe(obj) },
		DeleteFunc: func(obj any) { s.deleted(ctx, obj) },
	}); err != nil {
		return fmt.Errorf("watching node records: %w", err)
	}
	wg.Add(2)
	go func() {
		defer wg.Done()
		if err := ca.Start(ctx); err != nil {
			log.Error("node cache stopped", zap.Error(err))
		}
	}()
	go func() {
		defer wg.Done()
		for s.next(ctx) {
		}
	}()
	log.Info("shredding revoked nodes' key salts",
		zap.Duration("settle", cfg.Settle), zap.Duration("interval", cfg.Interval))
	<-ctx.Done()
	s.queue.ShutDown()
	return nil
}

// saltMarker stands in the cache for a salt: the shredder's cache never
// holds one.
var saltMarker = []byte{0}

// slim keeps of a cached record what the event handlers read: its
// identity, deletion state and finalizers, and whether it holds a salt.
func slim(obj any) (any, error) {
	n, ok := obj.(*v1alpha1.SovraNode)
	if !ok {
		return obj, nil
	}
	out := &v1alpha1.SovraNode{ObjectMeta: metav1.ObjectMeta{
		Name: n.Name, UID: n.UID, ResourceVersion: n.ResourceVersion,
		DeletionTimestamp: n.DeletionTimestamp, Finalizers: n.Finalizers,
	}}
	if len(n.Status.KeySalt) > 0 {
		out.Status.KeySalt = saltMarker
	}
	return out, nil
}

// revision parses a resource version, which on this API server is the
// datastore revision.
func revision(rv string) (int64, error) {
	r, err := strconv.ParseInt(rv, 10, 64)
	if err != nil || r <= 0 {
		return 0, errors.New("not a datastore revision")
	}
	return r, nil
}
