package capi

import (
	"context"
	"fmt"
	"slices"
	"time"

	bootstrapv1alpha3 "github.com/siderolabs/cluster-api-bootstrap-provider-talos/api/v1alpha3"
	cabpt "github.com/siderolabs/cluster-api-bootstrap-provider-talos/controllers"
	controlplanev1alpha3 "github.com/siderolabs/cluster-api-control-plane-provider-talos/api/v1alpha3"
	cacppt "github.com/siderolabs/cluster-api-control-plane-provider-talos/controllers"
	"go.uber.org/zap"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/selection"
	clusterv1 "sigs.k8s.io/cluster-api/api/v1beta1"
	"sigs.k8s.io/cluster-api/api/v1beta1/index"
	capicontrollers "sigs.k8s.io/cluster-api/controllers"
	"sigs.k8s.io/cluster-api/controllers/clustercache"
	"sigs.k8s.io/cluster-api/controllers/remote"
	expwebhooks "sigs.k8s.io/cluster-api/exp/ipam/webhooks"
	expmpwebhooks "sigs.k8s.io/cluster-api/exp/webhooks"
	capiwebhooks "sigs.k8s.io/cluster-api/webhooks"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/webhook/conversion"

	"github.com/sovra-dev/sovra/daemon/capi/controllers"
	"github.com/sovra-dev/sovra/daemon/capi/crds"
	"github.com/sovra-dev/sovra/daemon/capi/fence"
	"github.com/sovra-dev/sovra/daemon/capi/webhooks"
	"github.com/sovra-dev/sovra/daemon/membership"
)

const (
	// Cluster API's defaults for its manager.
	syncPeriod                  = 10 * time.Minute
	concurrency                 = 10
	clusterCacheConcurrency     = 100
	clusterCacheClientQPS       = 20
	clusterCacheClientBurst     = 30
	remoteConnectionGracePeriod = 2 * time.Minute
	// remoteConditionsGracePeriod must exceed remoteConnectionGracePeriod and
	// be at least 2 minutes, so the cluster cache drops a dead connection
	// before Machines' conditions go Unknown.
	remoteConditionsGracePeriod = 5 * time.Minute
	// cacpptConcurrency and cabptConcurrency are the providers' own defaults.
	cabptConcurrency  = 10
	cacpptConcurrency = 10
)

// clusterSecrets selects the Secrets that belong to a cluster: the only ones
// the manager's cache holds.
func clusterSecrets() labels.Selector {
	req, _ := labels.NewRequirement(clusterv1.ClusterNameLabel, selection.Exists, nil)
	return labels.NewSelector().Add(*req)
}

func cacheOptions() cache.Options {
	period := syncPeriod
	return cache.Options{
		SyncPeriod: &period,
		ByObject: map[client.Object]cache.ByObject{
			&corev1.Secret{}: {Label: clusterSecrets()},
		},
	}
}

func clientOptions() client.Options {
	return client.Options{
		Cache: &client.CacheOptions{
			DisableFor:   []client.Object{&corev1.ConfigMap{}, &corev1.Secret{}},
			Unstructured: true,
		},
	}
}

// setup registers the selected controllers and every webhook with mgr.
func setup(ctx context.Context, mgr ctrl.Manager, server *webhooks.Server, cfg Config, log *zap.Logger) error {
	sel := cfg.Controllers
	if err := index.AddDefaultIndexes(ctx, mgr); err != nil {
		return fmt.Errorf("setting up Cluster API indexes: %w", err)
	}
	secretCachingClient, err := client.New(mgr.GetConfig(), client.Options{
		HTTPClient: mgr.GetHTTPClient(),
		Scheme:     mgr.GetScheme(),
		Cache:      &client.CacheOptions{Reader: mgr.GetCache()},
	})
	if err != nil {
		return fmt.Errorf("creating the secret caching client: %w", err)
	}
	opts := controller.Options{MaxConcurrentReconciles: concurrency}

	var clusterCache clustercache.ClusterCache
	if sel.Has(controllers.Cluster) || sel.Has(controllers.Machine) || sel.Has(controllers.MachineSet) ||
		sel.Has(controllers.MachineHealthCheck) || sel.Has(controllers.ClusterResourceSet) {
		clusterCache, err = clustercache.SetupWithManager(ctx, mgr, clustercache.Options{
			SecretClient: secretCachingClient,
			Cache:        clustercache.CacheOptions{Indexes: []clustercache.CacheOptionsIndex{clustercache.NodeProviderIDIndex}},
			Client: clustercache.ClientOptions{
				QPS:       clusterCacheClientQPS,
				Burst:     clusterCacheClientBurst,
				UserAgent: remote.DefaultClusterAPIUserAgent(userAgentSource),
				Cache: clustercache.ClientCacheOptions{
					DisableFor: []client.Object{
						&corev1.ConfigMap{}, &corev1.Secret{}, &corev1.Pod{}, &appsv1.DaemonSet{},
						&storagev1.VolumeAttachment{}, &corev1.PersistentVolume{},
					},
				},
			},
		}, controller.Options{MaxConcurrentReconciles: clusterCacheConcurrency})
		if err != nil {
			return fmt.Errorf("setting up the cluster cache: %w", err)
		}
	}

	type step struct {
		name  string
		setup func() error
	}
	steps := []step{
		{controllers.Cluster, func() error {
			return (&capicontrollers.ClusterReconciler{
				Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(), ClusterCache: clusterCache,
				RemoteConnectionGracePeriod: remoteConnectionGracePeriod,
			}).SetupWithManager(ctx, mgr, opts)
		}},
		{controllers.Machine, func() error {
			return (&capicontrollers.MachineReconciler{
				Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(), ClusterCache: clusterCache,
				RemoteConditionsGracePeriod: remoteConditionsGracePeriod,
			}).SetupWithManager(ctx, mgr, opts)
		}},
		{controllers.MachineSet, func() error {
			return (&capicontrollers.MachineSetReconciler{
				Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(), ClusterCache: clusterCache,
			}).SetupWithManager(ctx, mgr, opts)
		}},
		{controllers.MachineDeployment, func() error {
			return (&capicontrollers.MachineDeploymentReconciler{
				Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(),
			}).SetupWithManager(ctx, mgr, opts)
		}},
		{controllers.MachineHealthCheck, func() error {
			return (&capicontrollers.MachineHealthCheckReconciler{
				Client: mgr.GetClient(), ClusterCache: clusterCache,
			}).SetupWithManager(ctx, mgr, opts)
		}},
		{controllers.ClusterResourceSet, func() error {
			partialSecrets, err := partialSecretCache(mgr)
			if err != nil {
				return err
			}
			if err := (&capicontrollers.ClusterResourceSetReconciler{
				Client: mgr.GetClient(), ClusterCache: clusterCache,
			}).SetupWithManager(ctx, mgr, opts, partialSecrets); err != nil {
				return err
			}
			return (&capicontrollers.ClusterResourceSetBindingReconciler{Client: mgr.GetClient()}).SetupWithManager(ctx, mgr, opts)
		}},
		{controllers.TalosConfig, func() error {
			return (&cabpt.TalosConfigReconciler{
				Client: mgr.GetClient(), Log: ctrl.Log.WithName("controllers").WithName("TalosConfig"), Scheme: mgr.GetScheme(),
			}).SetupWithManager(ctx, mgr, controller.Options{MaxConcurrentReconciles: cabptConcurrency})
		}},
		{controllers.TalosControlPlane, func() error {
			trackerLog := ctrl.Log.WithName("remote").WithName("ClusterCacheTracker")
			tracker, err := remote.NewClusterCacheTracker(mgr, remote.ClusterCacheTrackerOptions{
				SecretCachingClient: secretCachingClient,
				ControllerName:      "cacppt",
				Log:                 &trackerLog,
				ClientUncachedObjects: []client.Object{
					&corev1.ConfigMap{}, &corev1.Secret{}, &corev1.Pod{}, &appsv1.Deployment{}, &appsv1.DaemonSet{},
				},
			})
			if err != nil {
				return err
			}
			if err := (&remote.ClusterCacheReconciler{Client: mgr.GetClient(), Tracker: tracker}).
				SetupWithManager(ctx, mgr, controller.Options{MaxConcurrentReconciles: cacpptConcurrency}); err != nil {
				return err
			}
			// CACPPT bootstraps only behind the fence, on the cluster's
			// bootstrap lease, which the agents contend for too.
			leases, err := membership.NewForConfig(membership.Config{}, mgr.GetConfig(), log.Named("bootstrap-lease"))
			if err != nil {
				return err
			}
			return fence.Setup(mgr, &cacppt.TalosControlPlaneReconciler{
				Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(), Tracker: tracker, Scheme: mgr.GetScheme(),
				Log: ctrl.Log.WithName("controllers").WithName("TalosControlPlane"),
			}, leases, cfg.BootstrapGrace, controller.Options{MaxConcurrentReconciles: cacpptConcurrency}, log.Named("bootstrap-fence"))
		}},
	}
	steps = append(steps, step{controllers.Infrastructure, func() error { return setupSovra(mgr, log) }})
	for _, s := range steps {
		if !sel.Has(s.name) {
			continue
		}
		if err := s.setup(); err != nil {
			return fmt.Errorf("setting up the %s controller: %w", s.name, err)
		}
	}
	if err := setupWebhooks(mgr, server, clusterCache); err != nil {
		return err
	}
	log.Debug("controllers set up", zap.Strings("controllers", sel.Sorted()))
	return nil
}

// partialSecretCache is Cluster API's metadata-only cache of every Secret, for
// the ClusterResourceSet controller.
func partialSecretCache(mgr ctrl.Manager) (cache.Cache, error) {
	period := syncPeriod
	c, err := cache.New(mgr.GetConfig(), cache.Options{
		Scheme:     mgr.GetScheme(),
		Mapper:     mgr.GetRESTMapper(),
		HTTPClient: mgr.GetHTTPClient(),
		SyncPeriod: &period,
		DefaultTransform: func(in any) (any, error) {
			obj, ok := in.(*metav1.PartialObjectMetadata)
			if !ok {
				return nil, fmt.Errorf("metadata-only Secret cache got %T", in)
			}
			return cache.TransformStripManagedFields()(obj)
		},
	})
	if err != nil {
		return nil, fmt.Errorf("creating the metadata-only Secret cache: %w", err)
	}
	return c, mgr.Add(c)
}

// setupWebhooks registers the defaulting, validation and conversion webhooks
// of Cluster API core and the Talos providers: every replica serves them.
func setupWebhooks(mgr ctrl.Manager, server *webhooks.Server, clusterCache clustercache.ClusterCache) error {
	var cacheReader capiwebhooks.ClusterCacheReader
	if clusterCache != nil {
		cacheReader = clusterCache
	}
	hooks := []struct {
		name  string
		setup func(ctrl.Manager) error
	}{
		{"ClusterClass", (&capiwebhooks.ClusterClass{Client: mgr.GetClient()}).SetupWebhookWithManager},
		{"Cluster", (&capiwebhooks.Cluster{Client: mgr.GetClient(), ClusterCacheReader: cacheReader}).SetupWebhookWithManager},
		{"Machine", (&capiwebhooks.Machine{}).SetupWebhookWithManager},
		{"MachineSet", (&capiwebhooks.MachineSet{}).SetupWebhookWithManager},
		{"MachineDeployment", (&capiwebhooks.MachineDeployment{}).SetupWebhookWithManager},
		{"MachineDrainRule", (&capiwebhooks.MachineDrainRule{}).SetupWebhookWithManager},
		{"MachinePool", (&expmpwebhooks.MachinePool{}).SetupWebhookWithManager},
		{"ClusterResourceSet", (&capiwebhooks.ClusterResourceSet{}).SetupWebhookWithManager},
		{"ClusterResourceSetBinding", (&capiwebhooks.ClusterResourceSetBinding{}).SetupWebhookWithManager},
		{"MachineHealthCheck", (&capiwebhooks.MachineHealthCheck{}).SetupWebhookWithManager},
		{"IPAddress", (&expwebhooks.IPAddress{Client: mgr.GetAPIReader()}).SetupWebhookWithManager},
		{"IPAddressClaim", (&expwebhooks.IPAddressClaim{}).SetupWebhookWithManager},
		{"TalosConfigTemplate", (&bootstrapv1alpha3.TalosConfigTemplate{}).SetupWebhookWithManager},
		{"TalosConfig", (&bootstrapv1alpha3.TalosConfig{}).SetupWebhookWithManager},
		{"TalosControlPlane", (&controlplanev1alpha3.TalosControlPlane{}).SetupWebhookWithManager},
	}
	for _, h := range hooks {
		if err := h.setup(mgr); err != nil {
			return fmt.Errorf("setting up the %s webhook: %w", h.name, err)
		}
	}
	// Every CRD that declares webhook conversion points at /convert; the
	// builder registers it only for types with spokes in the scheme.
	if !slices.Contains(server.Paths(), crds.ConvertPath) {
		server.Register(crds.ConvertPath, conversion.NewWebhookHandler(mgr.GetScheme()))
	}
	return nil
}
