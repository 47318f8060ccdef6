// Package kubecontrollers runs, in sovrad's process, the upstream
// kube-controller-manager controllers (k8s.io/kubernetes/pkg/controller) that
// the types sovrad serves rely on: the generic control plane has no
// kube-controller-manager, so without them nothing follows ownerReferences,
// deleted namespaces stay Terminating, the built-in view, edit and admin
// roles stay empty, namespaces get no default ServiceAccount and no
// kube-root-ca.crt, ResourceQuotas block what they govern, CSRs pile up and
// ValidatingAdmissionPolicies are never type-checked. Each controller is
// built with its upstream constructor, one a file, and all share one informer
// factory, as in kube-controller-manager.
package kubecontrollers

import (
	"context"
	"fmt"
	"time"

	"go.uber.org/zap"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/metadata"
	"k8s.io/client-go/metadata/metadatainformer"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"k8s.io/controller-manager/pkg/informerfactory"

	"github.com/sovra-dev/sovra/daemon/capi/controllers"
)

const (
	// userAgentPrefix names each controller's client in the audit log, as
	// sovrad/<controller>.
	userAgentPrefix = "sovrad/"
	// informersAgent names the shared informers' client.
	informersAgent = "shared-informers"
	// discoverySyncPeriod is how often the garbage collector and the quota
	// controller pick up new resource types (new CRDs), and the REST mapper
	// forgets what it discovered, as in kube-controller-manager.
	discoverySyncPeriod = 30 * time.Second
	// minResyncPeriod is kube-controller-manager's --min-resync-period.
	minResyncPeriod = 12 * time.Hour
)

// Manager is a controller-runtime Runnable that runs the selected upstream
// controllers on the leader only: two of each would race on the same writes.
type Manager struct {
	// Config is the controllers' client configuration: their own identity
	// (package identity), which RBAC grants what kube-controller-manager's
	// controllers get.
	Config *rest.Config
	// RootCA is the CA bundle the root CA publisher puts in every
	// namespace's kube-root-ca.crt: the daemon's CA, which verifies the API.
	RootCA []byte
	// Selected are the controllers to run (--controllers); those of other
	// packages are ignored.
	Selected controllers.Set
	Log      *zap.Logger
}

// controller is one upstream controller: start builds it on cc and runs it
// until ctx ends, without blocking.
type controller struct {
	name  string
	start func(ctx context.Context, cc *controllerContext) error
}

// all are the controllers this package runs, in the order they start.
var all = []controller{
	garbageCollector, namespaceController, clusterRoleAggregation, serviceAccounts,
	rootCACertPublisher, resourceQuota, csrCleaner, admissionPolicyStatus,
}

// Any reports whether sel selects a controller of this package.
func Any(sel controllers.Set) bool {
	for _, c := range all {
		if sel.Has(c.name) {
			return true
		}
	}
	return false
}

// NeedLeaderElection is true.
func (m *Manager) NeedLeaderElection() bool { return true }

// Start runs the selected controllers until ctx ends.
func (m *Manager) Start(ctx context.Context) error {
	cc, err := newControllerContext(m.Config, m.RootCA)
	if err != nil {
		return err
	}
	var started []string
	for _, c := range all {
		if !m.Selected.Has(c.name) {
			continue
		}
		if err := c.start(ctx, cc); err != nil {
			return fmt.Errorf("starting the %s controller: %w", c.name, err)
		}
		started = append(started, c.name)
	}
	cc.informers.Start(ctx.Done())
	cc.metadataInformers.Start(ctx.Done())
	close(cc.informersStarted)
	go cc.resetMapper(ctx)
	m.Log.Info("upstream controllers running", zap.Strings("controllers", started))
	<-ctx.Done()
	cc.informers.Shutdown()
	cc.metadataInformers.Shutdown()
	return nil
}

// controllerContext is what the controllers share, as kube-controller-manager's
// ControllerContext.
type controllerContext struct {
	config *rest.Config
	rootCA []byte
	// informers are typed informers on every built-in type;
	// metadataInformers the others' metadata. objectOrMetadata is both, as
	// the garbage collector and the quota controller want them.
	informers         informers.SharedInformerFactory
	metadataInformers metadatainformer.SharedInformerFactory
	objectOrMetadata  informerfactory.InformerFactory
	// informersStarted is closed once the informers were started.
	informersStarted chan struct{}
	discovery        discovery.DiscoveryInterface
	mapper           *restmapper.DeferredDiscoveryRESTMapper
}

func newControllerContext(cfg *rest.Config, rootCA []byte) (*controllerContext, error) {
	cc := &controllerContext{config: cfg, rootCA: rootCA, informersStarted: make(chan struct{})}
	kube, err := cc.client(informersAgent)
	if err != nil {
		return nil, err
	}
	meta, err := cc.metadataClient(informersAgent)
	if err != nil {
		return nil, err
	}
	cc.informers = informers.NewSharedInformerFactory(kube, minResyncPeriod)
	cc.metadataInformers = metadatainformer.NewSharedInformerFactory(meta, minResyncPeriod)
	cc.objectOrMetadata = informerfactory.NewInformerFactory(cc.informers, cc.metadataInformers)
	cc.discovery = kube.Discovery()
	cc.mapper = restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(cc.discovery))
	return cc, nil
}

// restConfig is the controllers' configuration with agent's user agent.
func (cc *controllerContext) restConfig(agent string) *rest.Config {
	cfg := rest.CopyConfig(cc.config)
	cfg.UserAgent = userAgentPrefix + agent
	return cfg
}

func (cc *controllerContext) client(agent string) (kubernetes.Interface, error) {
	c, err := kubernetes.NewForConfig(cc.restConfig(agent))
	if err != nil {
		return nil, fmt.Errorf("creating the %s client: %w", agent, err)
	}
	return c, nil
}

func (cc *controllerContext) metadataClient(agent string) (metadata.Interface, error) {
	c, err := metadata.NewForConfig(cc.restConfig(agent))
	if err != nil {
		return nil, fmt.Errorf("creating the %s metadata client: %w", agent, err)
	}
	return c, nil
}

// resetMapper makes the REST mapper discover again every period, as
// kube-controller-manager does, so that new CRDs are mapped.
func (cc *controllerContext) resetMapper(ctx context.Context) {
	t := time.NewTicker(discoverySyncPeriod)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			cc.mapper.Reset()
		}
	}
}
