package datastore

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"

	"github.com/sovra-dev/sovra/daemon/config"
)

const (
	// waitRetry is the pause between two attempts to reach the server.
	waitRetry = time.Second
	// waitAttempt bounds one attempt.
	waitAttempt = 5 * time.Second
	// waitReport is how often a wait that goes on says so.
	waitReport = 10 * time.Second
)

// WaitReachable waits until the PostgreSQL server of cfg answers, for at
// most cfg.DatastoreTimeout, and says in the log what it waits for. Any
// answer counts, a refused login too (kine then reports it). It returns at
// once for SQLite. Start-up calls it before it writes anything, so a
// datastore that is not there leaves the data directory as it was.
func WaitReachable(ctx context.Context, cfg *config.Config, log *zap.Logger) error {
	kind, err := cfg.DatastoreKind()
	if err != nil || kind != config.DatastorePostgres {
		return err
	}
	server := redactedServer(cfg.Datastore)
	ctx, cancel := context.WithTimeout(ctx, cfg.DatastoreTimeout)
	defer cancel()
	started := time.Now()
	reported := started
	waiting := false
	for {
		err := answers(ctx, cfg.Datastore)
		if err == nil {
			if waiting {
				log.Info("datastore reachable", zap.String("server", server), zap.Duration("waited", time.Since(started).Round(time.Millisecond)))
			}
			return nil
		}
		msg := redact(err.Error(), cfg.Datastore)
		if !waiting {
			waiting = true
			log.Warn("waiting for the datastore: nothing is written until it answers", zap.String("server", server),
				zap.Duration("timeout", cfg.DatastoreTimeout), zap.String("error", msg))
		} else if time.Since(reported) >= waitReport {
			reported = time.Now()
			log.Warn("still waiting for the datastore", zap.String("server", server),
				zap.Duration("waited", time.Since(started).Round(time.Second)), zap.Duration("timeout", cfg.DatastoreTimeout), zap.String("error", msg))
		}
		select {
		case <-ctx.Done():
			if parent := context.Cause(ctx); !errors.Is(parent, context.DeadlineExceeded) {
				return fmt.Errorf("waiting for the datastore %s: %w", server, parent)
			}
			return fmt.Errorf("waiting for the datastore: %s did not answer within %s (%s; last error: %s): nothing was written; check that it runs and is reachable, or raise %s",
				server, cfg.DatastoreTimeout, cfg.Source("datastore-timeout"), msg, cfg.Source("datastore-timeout"))
		case <-time.After(waitRetry):
		}
	}
}

// answers reports whether the server at dsn answers a connection: nil when
// it does, whatever it answers.
func answers(ctx context.Context, dsn string) error {
	actx, cancel := context.WithTimeout(ctx, waitAttempt)
	defer cancel()
	conn, err := pgconn.Connect(actx, dsn)
	if err == nil {
		return conn.Close(actx)
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return nil // the server answered: kine reports what it said
	}
	return err
}

// redactedServer is dsn's host, for the log (no user, password or query).
func redactedServer(dsn string) string {
	u, err := url.Parse(dsn)
	if err != nil || u.Host == "" {
		return "the PostgreSQL server"
	}
	return u.Host
}
