package kubecontrollers

import (
	"context"
	"fmt"

	"k8s.io/kubernetes/pkg/controller/garbagecollector"

	"github.com/sovra-dev/sovra/daemon/capi/controllers"
)

const (
	gcAgent = "garbage-collector"
	// gcWorkers is kube-controller-manager's --concurrent-gc-syncs.
	gcWorkers = 20
	// gcQPSFactor lets the collector delete at the configured rate: each
	// deletion is two requests.
	gcQPSFactor = 2
)

// garbageCollector follows ownerReferences: deleting a Cluster deletes the
// Secrets, Machines' bootstrap data and everything else its providers
// created with an owner.
var garbageCollector = controller{name: controllers.GarbageCollector, start: startGarbageCollector}

func startGarbageCollector(ctx context.Context, cc *controllerContext) error {
	cfg := cc.restConfig(gcAgent)
	cfg.QPS *= gcQPSFactor
	kube, meta, err := clients(cfg)
	if err != nil {
		return err
	}
	collector, err := garbagecollector.NewGarbageCollector(ctx, kube, meta, cc.mapper,
		garbagecollector.DefaultIgnoredResources(), cc.objectOrMetadata, cc.informersStarted)
	if err != nil {
		return fmt.Errorf("creating the garbage collector: %w", err)
	}
	go collector.Run(ctx, gcWorkers, discoverySyncPeriod)
	go collector.Sync(ctx, kube.Discovery(), discoverySyncPeriod)
	return nil
}
