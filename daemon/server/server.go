// Package server composes sovrad from its parts (the data directory, the
// datastore and the API server) and runs them until the context ends, then
// shuts them down in order: the API server first, the datastore last.
package server

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"

	"github.com/sovra-dev/sovra/daemon/apiserver"
	"github.com/sovra-dev/sovra/daemon/config"
	"github.com/sovra-dev/sovra/daemon/datadir"
	"github.com/sovra-dev/sovra/daemon/datastore"
	"github.com/sovra-dev/sovra/internal/version"
)

const readyPollInterval = 100 * time.Millisecond

// Run runs sovrad with cfg, which must have passed Validate, until ctx ends.
// It returns nil after a clean shutdown.
func Run(ctx context.Context, cfg *config.Config, log *zap.Logger) error {
	start := time.Now()
	log.Info("starting sovrad", zap.String("version", version.Version), zap.String("dataDir", cfg.DataDir))
	files, err := datadir.Prepare(cfg, log)
	if err != nil {
		return err
	}
	ds, err := datastore.Start(ctx, cfg, files.Dir, log)
	if err != nil {
		return err
	}
	defer ds.Stop()

	ip, port, err := cfg.ListenHostPort()
	if err != nil {
		return err
	}
	api, err := apiserver.New(ctx, apiserver.Config{
		Files:        files,
		EtcdEndpoint: ds.Endpoint,
		BindIP:       ip,
		Port:         port,
		AdminGroup:   cfg.AdminGroup,
	}, log)
	if err != nil {
		return err
	}

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		if err := api.Run(gctx); err != nil {
			return fmt.Errorf("serving the Kubernetes API: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		if err := waitReady(gctx, api); err != nil {
			return nil // shutting down before ready
		}
		log.Info("sovrad ready",
			zap.String("server", files.ServerURL),
			zap.String("kubeconfig", files.AdminKubeconfig),
			zap.Duration("startup", time.Since(start)))
		return nil
	})
	err = g.Wait()
	log.Info("sovrad stopped")
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

// waitReady polls the server's /readyz until it answers ok.
func waitReady(ctx context.Context, api *apiserver.Server) error {
	client, err := kubernetes.NewForConfig(api.Loopback)
	if err != nil {
		return err
	}
	return wait.PollUntilContextCancel(ctx, readyPollInterval, true, func(ctx context.Context) (bool, error) {
		body, err := client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		return err == nil && string(body) == "ok", nil
	})
}
