// Package server composes sovrad from its parts (the data directory, the
// datastore, the API server, the node API with attestation and the KMS, and
// the in-process controllers) and runs them until the context ends, then
// shuts them down in order: the controllers first, then the API server, the
// datastore last. Each component reaches the API as its own user (package
// identity); only the bootstrap steps (the components' RBAC, the CRDs) act as
// the API server's loopback superuser.
package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/sovra-dev/sovra/daemon/apiserver"
	"github.com/sovra-dev/sovra/daemon/attestation"
	"github.com/sovra-dev/sovra/daemon/bootconfig"
	"github.com/sovra-dev/sovra/daemon/capi"
	"github.com/sovra-dev/sovra/daemon/capi/controllers"
	"github.com/sovra-dev/sovra/daemon/capi/crds"
	"github.com/sovra-dev/sovra/daemon/config"
	"github.com/sovra-dev/sovra/daemon/datadir"
	"github.com/sovra-dev/sovra/daemon/datastore"
	"github.com/sovra-dev/sovra/daemon/identity"
	"github.com/sovra-dev/sovra/daemon/kms"
	"github.com/sovra-dev/sovra/daemon/machineconfig"
	"github.com/sovra-dev/sovra/daemon/nodeapi"
	"github.com/sovra-dev/sovra/daemon/shred"
	"github.com/sovra-dev/sovra/internal/version"
)

const readyPollInterval = 100 * time.Millisecond

// Run runs sovrad with cfg, which must have passed Validate, until ctx ends.
// It returns nil after a clean shutdown.
func Run(ctx context.Context, cfg *config.Config, log *zap.Logger) error {
	start := time.Now()
	notify := takeNotifySocket()
	log.Info("starting sovrad", zap.String("version", version.Version), zap.String("dataDir", cfg.DataDir))
	// Nothing is written before the datastore answers, within
	// --datastore-timeout (which bounds kine's own start too).
	if err := datastore.WaitReachable(ctx, cfg, log); err != nil {
		return err
	}
	files, err := datadir.Prepare(cfg, log)
	if err != nil {
		return err
	}
	dsCtx, dsCancel := context.WithTimeout(ctx, cfg.DatastoreTimeout)
	ds, err := datastore.Start(dsCtx, cfg, files.Dir, log)
	dsCancel()
	if err != nil {
		return err
	}
	defer ds.Stop()

	ip, port, err := cfg.ListenHostPort()
	if err != nil {
		return err
	}
	rd := newReadiness(cfg)
	api, err := apiserver.New(ctx, apiserver.Config{
		Files:        files,
		EtcdEndpoint: ds.Endpoint,
		BindIP:       ip,
		Port:         port,
		AdminGroup:   cfg.AdminGroup,
		ReadyChecks:  rd.checks(),
	}, log)
	if err != nil {
		return err
	}

	selected, err := controllers.Parse(cfg.Controllers)
	if err != nil {
		return err
	}
	var providers []crds.Provider
	if !selected.Empty() {
		if providers, err = capi.Providers(); err != nil {
			return err
		}
	}
	rbac, err := identity.Objects(providers)
	if err != nil {
		return err
	}
	ids, err := identity.NewClients(api.Loopback, files.CA)
	if err != nil {
		return err
	}

	auth, err := newAuthenticator(files, ids.NodeAPI, log)
	if err != nil {
		return err
	}
	limiter, err := newConnLimiter(cfg, log)
	if err != nil {
		return err
	}
	var keys *kms.Service
	var keysTLS *tls.Config
	if cfg.KMS.MasterKeyFile != "" {
		if keys, keysTLS, err = kms.NewFromConfig(cfg, files, ids.KMS, kms.ReplicaName(files.ServerURL), log); err != nil {
			return err
		}
		rd.kms.keys.Store(keys)
	}
	var keysLis net.Listener
	if keys != nil && cfg.KMS.Listen != "" {
		if keysLis, err = net.Listen("tcp", cfg.KMS.Listen); err != nil {
			return fmt.Errorf("listening for the KMS on %s: %w", cfg.KMS.Listen, err)
		}
	}

	var nodes *nodeapi.Server
	var boot *bootconfig.Server
	var bootLis net.Listener
	var machines machineconfig.Daemon
	if cfg.NodeAPI.Listen != "" {
		if nodes, err = newNodeAPI(cfg, files, ids.NodeAPI, auth, log); err != nil {
			return err
		}
		if machines, err = machineDaemon(cfg, files); err != nil {
			return err
		}
		pool, err := newHostService(cfg, machines, ids.Hosts, log)
		if err != nil {
			return err
		}
		nodes.Register(pool.Register)
		if cfg.Hosts.BootListen != "" {
			if boot, err = newBootServer(cfg, machines, files, keys, log); err != nil {
				return err
			}
			if bootLis, err = net.Listen("tcp", cfg.Hosts.BootListen); err != nil {
				return fmt.Errorf("listening for the boot server on %s: %w", cfg.Hosts.BootListen, err)
			}
			if host, _, _ := net.SplitHostPort(machines.Endpoint); net.ParseIP(host).IsLoopback() {
				log.Warn("the enrollment configuration points machines at a loopback address: set --node-endpoint or --advertise-address", zap.String("endpoint", machines.Endpoint))
			}
			log.Info("boot server: machines boot with talos.config="+bootconfig.URL(cfg.Hosts.BootListen), zap.String("node_endpoint", machines.Endpoint))
		}
	}

	g, gctx := errgroup.WithContext(ctx)
	// ready is closed once the API server answers /readyz and the bootstrap
	// steps are done; the components that need the API wait for it.
	ready := make(chan struct{})
	if nodes != nil {
		g.Go(func() error {
			if !readyOrDone(gctx, ready) {
				return nil // shutting down before ready
			}
			return runNodeAPI(gctx, nodes, ids.NodeAPI, cfg.NodeAPI.Listen, limiter, rd.nodeAPI)
		})
	}
	if boot != nil {
		g.Go(func() error {
			if !readyOrDone(gctx, ready) {
				return nil // shutting down before ready
			}
			return boot.Serve(gctx, limiter.Wrap(bootLis, "boot server"))
		})
	}
	switch {
	case keys != nil && cfg.KMS.Listen == "":
		// The KMS and the volume key service share the node API's listener:
		// one port, one TLS identity for everything a node calls.
		nodes.Register(keys.Register)
		nodes.Register(keys.RegisterVolumeKeys)
		g.Go(func() error { return keys.Run(gctx) })
	case keys != nil:
		g.Go(func() error { return keys.Serve(gctx, limiter.Wrap(keysLis, "KMS"), keysTLS, auth) })
	}
	g.Go(func() error {
		if !readyOrDone(gctx, ready) {
			return nil // shutting down before ready
		}
		return shred.Run(gctx, shred.Config{Kubeconfig: ids.Shred, Datastore: ds}, log.Named("shred"))
	})
	// The API server outlives the Cluster API manager, so that at shutdown the
	// leader can still release its Lease and another replica takes over at once.
	capiDone := make(chan struct{})
	apiCtx, stopAPI := context.WithCancel(context.WithoutCancel(gctx))
	defer stopAPI()
	go func() {
		<-gctx.Done()
		<-capiDone
		stopAPI()
	}()
	g.Go(func() error {
		if err := api.Run(apiCtx); err != nil {
			return fmt.Errorf("serving the Kubernetes API: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		if err := waitReady(gctx, api.Loopback, apiReadyz()); err != nil {
			return nil // shutting down before ready
		}
		if err := bootstrap(gctx, api.Loopback, rbac, nodes != nil || keys != nil, log); err != nil {
			if gctx.Err() != nil {
				return nil // shutting down before ready
			}
			return err
		}
		close(ready)
		log.Info("Kubernetes API ready: starting the node API and the controllers")
		if err := rd.waitCRDs(gctx, api.Loopback); err != nil {
			return nil // shutting down before ready
		}
		// Ready as a load balancer sees it: without credentials, every check.
		if err := waitReady(gctx, rest.AnonymousClientConfig(api.Loopback), "/readyz"); err != nil {
			return nil // shutting down before ready
		}
		notifyReady(notify, log)
		log.Info("sovrad ready",
			zap.String("server", files.ServerURL),
			zap.String("kubeconfig", files.AdminKubeconfig),
			zap.Duration("startup", time.Since(start)))
		return nil
	})
	g.Go(func() error {
		defer close(capiDone)
		if !readyOrDone(gctx, ready) {
			return nil // shutting down before ready
		}
		return capi.Run(gctx, capi.Config{
			Loopback:        api.Loopback,
			Client:          ids.CAPI,
			KubeControllers: ids.Controllers,
			Infrastructure:  ids.Infrastructure,
			Hosts:           ids.Hosts,
			HostsDaemon:     machines,
			CA:              files.CA,
			DataDir:         files.Dir,
			WebhookIP:       files.AdvertiseIP,
			Identity:        files.ServerURL,
			Controllers:     selected,
			Started:         start,
			BootstrapGrace:  cfg.BootstrapGrace,
		}, log)
	})
	err = g.Wait()
	log.Info("sovrad stopped")
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

// bootstrap is what sovrad does as the API server's superuser before its
// components start: it ensures their RBAC and, when the node API or the KMS
// runs, installs the sovra.dev CRDs.
func bootstrap(ctx context.Context, loopback *rest.Config, rbac []client.Object, sovraCRDs bool, log *zap.Logger) error {
	if err := identity.Ensure(ctx, loopback, rbac, log); err != nil {
		return err
	}
	if !sovraCRDs {
		return nil
	}
	c, err := attestationClient(loopback)
	if err != nil {
		return err
	}
	return attestation.InstallCRDs(ctx, c)
}

// readyOrDone waits for ready and reports whether it came before ctx ended.
func readyOrDone(ctx context.Context, ready <-chan struct{}) bool {
	select {
	case <-ready:
		return true
	case <-ctx.Done():
		return false
	}
}

// waitReady polls the server's readyz path with cfg until it answers ok.
func waitReady(ctx context.Context, cfg *rest.Config, path string) error {
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	return wait.PollUntilContextCancel(ctx, readyPollInterval, true, func(ctx context.Context) (bool, error) {
		body, err := client.Discovery().RESTClient().Get().RequestURI(path).DoRaw(ctx)
		return err == nil && string(body) == "ok", nil
	})
}
