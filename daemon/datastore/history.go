package datastore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	// The SQLite driver kine itself uses: one copy of SQLite in the process,
	// so that its locks on the database files stay coherent.
	_ "github.com/mattn/go-sqlite3"
	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

const (
	// probeKey is a key nobody writes: reading it at a revision tells
	// whether that revision is compacted, and reading it now returns the
	// revision kine has delivered to its watchers.
	probeKey = "/sovra.dev/datastore/probe"

	// compactAttempts and compactRetry bound Compact's retries when another
	// compaction (the API server's, another replica's) won the race.
	compactAttempts = 5
	compactRetry    = 200 * time.Millisecond

	// checkpointAttempts and checkpointRetry bound Checkpoint's retries
	// while readers keep the write-ahead log in use.
	checkpointAttempts = 100
	checkpointRetry    = 100 * time.Millisecond
	// checkpointSQL copies every frame of the write-ahead log into the
	// database and truncates the log to zero bytes.
	checkpointSQL = "PRAGMA wal_checkpoint(TRUNCATE)"
)

// Sentinel errors of Compact and Checkpoint.
var (
	// ErrNotCompacted: kine's compact revision stayed below the revision
	// asked for (its compaction failed; kine's log says why).
	ErrNotCompacted = errors.New("the datastore did not compact")
	// ErrCheckpointBusy: readers or writers kept the SQLite write-ahead log
	// in use through every attempt.
	ErrCheckpointBusy = errors.New("the SQLite write-ahead log stayed busy")
)

// history is sovrad's handle on kine's history: an etcd client on kine's
// socket, and on SQLite a database connection of its own.
type history struct {
	conn *grpc.ClientConn
	kv   etcdserverpb.KVClient
	// db checkpoints the SQLite database; nil on PostgreSQL.
	db *sql.DB
}

// newHistory connects to kine at endpoint (unix://...) and, when sqlitePath
// is set, opens the SQLite database with kine's own options.
func newHistory(endpoint, sqlitePath string) (*history, error) {
	conn, err := grpc.NewClient(endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("connecting to the datastore: %w", err)
	}
	h := &history{conn: conn, kv: etcdserverpb.NewKVClient(conn)}
	if sqlitePath != "" {
		db, err := sql.Open("sqlite3", sqlitePath+sqliteOptions)
		if err != nil {
			conn.Close()
			return nil, fmt.Errorf("opening the SQLite database: %w", err)
		}
		// One connection: it only ever checkpoints.
		db.SetMaxOpenConns(1)
		h.db = db
	}
	return h, nil
}

func (h *history) close() {
	h.conn.Close()
	if h.db != nil {
		h.db.Close()
	}
}

// Revision is the newest revision kine has delivered to its watchers.
func (d *Datastore) Revision(ctx context.Context) (int64, error) {
	resp, err := d.history.kv.Range(ctx, &etcdserverpb.RangeRequest{Key: []byte(probeKey)})
	if err != nil {
		return 0, fmt.Errorf("reading the datastore revision: %w", err)
	}
	return resp.GetHeader().GetRevision(), nil
}

// Compact makes kine forget its history up to revision: every row a newer
// row at or below revision replaced, and every key deleted at or below it.
// The rows go from the database; on SQLite, secure_delete zeroes their
// bytes in the database file, and Checkpoint removes them from the
// write-ahead log. revision must already have reached kine's watchers (a
// watch event the caller saw): compacting past what a watcher has read
// would lose it events. Compact returns once kine's compact revision is at
// least revision, and is a no-op when it already is.
func (d *Datastore) Compact(ctx context.Context, revision int64) error {
	for attempt := 1; ; attempt++ {
		// kine answers with its current revision; a failed compaction is
		// only in its log, so the result is read back.
		if _, err := d.history.kv.Compact(ctx, &etcdserverpb.CompactionRequest{Revision: revision}); err != nil {
			return fmt.Errorf("compacting the datastore to revision %d: %w", revision, err)
		}
		done, err := d.history.compactedTo(ctx, revision)
		switch {
		case err != nil:
			return fmt.Errorf("compacting the datastore to revision %d: %w", revision, err)
		case done:
			return nil
		case attempt == compactAttempts:
			return fmt.Errorf("compacting the datastore to revision %d: %w", revision, ErrNotCompacted)
		}
		if err := sleep(ctx, compactRetry); err != nil {
			return fmt.Errorf("compacting the datastore to revision %d: %w", revision, err)
		}
	}
}

// compactedTo reports whether kine's compact revision is at least revision:
// a read at the revision before it is then refused as compacted.
func (h *history) compactedTo(ctx context.Context, revision int64) (bool, error) {
	if revision <= 1 {
		return true, nil
	}
	_, err := h.kv.Range(ctx, &etcdserverpb.RangeRequest{Key: []byte(probeKey), Revision: revision - 1})
	switch {
	case err == nil:
		return false, nil
	case errors.Is(rpctypes.Error(err), rpctypes.ErrCompacted):
		return true, nil
	default:
		return false, fmt.Errorf("reading the compact revision: %w", err)
	}
}

// Checkpoint copies SQLite's write-ahead log into the database file and
// truncates the log to zero bytes, so that no page image of a compacted
// row is left in it. It retries while readers hold the log. On PostgreSQL
// it does nothing: there the operator runs VACUUM FULL (see
// docs/operators.md).
func (d *Datastore) Checkpoint(ctx context.Context) error {
	db := d.history.db
	if db == nil {
		return nil
	}
	for attempt := 1; ; attempt++ {
		var busy, logFrames, checkpointed int
		if err := db.QueryRowContext(ctx, checkpointSQL).Scan(&busy, &logFrames, &checkpointed); err != nil {
			return fmt.Errorf("checkpointing the SQLite write-ahead log: %w", err)
		}
		if busy == 0 {
			return nil
		}
		if attempt == checkpointAttempts {
			return fmt.Errorf("checkpointing the SQLite write-ahead log: %w", ErrCheckpointBusy)
		}
		if err := sleep(ctx, checkpointRetry); err != nil {
			return fmt.Errorf("checkpointing the SQLite write-ahead log: %w", err)
		}
	}
}

// sleep waits for d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
