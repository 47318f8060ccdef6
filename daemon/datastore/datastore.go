// Package datastore runs kine, the etcd API over SQL, inside sovrad: over a
// SQLite file in the data directory by default, or over PostgreSQL when
// several replicas share one database. kine listens on a unix socket in the
// data directory (mode 0600, in a 0700 directory), never on the network.
package datastore

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/k3s-io/kine/pkg/endpoint"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"
	"k8s.io/component-base/metrics/legacyregistry"

	// The two backends sovrad supports register themselves with kine.
	_ "github.com/k3s-io/kine/pkg/drivers/pgsql"
	_ "github.com/k3s-io/kine/pkg/drivers/sqlite"

	"github.com/sovra-dev/sovra/daemon/config"
)

const (
	sqliteFile = "state.db"
	// sqliteOptions are kine's own defaults for SQLite: WAL journal, a shared
	// cache and a generous busy timeout for the API server's bursts.
	sqliteOptions = "?_journal=WAL&cache=shared&_busy_timeout=30000&_txlock=immediate"

	// notifyInterval is how often kine sends watch progress notifications,
	// which the API server's watch cache needs to stay current.
	notifyInterval = 5 * time.Second
	// emulatedEtcdVersion is the etcd version kine reports to the API server.
	emulatedEtcdVersion = "3.5.16"

	// stopGrace bounds how long Stop waits for in-flight etcd calls.
	stopGrace = 2 * time.Second

	keepaliveMinTime  = 5 * time.Second
	keepaliveInterval = 2 * time.Hour
	keepaliveTimeout  = 20 * time.Second
)

// Datastore is a running kine.
type Datastore struct {
	// Endpoint is the etcd URL the API server connects to (unix://...).
	Endpoint string
	server   *grpc.Server
}

// SQLitePath is the SQLite database file sovrad uses in dataDir.
func SQLitePath(dataDir string) string {
	return filepath.Join(dataDir, "db", sqliteFile)
}

// Start starts kine for cfg. On PostgreSQL kine waits for the database to be
// reachable, retrying; ctx bounds that wait.
func Start(ctx context.Context, cfg *config.Config, dataDir string, log *zap.Logger) (*Datastore, error) {
	kind, err := cfg.DatastoreKind()
	if err != nil {
		return nil, err
	}
	dsn := cfg.Datastore
	if kind == config.DatastoreSQLite {
		path := SQLitePath(dataDir)
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			return nil, fmt.Errorf("creating datastore directory: %w", err)
		}
		dsn = "sqlite://" + path + sqliteOptions
	}
	srv := grpc.NewServer(
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: keepaliveMinTime}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: keepaliveInterval, Timeout: keepaliveTimeout}),
	)
	log.Info("starting datastore", zap.String("kind", kind))
	etcd, err := endpoint.Listen(ctx, endpoint.Config{
		GRPCServer:          srv,
		Listener:            "unix://" + cfg.KineSocket(),
		Endpoint:            dsn,
		MetricsRegisterer:   legacyregistry.Registerer(),
		NotifyInterval:      notifyInterval,
		EmulatedETCDVersion: emulatedEtcdVersion,
	})
	if err != nil {
		return nil, fmt.Errorf("starting %s datastore: %s", kind, redact(err.Error(), cfg.Datastore))
	}
	return &Datastore{Endpoint: etcd.Endpoints[0], server: srv}, nil
}

// redact removes from msg the datastore URL and its password, which kine's
// errors may quote.
func redact(msg, dsn string) string {
	if dsn == "" {
		return msg
	}
	u, err := url.Parse(dsn)
	if err != nil {
		return strings.ReplaceAll(msg, dsn, "<datastore>")
	}
	msg = strings.ReplaceAll(msg, dsn, u.Redacted())
	if pw, ok := u.User.Password(); ok && pw != "" {
		msg = strings.ReplaceAll(msg, pw, "xxxxx")
	}
	return msg
}

// Stop stops serving the etcd API. In-flight calls get stopGrace to finish;
// watch streams the API server left open are then cut.
func (d *Datastore) Stop() {
	stopped := make(chan struct{})
	go func() {
		d.server.GracefulStop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(stopGrace):
		d.server.Stop()
	}
}
