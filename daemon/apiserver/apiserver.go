// Package apiserver runs the upstream Kubernetes generic control plane
// (k8s.io/kubernetes/pkg/controlplane/apiserver) in sovrad's process: the real
// API server, with namespaces, secrets, configmaps, events, leases, RBAC,
// CRDs, service accounts, audit, OIDC and encryption at rest, stored in kine.
//
// It is configured the way kube-apiserver is, with its own flags, so every
// option behaves exactly as its upstream documentation says.
package apiserver

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"time"

	"github.com/spf13/pflag"
	"go.uber.org/zap"
	rbacv1 "k8s.io/api/rbac/v1"
	apiextensionsapiserver "k8s.io/apiextensions-apiserver/pkg/apiserver"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	utilerrors "k8s.io/apimachinery/pkg/util/errors"
	"k8s.io/apimachinery/pkg/util/wait"
	genericapiserver "k8s.io/apiserver/pkg/server"
	"k8s.io/apiserver/pkg/server/healthz"
	"k8s.io/apiserver/pkg/util/webhook"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	cliflag "k8s.io/component-base/cli/flag"
	aggregatorscheme "k8s.io/kube-aggregator/pkg/apiserver/scheme"
	"k8s.io/kubernetes/pkg/api/legacyscheme"
	"k8s.io/kubernetes/pkg/controlplane"
	controlplaneapiserver "k8s.io/kubernetes/pkg/controlplane/apiserver"
	"k8s.io/kubernetes/pkg/controlplane/apiserver/options"
	genericsample "k8s.io/kubernetes/pkg/controlplane/apiserver/samples/generic/server"
	generatedopenapi "k8s.io/kubernetes/pkg/generated/openapi"

	"github.com/sovra-dev/sovra/daemon/datadir"
)

const (
	// serviceAccountIssuer is the stable issuer of service-account tokens. It
	// does not depend on the address, so tokens survive a change of address.
	serviceAccountIssuer = "https://kubernetes.default.svc"

	// apiServerCount is the number of API servers the apiextensions server
	// waits for before it serves a new CRD. sovrad replicas do not register as
	// endpoints, so any value above 1 only delays every CRD by seconds.
	apiServerCount = 1

	// AdminGroupBinding is the ClusterRoleBinding that grants --admin-group cluster-admin.
	AdminGroupBinding = "sovra:admin-group"

	auditLogMaxAgeDays = 30
	auditLogMaxBackups = 10
	auditLogMaxSizeMB  = 100

	hookRetryInterval = time.Second
	// watchDrainGrace is how long open watches get to end at shutdown.
	watchDrainGrace = 2 * time.Second
)

// Config is what the API server is built from.
type Config struct {
	Files *datadir.Files
	// EtcdEndpoint is kine's etcd URL.
	EtcdEndpoint string
	BindIP       net.IP
	Port         int
	// AdminGroup, when set, is bound to cluster-admin; when empty, the binding is removed.
	AdminGroup string
	// ReadyChecks are added to the server's own in /readyz (each listed by
	// name in /readyz?verbose and served at /readyz/<name>).
	ReadyChecks []healthz.HealthChecker
}

// Server is a built, not yet running, API server.
type Server struct {
	prepared interface{ Run(context.Context) error }
	// Loopback is a privileged client configuration for the server itself,
	// for the daemon's own components.
	Loopback *rest.Config
}

// Args are the kube-apiserver flags that configure the server.
func Args(c Config) []string {
	f := c.Files
	return []string{
		"--etcd-servers=" + c.EtcdEndpoint,
		"--bind-address=" + c.BindIP.String(),
		"--secure-port=" + strconv.Itoa(c.Port),
		"--advertise-address=" + f.AdvertiseIP.String(),
		"--tls-cert-file=" + f.ServingCert,
		"--tls-private-key-file=" + f.ServingKey,
		"--client-ca-file=" + f.CACert,
		"--authentication-config=" + f.AuthnConfig,
		"--authorization-mode=RBAC",
		"--service-account-issuer=" + serviceAccountIssuer,
		"--service-account-key-file=" + f.SAPub,
		"--service-account-signing-key-file=" + f.SAKey,
		"--encryption-provider-config=" + f.EncryptionConfig,
		"--audit-policy-file=" + f.AuditPolicy,
		"--audit-log-path=" + f.AuditLog,
		"--audit-log-maxage=" + strconv.Itoa(auditLogMaxAgeDays),
		"--audit-log-maxbackup=" + strconv.Itoa(auditLogMaxBackups),
		"--audit-log-maxsize=" + strconv.Itoa(auditLogMaxSizeMB),
		"--profiling=false",
		// Open watches are ended at shutdown instead of holding it for the request timeout.
		"--shutdown-watch-termination-grace-period=" + watchDrainGrace.String(),
	}
}

// New builds the API server from c.
func New(ctx context.Context, c Config, log *zap.Logger) (*Server, error) {
	opts := genericsample.NewOptions()
	var named cliflag.NamedFlagSets
	opts.AddFlags(&named)
	fs := pflag.NewFlagSet("kube-apiserver", pflag.ContinueOnError)
	for _, f := range named.FlagSets {
		fs.AddFlagSet(f)
	}
	if err := fs.Parse(Args(c)); err != nil {
		return nil, fmt.Errorf("configuring the API server: %w", err)
	}
	completed, err := opts.Complete(ctx, nil, nil)
	if err != nil {
		return nil, fmt.Errorf("configuring the API server: %w", err)
	}
	if errs := completed.Validate(); len(errs) > 0 {
		return nil, fmt.Errorf("configuring the API server: %w", utilerrors.NewAggregate(errs))
	}

	cfg, err := newConfig(completed)
	if err != nil {
		return nil, fmt.Errorf("configuring the API server: %w", err)
	}
	done, err := cfg.Complete()
	if err != nil {
		return nil, fmt.Errorf("configuring the API server: %w", err)
	}
	chain, err := genericsample.CreateServerChain(done)
	if err != nil {
		return nil, fmt.Errorf("creating the API server: %w", err)
	}
	chain.GenericAPIServer.AddPostStartHookOrDie("sovra-admin-group", func(hook genericapiserver.PostStartHookContext) error {
		go ensureAdminGroup(hook, hook.LoopbackClientConfig, c.AdminGroup, log)
		return nil
	})
	if err := chain.GenericAPIServer.AddReadyzChecks(c.ReadyChecks...); err != nil {
		return nil, fmt.Errorf("adding readiness checks: %w", err)
	}
	prepared, err := chain.PrepareRun()
	if err != nil {
		return nil, fmt.Errorf("preparing the API server: %w", err)
	}
	// The configuration holds the OpenAPI definitions of every Kubernetes
	// type (kubelet, apps, batch, ...), about 5 MB of heap, from which
	// PrepareRun built the OpenAPI v3 documents of the groups served here. The
	// documents keep what they use; nothing reads the rest, and a builder
	// that finds no definitions generates them again (builder3), so the
	// configuration lets them go (see also releaseOpenAPIBuilders).
	done.ControlPlane.Generic.OpenAPIV3Config.Definitions = nil
	return &Server{prepared: prepared, Loopback: rest.CopyConfig(done.ControlPlane.Generic.LoopbackClientConfig)}, nil
}

// Run serves until ctx is done, then shuts down gracefully.
func (s *Server) Run(ctx context.Context) error {
	return s.prepared.Run(ctx)
}

// newConfig wires the generic control plane, the apiextensions server and the
// aggregator as the upstream generic sample does, with one API server.
func newConfig(opts options.CompletedOptions) (*genericsample.Config, error) {
	genericConfig, informers, storageFactory, err := controlplaneapiserver.BuildGenericConfig(
		opts,
		[]*runtime.Scheme{legacyscheme.Scheme, apiextensionsapiserver.Scheme, aggregatorscheme.Scheme},
		controlplane.DefaultAPIResourceConfigSource(),
		generatedopenapi.GetOpenAPIDefinitions,
	)
	if err != nil {
		return nil, err
	}
	releaseOpenAPIBuilders(genericConfig)
	resolver := webhook.NewDefaultServiceResolver()
	kubeAPIs, pluginInitializer, err := controlplaneapiserver.CreateConfig(opts, genericConfig, informers, storageFactory, resolver, nil)
	if err != nil {
		return nil, err
	}
	authInfoResolver := webhook.NewDefaultAuthenticationInfoResolverWrapper(kubeAPIs.ProxyTransport, kubeAPIs.Generic.EgressSelector, kubeAPIs.Generic.LoopbackClientConfig, kubeAPIs.Generic.TracerProvider)
	apiExtensions, err := controlplaneapiserver.CreateAPIExtensionsConfig(*kubeAPIs.Generic, kubeAPIs.VersionedInformers, pluginInitializer, opts, apiServerCount, resolver, authInfoResolver)
	if err != nil {
		return nil, err
	}
	aggregator, err := controlplaneapiserver.CreateAggregatorConfig(*kubeAPIs.Generic, opts, kubeAPIs.VersionedInformers, resolver, kubeAPIs.ProxyTransport, kubeAPIs.Extra.PeerProxy, pluginInitializer)
	if err != nil {
		return nil, err
	}
	aggregator.ExtraConfig.DisableRemoteAvailableConditionController = true
	return &genericsample.Config{
		Options:       opts,
		Aggregator:    aggregator,
		ControlPlane:  kubeAPIs,
		APIExtensions: apiExtensions,
	}, nil
}

// ensureAdminGroup makes the ClusterRoleBinding of --admin-group match the
// flag, retrying until it succeeds or the server stops: RBAC's own bootstrap
// roles may not be in place yet when the hook runs.
func ensureAdminGroup(ctx context.Context, loopback *rest.Config, group string, log *zap.Logger) {
	client, err := kubernetes.NewForConfig(loopback)
	if err != nil {
		log.Error("cannot bind the admin group", zap.Error(err))
		return
	}
	bindings := client.RbacV1().ClusterRoleBindings()
	_ = wait.PollUntilContextCancel(ctx, hookRetryInterval, true, func(ctx context.Context) (bool, error) {
		if group == "" {
			err := bindings.Delete(ctx, AdminGroupBinding, metav1.DeleteOptions{})
			return err == nil || apierrors.IsNotFound(err), nil
		}
		want := &rbacv1.ClusterRoleBinding{
			ObjectMeta: metav1.ObjectMeta{Name: AdminGroupBinding, Labels: map[string]string{"app.kubernetes.io/managed-by": "sovrad"}},
			RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "cluster-admin"},
			Subjects:   []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.GroupKind, Name: group}},
		}
		have, err := bindings.Get(ctx, AdminGroupBinding, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			_, err = bindings.Create(ctx, want, metav1.CreateOptions{})
		case err == nil && have.RoleRef != want.RoleRef:
			// A role reference is immutable: replace the binding.
			if err = bindings.Delete(ctx, AdminGroupBinding, metav1.DeleteOptions{}); err == nil {
				_, err = bindings.Create(ctx, want, metav1.CreateOptions{})
			}
		case err == nil:
			have.Subjects = want.Subjects
			_, err = bindings.Update(ctx, have, metav1.UpdateOptions{})
		}
		if err != nil {
			log.Debug("binding the admin group, will retry", zap.Error(err))
			return false, nil
		}
		log.Info("admin group bound to cluster-admin", zap.String("group", group))
		return true, nil
	})
}
