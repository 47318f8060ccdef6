package datastore

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/sovra-dev/sovra/daemon/config"
)

// TestCompactAndCheckpointSQLite runs kine on SQLite as sovrad does, writes
// a key's history (create, update, delete) with values that fill overflow
// pages, and checks that Compact makes kine forget it and that, with
// Checkpoint, no byte of it is left in the database files.
func TestCompactAndCheckpointSQLite(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cfg := config.New()
	cfg.DataDir = t.TempDir()
	ds, err := Start(ctx, cfg, cfg.DataDir, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer ds.Stop()
	conn, err := grpc.NewClient(ds.Endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	kv := etcdserverpb.NewKVClient(conn)

	key := []byte("/registry/sovra.dev/sovranodes/n1")
	small, big := marker(t, 32), marker(t, 20000)
	rev1 := txn(t, kv, &etcdserverpb.TxnRequest{
		Compare: []*etcdserverpb.Compare{modEquals(key, 0)},
		Success: []*etcdserverpb.RequestOp{put(key, small)},
	})
	rev2 := txn(t, kv, &etcdserverpb.TxnRequest{
		Compare: []*etcdserverpb.Compare{modEquals(key, rev1)},
		Success: []*etcdserverpb.RequestOp{put(key, big)},
		Failure: []*etcdserverpb.RequestOp{get(key)},
	})
	rev3 := txn(t, kv, &etcdserverpb.TxnRequest{
		Compare: []*etcdserverpb.Compare{modEquals(key, rev2)},
		Success: []*etcdserverpb.RequestOp{{Request: &etcdserverpb.RequestOp_RequestDeleteRange{
			RequestDeleteRange: &etcdserverpb.DeleteRangeRequest{Key: key}}}},
		Failure: []*etcdserverpb.RequestOp{get(key)},
	})
	if resp, err := kv.Range(ctx, &etcdserverpb.RangeRequest{Key: key, Revision: rev1}); err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("history before compaction: %v %v", resp, err)
	}
	files := filepath.Join(cfg.DataDir, "db", sqliteFile+"*")
	if !contains(t, files, small) || !contains(t, files, big) {
		t.Fatal("the database files lack the values before compaction: wrong files?")
	}

	if cur, err := ds.Revision(ctx); err != nil || cur < rev3 {
		t.Fatalf("Revision = %d, %v; want at least %d", cur, err, rev3)
	}
	if err := ds.Compact(ctx, rev3); err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Range(ctx, &etcdserverpb.RangeRequest{Key: key, Revision: rev2}); !errors.Is(rpctypes.Error(err), rpctypes.ErrCompacted) {
		t.Fatalf("reading revision %d after compacting to %d: %v, want compacted", rev2, rev3, err)
	}
	if err := ds.Compact(ctx, rev2); err != nil {
		t.Fatalf("compacting to an older revision: %v", err)
	}
	if err := ds.Checkpoint(ctx); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(SQLitePath(cfg.DataDir) + "-wal"); err != nil || st.Size() != 0 {
		t.Fatalf("write-ahead log after Checkpoint: %v %v, want 0 bytes", st, err)
	}
	if contains(t, files, small) || contains(t, files, big) {
		t.Fatal("a compacted value is still in the database files")
	}
}

// contains reports whether the files matching pattern hold any chunk of
// value (SQLite splits a large value over overflow pages). Only a test may
// read the database files in the daemon's process: closing a descriptor
// drops the process's locks on the file.
func contains(t *testing.T, pattern string, value []byte) bool {
	t.Helper()
	paths, _ := filepath.Glob(pattern)
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < len(value); i += chunk {
			if bytes.Contains(b, value[i:min(i+chunk, len(value))]) {
				return true
			}
		}
	}
	return false
}

// chunk is less than what an overflow page holds.
const chunk = 32

func marker(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n/2)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return []byte(hex.EncodeToString(b))
}

func txn(t *testing.T, kv etcdserverpb.KVClient, req *etcdserverpb.TxnRequest) int64 {
	t.Helper()
	resp, err := kv.Txn(context.Background(), req)
	if err != nil || !resp.Succeeded {
		t.Fatalf("txn: %v %v", resp, err)
	}
	return resp.Header.Revision
}

func modEquals(key []byte, rev int64) *etcdserverpb.Compare {
	return &etcdserverpb.Compare{Key: key, Target: etcdserverpb.Compare_MOD, Result: etcdserverpb.Compare_EQUAL,
		TargetUnion: &etcdserverpb.Compare_ModRevision{ModRevision: rev}}
}

func put(key, value []byte) *etcdserverpb.RequestOp {
	return &etcdserverpb.RequestOp{Request: &etcdserverpb.RequestOp_RequestPut{
		RequestPut: &etcdserverpb.PutRequest{Key: key, Value: value}}}
}

func get(key []byte) *etcdserverpb.RequestOp {
	return &etcdserverpb.RequestOp{Request: &etcdserverpb.RequestOp_RequestRange{
		RequestRange: &etcdserverpb.RangeRequest{Key: key}}}
}
