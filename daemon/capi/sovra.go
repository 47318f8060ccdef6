package capi

import (
	"context"
	"fmt"
	"net/http"

	"github.com/go-logr/zapr"
	"go.uber.org/zap"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/record"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/cluster"

	infrav1 "github.com/sovra-dev/sovra/daemon/apis/infrastructure/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/attestation"
	"github.com/sovra-dev/sovra/daemon/capi/crds"
	"github.com/sovra-dev/sovra/daemon/capi/infra"
	"github.com/sovra-dev/sovra/daemon/capi/infraref"
	"github.com/sovra-dev/sovra/daemon/hosts"
	"github.com/sovra-dev/sovra/internal/version"
)

const (
	// sovraProviderName names sovra's own infrastructure provider among the
	// providers whose CRDs Run installs.
	sovraProviderName = "infrastructure-sovra"
	// providerLabel names a CRD's provider, as clusterctl's provider contract
	// asks of every provider component (upstream's manifests carry it).
	providerLabel = "cluster.x-k8s.io/provider"
)

// Providers returns the Cluster API providers sovrad serves: the pinned
// upstream ones and sovra's own. The RBAC of Cluster API's identity and the
// manager are built from the same list.
func Providers() ([]crds.Provider, error) {
	providers, err := crds.Providers()
	if err != nil {
		return nil, err
	}
	own, err := sovraProvider()
	if err != nil {
		return nil, err
	}
	return append(providers, own), nil
}

// sovraProvider is sovra's infrastructure provider as a crds.Provider: its
// CRDs, labelled with the provider's name, applied with the others, and the
// registration of the webhook that refuses infrastructure references sovrad
// cannot serve (package infraref).
func sovraProvider() (crds.Provider, error) {
	typed, err := infrav1.CRDs()
	if err != nil {
		return crds.Provider{}, err
	}
	p := crds.Provider{
		Name:       sovraProviderName,
		Module:     "github.com/sovra-dev/sovra@" + version.Version,
		Validating: []*admissionregistrationv1.ValidatingWebhookConfiguration{infraref.Registration()},
	}
	for _, crd := range typed {
		obj, err := runtime.DefaultUnstructuredConverter.ToUnstructured(crd)
		if err != nil {
			return p, fmt.Errorf("converting CRD %s: %w", crd.Name, err)
		}
		u := &unstructured.Unstructured{Object: obj}
		u.SetAPIVersion("apiextensions.k8s.io/v1")
		u.SetKind("CustomResourceDefinition")
		unstructured.RemoveNestedField(u.Object, "status")
		unstructured.RemoveNestedField(u.Object, "metadata", "creationTimestamp")
		labels := u.GetLabels()
		if labels == nil {
			labels = map[string]string{}
		}
		labels[providerLabel] = sovraProviderName
		u.SetLabels(labels)
		p.CRDs = append(p.CRDs, u)
	}
	return p, nil
}

// installHostKinds installs the sovra.dev CRDs (SovraNode, Host) that
// sovra's infrastructure provider and the host pool's reconciler watch, and
// waits for them. The node API installs them too, but a replica without it
// (--node-listen=) runs these controllers as well, and their caches would
// never sync: the manager, and sovrad, would stop after its cache-sync
// timeout. Installing twice is harmless (install retries a conflict).
func installHostKinds(ctx context.Context, c client.Client) error {
	if err := attestation.InstallCRDs(ctx, c); err != nil {
		return err
	}
	return attestation.WaitForCRDs(ctx, c)
}

// setupSovra registers sovra's infrastructure provider (SovraCluster,
// SovraMachine), the release of deleted Clusters whose infrastructure kind
// is missing (package infraref) and the host pool's reconciler. They run in
// mgr, on the leader, and each writes, reads uncached and records events as
// its own user (package identity): the provider as cfg.Infrastructure, the
// reconciler as cfg.Hosts (see asComponent for their cached reads); the
// release acts as Cluster API's manager, whose Clusters it finishes deleting.
func setupSovra(mgr ctrl.Manager, cfg Config, log *zap.Logger) error {
	infraMgr, err := asComponent(mgr, cfg.Infrastructure)
	if err != nil {
		return fmt.Errorf("setting up the infrastructure provider's client: %w", err)
	}
	hostsMgr, err := asComponent(mgr, cfg.Hosts)
	if err != nil {
		return fmt.Errorf("setting up the host pool's client: %w", err)
	}
	clusterLog := zapr.NewLogger(log.Named("sovracluster"))
	if err := (&infra.ClusterReconciler{Client: infraMgr.GetClient()}).SetupWithManager(infraMgr, clusterLog); err != nil {
		return err
	}
	if err := (&infra.MachineReconciler{
		Client: infraMgr.GetClient(), APIReader: infraMgr.GetAPIReader(),
		Events: infraMgr.GetEventRecorderFor("sovra-infrastructure"), Logger: log.Named("sovramachine"),
	}).SetupWithManager(infraMgr, zapr.NewLogger(log.Named("sovramachine"))); err != nil {
		return err
	}
	if err := (&infraref.MissingInfrastructureReconciler{
		Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(),
		Events: mgr.GetEventRecorderFor("sovra-infrastructure"), Logger: log.Named("missing-infrastructure"),
	}).SetupWithManager(mgr); err != nil {
		return err
	}
	return (&hosts.Reconciler{
		Client: hostsMgr.GetClient(), APIReader: hostsMgr.GetAPIReader(), Events: hostsMgr.GetEventRecorderFor("sovra-hosts"),
		Logger: log.Named("hosts"), Daemon: cfg.HostsDaemon,
	}).SetupWithManager(hostsMgr)
}

// component is a manager whose client side (client, API reader, event
// recorder) is that of another user: controllers built on it are added to,
// and run by, the manager it wraps, but act as that user.
type component struct {
	ctrl.Manager
	cluster cluster.Cluster
}

// asComponent returns mgr acting as the user of cfg for what the API
// authorizes per request: writes, uncached reads (the API reader, and the
// kinds clientOptions keeps out of the cache) and events, so that the audit
// log names the component and its RBAC bounds what it can change. Its
// cached reads and watches come from mgr's cache, which mgr fills as
// Cluster API's user, and so does its REST mapper: a cache of its own would
// hold a second copy of the same kinds (Clusters, Machines, Hosts,
// SovraNodes), with its own watches, connection and discovery, for nothing
// (tests/daemon BenchmarkDaemon). Cluster API's user may therefore read what
// the components read from their caches (package identity grants it); the
// components' own read rules still bound their uncached reads.
func asComponent(mgr ctrl.Manager, cfg *rest.Config) (*component, error) {
	c, err := cluster.New(clientConfig(cfg), func(o *cluster.Options) {
		o.Scheme = mgr.GetScheme()
		o.MapperProvider = func(*rest.Config, *http.Client) (meta.RESTMapper, error) { return mgr.GetRESTMapper(), nil }
		o.NewCache = func(*rest.Config, cache.Options) (cache.Cache, error) { return sharedCache{mgr.GetCache()}, nil }
		o.Client = clientOptions()
	})
	if err != nil {
		return nil, err
	}
	// mgr runs the component's event recorder until it stops.
	if err := mgr.Add(c); err != nil {
		return nil, err
	}
	return &component{Manager: mgr, cluster: c}, nil
}

// sharedCache is a manager's cache lent to a component: the manager starts
// and syncs it; the component's Start only waits for the manager to stop.
type sharedCache struct{ cache.Cache }

// Start waits until ctx ends.
func (sharedCache) Start(ctx context.Context) error {
	<-ctx.Done()
	return nil
}

func (m *component) GetHTTPClient() *http.Client          { return m.cluster.GetHTTPClient() }
func (m *component) GetConfig() *rest.Config              { return m.cluster.GetConfig() }
func (m *component) GetCache() cache.Cache                { return m.cluster.GetCache() }
func (m *component) GetClient() client.Client             { return m.cluster.GetClient() }
func (m *component) GetFieldIndexer() client.FieldIndexer { return m.cluster.GetFieldIndexer() }
func (m *component) GetRESTMapper() meta.RESTMapper       { return m.cluster.GetRESTMapper() }
func (m *component) GetAPIReader() client.Reader          { return m.cluster.GetAPIReader() }
func (m *component) GetEventRecorderFor(name string) record.EventRecorder {
	return m.cluster.GetEventRecorderFor(name)
}
