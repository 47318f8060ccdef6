// Package capi runs Cluster API inside sovrad: it installs the CRDs of CAPI
// core, the Talos bootstrap (CABPT) and control-plane (CACPPT) providers and
// sovra's own infrastructure provider (package infra),
// serves and registers their webhooks, and runs their controllers, with the
// upstream kube-controller-manager controllers (package kubecontrollers), in
// one controller-runtime manager elected over a Lease in the daemon's own
// API, so that N replicas on one database run exactly one active manager.
package capi

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/go-logr/zapr"
	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
	"sigs.k8s.io/cluster-api/controllers/remote"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	ctrlconfig "sigs.k8s.io/controller-runtime/pkg/config"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/sovra-dev/sovra/daemon/capi/controllers"
	"github.com/sovra-dev/sovra/daemon/capi/crds"
	"github.com/sovra-dev/sovra/daemon/capi/kubecontrollers"
	"github.com/sovra-dev/sovra/daemon/capi/webhooks"
	"github.com/sovra-dev/sovra/daemon/logging"
	"github.com/sovra-dev/sovra/daemon/machineconfig"
	"github.com/sovra-dev/sovra/daemon/pki"
)

const (
	// Namespace holds the leader Lease.
	Namespace = "sovra-system"
	// LeaseName is the Lease the replicas elect the active manager over.
	LeaseName = "sovrad-controllers"

	// LeaseDuration, RenewDeadline and RetryPeriod are controller-runtime's
	// (and Cluster API's) defaults. A crashed leader is replaced once its
	// Lease expires: LeaseDuration after the last renewal a follower saw, plus
	// up to two jittered RetryPeriods (17-21 s measured). A leader that stops
	// gracefully releases the Lease and is replaced within one RetryPeriod.
	LeaseDuration = 15 * time.Second
	RenewDeadline = 10 * time.Second
	RetryPeriod   = 2 * time.Second

	// userAgentSource names the manager in the API's audit log and in the
	// user agent of its clients to workload clusters.
	userAgentSource = "sovrad"

	// qps and burst are Cluster API's defaults for its manager's client.
	qps   = 20
	burst = 30

	setupRetryInterval = time.Second
	// gracefulShutdown bounds how long the manager waits for reconciles at shutdown.
	gracefulShutdown = 10 * time.Second
)

// Config is what Run needs from the daemon.
type Config struct {
	// Loopback is the API server's superuser, for the bootstrap steps only:
	// installing the CRDs and creating the webhook configurations.
	Loopback *rest.Config
	// Client is Cluster API's own identity (package identity): the manager,
	// its controllers and the webhooks' registration act as it.
	Client *rest.Config
	// KubeControllers is the identity of the upstream controllers.
	KubeControllers *rest.Config
	// Infrastructure is the identity of sovra's infrastructure provider
	// (SovraCluster, SovraMachine), Hosts that of the host pool's
	// reconciler: they run in the manager but read and write as themselves.
	Infrastructure, Hosts *rest.Config
	// HostsDaemon is how machines reach sovrad (package machineconfig):
	// the host reconciler builds the configurations it applies to workers
	// with it. Zero when this replica has no node API.
	HostsDaemon machineconfig.Daemon
	// CA is the daemon's CA: it issues the webhook serving certificate and
	// verifies it for the API server, and the root CA publisher publishes it.
	CA *pki.CA
	// DataDir holds the webhook serving certificate.
	DataDir string
	// WebhookIP is the address the webhooks listen on; the API servers of
	// every replica must reach it.
	WebhookIP net.IP
	// Identity names this replica in the leader Lease, after the host name
	// and before the process ID; the daemon passes its API URL.
	Identity string
	// Controllers are the controllers to run; empty runs none (and no manager).
	Controllers controllers.Set
	// Started is when the daemon started, for the log line that reports how
	// long the CRDs took.
	Started time.Time
	// BootstrapGrace is the bootstrap fence's grace period (package fence).
	BootstrapGrace time.Duration
}

// Run installs the CRDs, then runs the manager until ctx ends. With no
// controllers selected it returns at once: the replica serves the API only.
func Run(ctx context.Context, cfg Config, log *zap.Logger) error {
	log = log.Named("capi")
	if cfg.Controllers.Empty() {
		log.Info("no controllers selected: serving the API only")
		return nil
	}
	providers, err := Providers()
	if err != nil {
		return err
	}
	// Cluster API's and controller-runtime's own lines: warnings and errors
	// only, unless --log-level debug.
	ctrl.SetLogger(zapr.NewLogger(logging.Library(log)))

	restCfg := clientConfig(cfg.Client)
	scheme := NewScheme()
	setupClient, err := client.New(clientConfig(cfg.Loopback), client.Options{Scheme: scheme})
	if err != nil {
		return fmt.Errorf("creating the Cluster API setup client: %w", err)
	}

	hooks, err := webhooks.Listen(cfg.CA, cfg.DataDir, cfg.WebhookIP, log.Named("webhooks"))
	if err != nil {
		return err
	}
	if err := install(ctx, setupClient, providers, crds.Conversion{URL: hooks.URL(), CABundle: cfg.CA.PEM}, cfg.Started, log); err != nil {
		hooks.Close()
		if errors.Is(err, context.Canceled) || ctx.Err() != nil {
			return nil
		}
		return err
	}

	// The managers need no more of the CRDs than their names and conversion.
	providers = crds.WithoutSchemas(providers)
	for {
		err := runManager(ctx, cfg, restCfg, scheme, providers, hooks, log)
		if ctx.Err() != nil {
			return nil
		}
		if !isLeadershipLost(err) {
			return err
		}
		// The replica stays up (and keeps serving the API): it stands for the
		// Lease again with a fresh manager, as a replica that never led does.
		// controller-runtime does not wait for the lost manager's reconciles
		// to end, so they get the graceful shutdown time first: a new manager
		// of this process never reconciles beside them.
		log.Warn("lost the controllers' Lease: standing by to be elected again", zap.Error(err), zap.Duration("after", gracefulShutdown))
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(gracefulShutdown):
		}
		if hooks, err = webhooks.Listen(cfg.CA, cfg.DataDir, cfg.WebhookIP, log.Named("webhooks")); err != nil {
			return err
		}
	}
}

// clientConfig is cfg as Cluster API's clients speak.
func clientConfig(cfg *rest.Config) *rest.Config {
	cfg = rest.CopyConfig(cfg)
	// The Talos providers' types have no protobuf marshalling.
	cfg.ContentType = runtime.ContentTypeJSON
	cfg.AcceptContentTypes = runtime.ContentTypeJSON
	cfg.QPS, cfg.Burst = qps, burst
	cfg.UserAgent = remote.DefaultClusterAPIUserAgent(userAgentSource)
	return cfg
}

// errLeadershipLost is the error controller-runtime's manager stops with when
// it can no longer renew its Lease (it has no sentinel for it).
const errLeadershipLost = "leader election lost"

func isLeadershipLost(err error) bool {
	return err != nil && strings.Contains(err.Error(), errLeadershipLost)
}

// runManager runs one manager with the selected controllers, the webhooks on
// hooks and their registration, until ctx ends or the manager stops.
func runManager(ctx context.Context, cfg Config, restCfg *rest.Config, scheme *runtime.Scheme, providers []crds.Provider, hooks *webhooks.Server, log *zap.Logger) error {
	lock, err := leaseLock(restCfg, cfg.Identity)
	if err != nil {
		hooks.Close()
		return err
	}
	mgr, err := ctrl.NewManager(restCfg, managerOptions(scheme, hooks, lock))
	if err != nil {
		hooks.Close()
		return fmt.Errorf("creating the Cluster API manager: %w", err)
	}
	if err := setup(ctx, mgr, hooks, cfg, log); err != nil {
		hooks.Close()
		return err
	}
	if err := mgr.Add(&webhooks.Registrar{Client: mgr.GetClient(), Server: hooks, Providers: providers, CABundle: cfg.CA.PEM, Log: log.Named("webhooks")}); err != nil {
		hooks.Close()
		return err
	}
	if kubecontrollers.Any(cfg.Controllers) {
		if err := mgr.Add(&kubecontrollers.Manager{
			Config: cfg.KubeControllers, RootCA: cfg.CA.PEM, Selected: cfg.Controllers, Log: log.Named("kube-controllers"),
		}); err != nil {
			hooks.Close()
			return err
		}
	}
	stopped := make(chan struct{})
	defer close(stopped)
	go func() {
		select {
		case <-mgr.Elected():
			log.Info("elected: running controllers", zap.String("identity", lock.Identity()), zap.Strings("controllers", cfg.Controllers.Sorted()))
		case <-stopped:
		}
	}()
	log.Info("starting the Cluster API manager", zap.String("identity", lock.Identity()), zap.String("lease", Namespace+"/"+LeaseName))
	if err := mgr.Start(ctx); err != nil {
		return fmt.Errorf("running the Cluster API manager: %w", err)
	}
	return nil
}

// install creates the namespace of the Lease, installs the CRDs and creates
// the webhook configurations the registrar fills, retrying while the API
// server finishes starting, then waits until the CRDs are served.
func install(ctx context.Context, c client.Client, providers []crds.Provider, conv crds.Conversion, started time.Time, log *zap.Logger) error {
	begin := time.Now()
	err := wait.PollUntilContextCancel(ctx, setupRetryInterval, true, func(ctx context.Context) (bool, error) {
		err := ensureNamespace(ctx, c)
		if err == nil {
			err = crds.Install(ctx, c, providers, conv, log)
		}
		if err == nil {
			err = installHostKinds(ctx, c)
		}
		if err == nil {
			err = webhooks.Create(ctx, c, providers)
		}
		if err != nil {
			log.Warn("installing the Cluster API CRDs, will retry", zap.Error(err))
			return false, nil
		}
		return true, nil
	})
	if err != nil {
		return err
	}
	names := crds.CRDNames(providers)
	if err := crds.WaitEstablished(ctx, c, names); err != nil {
		return err
	}
	fields := []zap.Field{zap.Int("crds", len(names)), zap.Duration("took", time.Since(begin))}
	if !started.IsZero() {
		fields = append(fields, zap.Duration("sinceStart", time.Since(started)))
	}
	for _, p := range providers {
		fields = append(fields, zap.String(p.Name, p.Module))
	}
	log.Info("Cluster API CRDs established", fields...)
	return nil
}

func ensureNamespace(ctx context.Context, c client.Client) error {
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: Namespace}}
	if err := c.Create(ctx, ns); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating namespace %s: %w", Namespace, err)
	}
	return nil
}

// leaseLock is the Lease the replicas elect over, with identity as holder.
func leaseLock(cfg *rest.Config, identity string) (resourcelock.Interface, error) {
	host, err := os.Hostname()
	if err != nil {
		return nil, fmt.Errorf("naming this replica for leader election: %w", err)
	}
	if identity != "" {
		host += "_" + identity
	}
	identity = fmt.Sprintf("%s_%d", host, os.Getpid())
	lcfg := rest.CopyConfig(cfg)
	lcfg.UserAgent = userAgentSource + "/leader-election"
	// Leader election must not starve behind the controllers' requests.
	lcfg.QPS, lcfg.Burst = 0, 0
	kube, err := kubernetes.NewForConfig(lcfg)
	if err != nil {
		return nil, fmt.Errorf("creating the leader election client: %w", err)
	}
	return resourcelock.New(resourcelock.LeasesResourceLock, Namespace, LeaseName,
		kube.CoreV1(), kube.CoordinationV1(), resourcelock.ResourceLockConfig{Identity: identity})
}

func managerOptions(scheme *runtime.Scheme, hooks *webhooks.Server, lock resourcelock.Interface) ctrl.Options {
	leaseDuration, renewDeadline, retryPeriod, shutdown := LeaseDuration, RenewDeadline, RetryPeriod, gracefulShutdown
	skipNameValidation := true
	return ctrl.Options{
		Scheme:                              scheme,
		LeaderElection:                      true,
		LeaderElectionID:                    LeaseName,
		LeaderElectionNamespace:             Namespace,
		LeaderElectionResourceLockInterface: lock,
		LeaderElectionReleaseOnCancel:       true,
		LeaseDuration:                       &leaseDuration,
		RenewDeadline:                       &renewDeadline,
		RetryPeriod:                         &retryPeriod,
		GracefulShutdownTimeout:             &shutdown,
		// A replica that loses the Lease builds a new manager with the same
		// controllers (see Run): their names are unique per manager only.
		Controller: ctrlconfig.Controller{SkipNameValidation: &skipNameValidation},
		// The daemon serves its own metrics and health; the manager binds nothing but the webhooks.
		Metrics:                metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: "0",
		WebhookServer:          hooks,
		Cache:                  cacheOptions(),
		Client:                 clientOptions(),
	}
}
