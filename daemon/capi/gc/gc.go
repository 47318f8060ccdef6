// Package gc runs the upstream Kubernetes garbage collector
// (k8s.io/kubernetes/pkg/controller/garbagecollector) in sovrad. The generic
// control plane has no kube-controller-manager, so without it nothing follows
// ownerReferences: deleting a Cluster would orphan the Secrets, Machines'
// bootstrap data and everything else its providers create with an owner.
package gc

import (
	"context"
	"fmt"
	"time"

	"go.uber.org/zap"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/metadata"
	"k8s.io/client-go/metadata/metadatainformer"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"k8s.io/controller-manager/pkg/informerfactory"
	"k8s.io/kubernetes/pkg/controller/garbagecollector"
)

const (
	userAgent = "sovrad/garbage-collector"
	// syncPeriod is how often new resource types (new CRDs) are picked up, as
	// in kube-controller-manager.
	syncPeriod = 30 * time.Second
	// workers is kube-controller-manager's default --concurrent-gc-syncs.
	workers = 20
)

// Collector is a controller-runtime Runnable that runs the garbage collector
// on the leader only: two collectors would race on the same deletions.
type Collector struct {
	// Config is a privileged client configuration for the daemon's API.
	Config *rest.Config
	Log    *zap.Logger
}

// NeedLeaderElection is true.
func (c *Collector) NeedLeaderElection() bool { return true }

// Start runs the collector until ctx ends.
func (c *Collector) Start(ctx context.Context) error {
	cfg := rest.CopyConfig(c.Config)
	cfg.UserAgent = userAgent
	// Each deletion is two requests: let it delete at the configured rate.
	cfg.QPS *= 2
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("starting the garbage collector: %w", err)
	}
	meta, err := metadata.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("starting the garbage collector: %w", err)
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(kube.Discovery()))
	shared := informers.NewSharedInformerFactory(kube, 0)
	metaInformers := metadatainformer.NewSharedInformerFactory(meta, 0)
	started := make(chan struct{})
	collector, err := garbagecollector.NewGarbageCollector(ctx, kube, meta, mapper,
		garbagecollector.DefaultIgnoredResources(),
		informerfactory.NewInformerFactory(shared, metaInformers), started)
	if err != nil {
		return fmt.Errorf("starting the garbage collector: %w", err)
	}
	shared.Start(ctx.Done())
	metaInformers.Start(ctx.Done())
	close(started)
	go collector.Run(ctx, workers, syncPeriod)
	go collector.Sync(ctx, kube.Discovery(), syncPeriod)
	c.Log.Info("garbage collector running")
	<-ctx.Done()
	shared.Shutdown()
	metaInformers.Shutdown()
	return nil
}
