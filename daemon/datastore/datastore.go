// Package datastore runs kine, the etcd API over SQL, inside sovrad: over a
// SQLite file in the data directory by default, or over PostgreSQL when
// several replicas share one database. kine listens on a unix socket in the
// data directory (mode 0600, in a 0700 directory), never on the network.
//
// kine keeps every revision of every key until it is compacted. Its own
// periodic compactor is off: the API server compacts (every five minutes,
// as it does etcd), and so does package shred, at once after a node record
// is deleted and periodically, through Compact. On SQLite every connection
// runs with secure_delete on, so that what a compaction deletes is zeroed
// in the database file, and Checkpoint then empties the write-ahead log.
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
	// sqliteOptions are kine's own defaults for SQLite (WAL journal, a shared
	// cache and a generous busy timeout for the API server's bursts) and
	// secure_delete, which zeroes deleted content in the database file.
	// ("fast" is not enough: it leaves freed overflow pages as they were.)
	sqliteOptions = "?_journal=WAL&cache=shared&_busy_timeout=30000&_txlock=immediate&_secure_delete=on"

	// notifyInterval is how often kine sends watch progress notifications,
	// which the API server's watch cache needs to stay current.
	notifyInterval = 5 * time.Second
	// emulatedEtcdVersion is the etcd version kine reports to the API server.
	emulatedEtcdVersion = "3.5.16"

	// stopGrace bounds how long Stop waits for in-flight etcd calls.
	stopGrace = 2 * time.Second

	// connReadBuffer is the read buffer of each of kine's connections (gRPC's
	// default is 32 KiB), and each connection's write buffer is taken from a
	// pool only while it writes (gRPC's SharedWriteBuffer). The API server
	// opens one etcd client, one connection, per resource it stores, about 50
	// with Cluster API's CRDs, nearly all idle: the defaults held 64 KiB on
	// each for nothing (tests/daemon BenchmarkDaemon). kine reads requests
	// (small, but for writes of large objects, which a smaller buffer reads
	// straight through) and writes the answers, buffered as before.
	connReadBuffer = 4 << 10

	keepaliveMinTime  = 5 * time.Second
	keepaliveInterval = 2 * time.Hour
	keepaliveTimeout  = 20 * time.Second

	// kine's compaction: its own periodic compactor is off (interval 0), so
	// that Compact runs kine's safe, batched compaction at once; no
	// revisions are kept beyond the one compacted to. compactTimeout bounds
	// one batch's transaction, compactBatchSize the revisions it covers,
	// and pollBatchSize the rows kine's watch loop reads at a time (kine's
	// defaults for the last three).
	compactInterval  = 0
	compactMinRetain = 0
	compactTimeout   = 5 * time.Second
	compactBatchSize = 1000
	pollBatchSize    = 500
)

// Datastore is a running kine.
type Datastore struct {
	// Endpoint is the etcd URL the API server connects to (unix://...).
	Endpoint string
	server   *grpc.Server
	// history compacts kine and checkpoints SQLite; see history.go.
	history *history
	// cancel ends kine's context (its watch loop and compactor).
	cancel context.CancelFunc
}

// SQLitePath is the SQLite database file sovrad uses in dataDir.
func SQLitePath(dataDir string) string {
	return filepath.Join(dataDir, "db", sqliteFile)
}

// Start starts kine for cfg. On PostgreSQL kine waits for the database to be
// reachable, retrying; ctx bounds that wait. Once started, kine runs until
// Stop, even after ctx ends: the API server outlives the daemon's context,
// and kine's watch loop must outlive it (a watch opened after that loop
// ended would never end, and would hold Stop).
func Start(ctx context.Context, cfg *config.Config, dataDir string, log *zap.Logger) (*Datastore, error) {
	kind, err := cfg.DatastoreKind()
	if err != nil {
		return nil, err
	}
	dsn := cfg.Datastore
	sqlitePath := ""
	if kind == config.DatastoreSQLite {
		sqlitePath = SQLitePath(dataDir)
		if err := os.MkdirAll(filepath.Dir(sqlitePath), 0o700); err != nil {
			return nil, fmt.Errorf("creating datastore directory: %w", err)
		}
		dsn = "sqlite://" + sqlitePath + sqliteOptions
	}
	srv := grpc.NewServer(
		grpc.ReadBufferSize(connReadBuffer),
		grpc.SharedWriteBuffer(true),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: keepaliveMinTime}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: keepaliveInterval, Timeout: keepaliveTimeout}),
	)
	log.Info("starting datastore", zap.String("kind", kind))
	kctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	abort := context.AfterFunc(ctx, cancel)
	etcd, err := endpoint.Listen(kctx, endpoint.Config{
		GRPCServer:          srv,
		Listener:            "unix://" + cfg.KineSocket(),
		Endpoint:            dsn,
		MetricsRegisterer:   legacyregistry.Registerer(),
		NotifyInterval:      notifyInterval,
		EmulatedETCDVersion: emulatedEtcdVersion,
		CompactInterval:     compactInterval,
		CompactMinRetain:    compactMinRetain,
		CompactTimeout:      compactTimeout,
		CompactBatchSize:    compactBatchSize,
		PollBatchSize:       pollBatchSize,
	})
	if !abort() && err == nil {
		err = ctx.Err() // ctx ended while kine started
	}
	if err != nil {
		srv.Stop()
		cancel()
		return nil, fmt.Errorf("starting %s datastore: %s", kind, redact(err.Error(), cfg.Datastore))
	}
	h, err := newHistory(etcd.Endpoints[0], sqlitePath)
	if err != nil {
		srv.Stop()
		cancel()
		return nil, err
	}
	return &Datastore{Endpoint: etcd.Endpoints[0], server: srv, history: h, cancel: cancel}, nil
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
// watch streams the API server left open are then cut. Then kine stops.
func (d *Datastore) Stop() {
	defer d.cancel()
	d.history.close()
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
