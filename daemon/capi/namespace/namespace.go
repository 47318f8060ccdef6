// Package namespace runs the upstream Kubernetes namespace controller
// (k8s.io/kubernetes/pkg/controller/namespace) in sovrad. The generic control
// plane has no kube-controller-manager, so without it `kubectl delete
// namespace` would leave the namespace Terminating forever: nothing would
// delete its contents and remove the kubernetes finalizer.
package namespace

import (
	"context"
	"fmt"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/metadata"
	"k8s.io/client-go/rest"
	namespacecontroller "k8s.io/kubernetes/pkg/controller/namespace"
)

const (
	userAgent = "sovrad/namespace-controller"
	// syncPeriod and workers are kube-controller-manager's defaults
	// (--namespace-sync-period, --concurrent-namespace-syncs).
	syncPeriod = 5 * time.Minute
	workers    = 10
	// qpsFactor and burstFactor raise the client's rate as
	// kube-controller-manager does: emptying a namespace is many deletions.
	qpsFactor   = 20
	burstFactor = 100
)

// Controller is a controller-runtime Runnable that runs the namespace
// controller on the leader only.
type Controller struct {
	// Config is a privileged client configuration for the daemon's API.
	Config *rest.Config
	Log    *zap.Logger
}

// NeedLeaderElection is true.
func (c *Controller) NeedLeaderElection() bool { return true }

// Start runs the controller until ctx ends.
func (c *Controller) Start(ctx context.Context) error {
	cfg := rest.CopyConfig(c.Config)
	cfg.UserAgent = userAgent
	cfg.QPS *= qpsFactor
	cfg.Burst *= burstFactor
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("starting the namespace controller: %w", err)
	}
	meta, err := metadata.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("starting the namespace controller: %w", err)
	}
	shared := informers.NewSharedInformerFactory(kube, 0)
	ctrl := namespacecontroller.NewNamespaceController(ctx, kube, meta,
		kube.Discovery().ServerPreferredNamespacedResources,
		shared.Core().V1().Namespaces(), syncPeriod, corev1.FinalizerKubernetes)
	shared.Start(ctx.Done())
	go ctrl.Run(ctx, workers)
	c.Log.Info("namespace controller running")
	<-ctx.Done()
	shared.Shutdown()
	return nil
}
