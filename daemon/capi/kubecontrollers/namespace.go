package kubecontrollers

import (
	"context"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/metadata"
	"k8s.io/client-go/rest"
	namespacecontroller "k8s.io/kubernetes/pkg/controller/namespace"

	"github.com/sovra-dev/sovra/daemon/capi/controllers"
)

const (
	namespaceAgent = "namespace-controller"
	// namespaceSyncPeriod and namespaceWorkers are kube-controller-manager's
	// --namespace-sync-period and --concurrent-namespace-syncs.
	namespaceSyncPeriod = 5 * time.Minute
	namespaceWorkers    = 10
	// namespaceQPSFactor and namespaceBurstFactor raise the client's rate as
	// kube-controller-manager does: emptying a namespace is many deletions.
	namespaceQPSFactor   = 20
	namespaceBurstFactor = 100
)

// namespaceController empties a deleted namespace and removes its
// kubernetes finalizer; without it `kubectl delete namespace` would leave
// the namespace Terminating forever.
var namespaceController = controller{name: controllers.Namespace, start: startNamespaceController}

func startNamespaceController(ctx context.Context, cc *controllerContext) error {
	cfg := cc.restConfig(namespaceAgent)
	cfg.QPS *= namespaceQPSFactor
	cfg.Burst *= namespaceBurstFactor
	kube, meta, err := clients(cfg)
	if err != nil {
		return err
	}
	c := namespacecontroller.NewNamespaceController(ctx, kube, meta,
		kube.Discovery().ServerPreferredNamespacedResources,
		cc.informers.Core().V1().Namespaces(), namespaceSyncPeriod, corev1.FinalizerKubernetes)
	go c.Run(ctx, namespaceWorkers)
	return nil
}

// clients are the typed and metadata clients on cfg.
func clients(cfg *rest.Config) (kubernetes.Interface, metadata.Interface, error) {
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, nil, fmt.Errorf("creating the %s client: %w", cfg.UserAgent, err)
	}
	meta, err := metadata.NewForConfig(cfg)
	if err != nil {
		return nil, nil, fmt.Errorf("creating the %s metadata client: %w", cfg.UserAgent, err)
	}
	return kube, meta, nil
}
