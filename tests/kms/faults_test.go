package kms

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/internal/testutil"
	"github.com/sovra-dev/sovra/tests/pgtest"
)

const (
	// faultNodes boot in each fault story: half seal for the first time
	// (first boot), half unseal (reboot).
	faultNodes = 200
	// bootDeadline bounds one node's boot, retries included: Talos retries
	// a failed unlock until it succeeds.
	bootDeadline = 3 * time.Minute
	retryPause   = 100 * time.Millisecond
)

// stormRate is the per-source KMS rate of the fault stories: their nodes
// all call from 127.0.0.1, where a real storm comes from faultNodes
// addresses, each far under the default.
var stormRate = []string{"--kms-rate-per-ip", "2000"}

// sharedKeys are the files every replica of one deployment holds.
var sharedKeys = []string{"ca.crt", "ca.key", "sa.key", "sa.pub", "encryption-config.yaml"}

// boot is one node's boot: a first boot seals a fresh key (and then, as on
// its next boot, unseals the blob it got); a reboot unseals its old blob.
// Either way it retries every failure, as Talos does, and reports the key
// it ends up with.
type boot struct {
	n     node
	first bool
	key   []byte // sealed before the storm (reboots) or in it (first boots)
	blob  []byte
}

// storm runs every boot at once against the replicas (round-robin) and
// returns the boots whose key did not come back.
func storm(t *testing.T, replicas []*kmsDaemon, boots []*boot, during func()) []string {
	t.Helper()
	var wg sync.WaitGroup
	var lost sync.Map
	var done atomic.Int64
	for i, b := range boots {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx := context.Background()
			deadline := time.Now().Add(bootDeadline)
			try := i
			for b.first && b.blob == nil {
				blob, err := replicas[try%len(replicas)].Seal(ctx, b.n.UUID, b.key)
				try++
				if err == nil {
					b.blob = blob
					break
				}
				if time.Now().After(deadline) {
					lost.Store(b.n.Name, fmt.Sprintf("never sealed: %v", err))
					return
				}
				time.Sleep(retryPause)
			}
			for {
				got, err := replicas[try%len(replicas)].Unseal(ctx, b.n.UUID, b.blob)
				try++
				if err == nil {
					if !bytes.Equal(got, b.key) {
						lost.Store(b.n.Name, "unsealed another key")
					}
					done.Add(1)
					return
				}
				if time.Now().After(deadline) {
					lost.Store(b.n.Name, fmt.Sprintf("never unsealed: %v", err))
					return
				}
				time.Sleep(retryPause)
			}
		}()
	}
	// Let the storm get going, then break things.
	for done.Load() < int64(len(boots)/10) {
		time.Sleep(5 * time.Millisecond)
	}
	during()
	wg.Wait()
	var out []string
	lost.Range(func(k, v any) bool { out = append(out, fmt.Sprintf("%s: %s", k, v)); return true })
	return out
}

// prepareBoots registers faultNodes attested nodes; half have sealed a key
// already (they reboot), half have not (first boot).
func prepareBoots(t *testing.T, d *kmsDaemon) []*boot {
	t.Helper()
	ctx := context.Background()
	boots := make([]*boot, faultNodes)
	parallel(t, faultNodes, func(i int) error {
		b := &boot{n: newNode(t), first: i%2 == 0, key: key(t)}
		boots[i] = b
		if err := d.createNode(ctx, b.n, attestedNode); err != nil {
			return err
		}
		if b.first {
			return nil
		}
		var err error
		for range 100 {
			if b.blob, err = d.Seal(ctx, b.n.UUID, b.key); err == nil {
				return nil
			}
			time.Sleep(20 * time.Millisecond)
		}
		return err
	})
	// First boots must find their records in the KMS's cache.
	time.Sleep(time.Second)
	return boots
}

// TestKillDuringBootStorm: sovrad is killed (SIGKILL) in the middle of a
// boot storm and started again; every node unseals in the end, and every
// blob a Seal returned still opens: no key is lost.
func TestKillDuringBootStorm(t *testing.T) {
	d := startKMS(t, stormRate...)
	boots := prepareBoots(t, d)
	lost := storm(t, []*kmsDaemon{d}, boots, func() {
		d.Kill()
		time.Sleep(500 * time.Millisecond) // nodes fail and retry meanwhile
		d.Restart()
		t.Logf("sovrad killed and restarted (%s to ready)", d.ReadyAt.Sub(d.StartedAt).Round(time.Millisecond))
	})
	if len(lost) > 0 {
		t.Fatalf("%d of %d nodes lost their key: %v\n%s", len(lost), len(boots), lost[:min(5, len(lost))], d.Tail(20))
	}
	// Every blob, including those sealed just before the kill, opens on
	// the restarted daemon (its salt was stored before the blob returned).
	for _, b := range boots {
		if got, err := d.Unseal(context.Background(), b.n.UUID, b.blob); err != nil || !bytes.Equal(got, b.key) {
			t.Fatalf("%s after the restart: %v", b.n.Name, err)
		}
	}
}

// TestPostgresRestartUnderTwoReplicas: two sovrad replicas share one
// PostgreSQL and one master keyring; PostgreSQL restarts in the middle of a
// boot storm spread over both; every node unseals in the end.
func TestPostgresRestartUnderTwoReplicas(t *testing.T) {
	// catchUp bounds how long a replica's view may lag the database after
	// the restart.
	const catchUp = 2 * time.Minute

	pg := pgtest.Start(t)
	dsn := pg.DSN("sovra")
	keyFile := filepath.Join(t.TempDir(), "master.key")
	dirA := filepath.Join(t.TempDir(), "a")
	a := startKMSWith(t, dirA, keyFile, testutil.FreePort(t), append([]string{"--datastore", dsn}, stormRate...)...)
	dirB := filepath.Join(t.TempDir(), "b")
	if err := os.Mkdir(dirB, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, name := range sharedKeys {
		data, err := os.ReadFile(filepath.Join(dirA, name))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dirB, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	b := startKMSWith(t, dirB, keyFile, testutil.FreePort(t), append([]string{"--datastore", dsn}, stormRate...)...)

	boots := prepareBoots(t, a)
	lost := storm(t, []*kmsDaemon{a, b}, boots, func() {
		pg.Stop()
		time.Sleep(time.Second)
		pg.Start()
		t.Log("PostgreSQL stopped and started again")
	})
	if len(lost) > 0 {
		t.Fatalf("%d of %d nodes lost their key: %v\nA:\n%s\nB:\n%s", len(lost), len(boots), lost[:min(5, len(lost))], a.Tail(20), b.Tail(20))
	}
	// A blob sealed through one replica opens through the other, once both
	// replicas' views have caught up with the database after its restart.
	start := time.Now()
	for _, bt := range boots {
		for _, r := range []*kmsDaemon{a, b} {
			for {
				got, err := r.Unseal(context.Background(), bt.n.UUID, bt.blob)
				if err == nil && bytes.Equal(got, bt.key) {
					break
				}
				if time.Since(start) > catchUp {
					t.Fatalf("%s through %s, %s after the storm: %v\n%s", bt.n.Name, r.DataDir, time.Since(start), err, r.Tail(30))
				}
				time.Sleep(500 * time.Millisecond)
			}
		}
	}
	t.Logf("both replicas opened every blob %s after the storm", time.Since(start).Round(time.Millisecond))
}
