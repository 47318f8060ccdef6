package capi_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/tests/capi/testinfra"
	"github.com/sovra-dev/sovra/tests/pgtest"
	"github.com/sovra-dev/sovra/tests/sovradtest"
)

const (
	leaseNamespace = "sovra-system"
	leaseName      = "sovrad-controllers"
	// takeoverBound is the lease duration (15 s), plus up to two jittered
	// retry periods (2 s × 1.2 jitter: the last renewal is seen up to one
	// period late, the expiry acted on up to one late), plus slack for a
	// loaded test machine.
	takeoverBound = 25 * time.Second
	// handoverBound is one retry period (2 s) plus slack: a released Lease
	// needs no expiry.
	handoverBound = 8 * time.Second
	// electedLine is what the daemon logs when its manager wins the lease,
	// lostLine when it can no longer renew it.
	electedLine = "elected: running controllers"
	lostLine    = "lost the controllers' Lease"
	// campaignLine is what the daemon logs when its manager starts and
	// tries for the lease.
	campaignLine = "starting the Cluster API manager"
	// RetryPeriod is how often a follower tries for the lease.
	RetryPeriod = 2 * time.Second
)

// sharedKeys are the files every replica of one deployment must hold.
var sharedKeys = []string{"ca.crt", "ca.key", "sa.key", "sa.pub", "encryption-config.yaml"}

// TestLeaderElectionOnPostgres runs two replicas on one PostgreSQL: only the
// holder of the Lease reconciles; when it is killed the other takes the Lease
// within its duration, re-registers the webhooks, and reconciles a change
// made after the kill.
func TestLeaderElectionOnPostgres(t *testing.T) {
	a, b := startReplicas(t)
	t.Cleanup(func() { explainMachines(t, a, b, "ha") })

	// The stand-in infrastructure talks to B, which outlives A.
	testinfra.Start(t, b)
	const ns, name = "ha", "ha"
	mustApply(t, b, testinfra.ClusterYAML(ns, name, 1, 1))
	waitFor(t, reconcileTimeout, "the control-plane and worker Machines to be bootstrapped", func() (bool, string) {
		cp, workers := bootstrapped(machines(t, b, ns, name))
		return cp == 1 && workers == 1, fmt.Sprintf("%d control-plane, %d workers", cp, workers)
	})
	if strings.Contains(b.Tail(100000), electedLine) || !strings.Contains(a.Tail(100000), electedLine) {
		t.Fatal("replica B runs the controllers while A holds the lease")
	}
	if n := strings.Count(b.Tail(100000), `"controller":"machine"`); n > 0 {
		t.Fatalf("replica B reconciled Machines (%d log lines) while A held the lease", n)
	}

	a.Kill()
	killed := time.Now()
	waitFor(t, takeoverBound, "replica B to take the lease", func() (bool, string) {
		h := holder(b)
		return strings.Contains(h, b.URL()), "holder " + h
	})
	took := time.Since(killed)
	t.Logf("replica B took over %s after replica A was killed", took.Round(100*time.Millisecond))

	// A change through the webhooks (now B's) is reconciled by B.
	waitFor(t, takeoverBound, "the scale-up to pass the webhooks", func() (bool, string) {
		_, err := b.TryKubectl("-n", ns, "patch", "machinedeployment", name+"-workers", "--type=merge", "-p", `{"spec":{"replicas":2}}`)
		return err == nil, fmt.Sprint(err)
	})
	waitFor(t, reconcileTimeout, "the new worker Machine to be bootstrapped by replica B", func() (bool, string) {
		cp, workers := bootstrapped(machines(t, b, ns, name))
		return cp == 1 && workers == 2, fmt.Sprintf("%d control-plane, %d workers", cp, workers)
	})
	if !strings.Contains(b.Tail(100000), electedLine) {
		t.Fatal("replica B reconciled without logging its election")
	}
	for _, m := range machines(t, b, ns, name) {
		checkBootstrapData(t, b, ns, m)
	}
	if strings.Contains(b.Tail(100000), pgtest.Password) {
		t.Fatal("the daemon logged the datastore password")
	}

	// A graceful stop releases the Lease: the other replica takes over at once.
	a.Restart()
	waitCampaign(t, a)
	b.Stop()
	stopped := time.Now()
	waitFor(t, handoverBound, "replica A to take the released lease", func() (bool, string) {
		h := holder(a)
		return strings.Contains(h, a.URL()), "holder " + h
	})
	t.Logf("replica A took over %s after replica B stopped gracefully", time.Since(stopped).Round(100*time.Millisecond))

	// A leader frozen past its renew deadline (a long pause, a stalled VM)
	// loses the Lease to B; when it thaws it stays up and stands by as a
	// follower instead of exiting or fighting for the Lease.
	b.Restart()
	waitCampaign(t, b)
	if err := syscall.Kill(a.PID(), syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	waitFor(t, takeoverBound, "replica B to take the frozen leader's lease", func() (bool, string) {
		h := holder(b)
		return strings.Contains(h, b.URL()), "holder " + h
	})
	if err := syscall.Kill(a.PID(), syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	waitFor(t, time.Minute, "the thawed replica A to stand by", func() (bool, string) {
		return strings.Contains(a.Tail(100000), lostLine), ""
	})
	time.Sleep(2 * RetryPeriod)
	if h := holder(a); !strings.Contains(h, b.URL()) {
		t.Fatalf("the thawed replica took the lease back: holder %s", h)
	}
	a.Kubectl("get", "namespaces") // A still serves the API
	b.Kubectl("-n", ns, "patch", "machinedeployment", name+"-workers", "--type=merge", "-p", `{"spec":{"replicas":1}}`)
	waitFor(t, reconcileTimeout, "replica B to scale the workers down", func() (bool, string) {
		_, workers := bootstrapped(machines(t, b, ns, name))
		return workers == 1, fmt.Sprintf("%d workers", workers)
	})
}

// explainMachines logs, when the test failed, the Machines with their
// creation times and owners, and the replicas' log lines about creating,
// rolling out or scaling Machines: a control plane of one that grew a
// second Machine after a failover was seen once in CI and not reproduced.
func explainMachines(t *testing.T, a, b *sovradtest.Daemon, ns string) {
	if !t.Failed() {
		return
	}
	out, _ := b.TryKubectl("-n", ns, "get", "machines", "-o",
		"custom-columns=NAME:.metadata.name,CREATED:.metadata.creationTimestamp,OWNER:.metadata.ownerReferences[0].name,VERSION:.spec.version,PHASE:.status.phase")
	t.Logf("Machines:\n%s", out)
	for name, d := range map[string]*sovradtest.Daemon{"A": a, "B": b} {
		var lines []string
		for _, l := range strings.Split(d.Tail(100000), "\n") {
			if strings.Contains(l, "control plane") || strings.Contains(l, "rolling out") || strings.Contains(l, "caling") ||
				strings.Contains(l, "Creating") || strings.Contains(l, "elected") {
				lines = append(lines, l)
			}
		}
		t.Logf("replica %s, lines about Machines:\n%s", name, strings.Join(lines, "\n"))
	}
}

// startReplicas starts two replicas of one deployment on a private
// PostgreSQL: A holds the controllers' Lease, B stands by.
func startReplicas(t *testing.T) (a, b *sovradtest.Daemon) {
	t.Helper()
	dsn := pgtest.Start(t).DSN("sovra")
	dirA := filepath.Join(t.TempDir(), "a")
	a = startDaemon(t, dirA, "--datastore", dsn)
	waitCRDs(t, a)
	waitFor(t, time.Minute, "replica A to hold the lease", func() (bool, string) {
		h := holder(a)
		return strings.Contains(h, a.URL()), "holder " + h
	})
	b = startDaemon(t, replicaDir(t, dirA), "--datastore", dsn)
	waitCampaign(t, b)
	return a, b
}

// waitCampaign waits until d started its Cluster API manager: it then tries
// for the Lease (client-go's own line about it is an info line of a library,
// which sovrad's quiet start leaves out). Each start of d begins a new log.
func waitCampaign(t *testing.T, d *sovradtest.Daemon) {
	t.Helper()
	waitFor(t, time.Minute, "the replica to try for the lease", func() (bool, string) {
		return strings.Contains(d.Tail(100000), campaignLine), ""
	})
}

// holder is the identity in the controllers' Lease, empty when unreadable.
func holder(d *sovradtest.Daemon) string {
	return jsonpath(d, "-n", leaseNamespace, "get", "lease", leaseName, "-o", "jsonpath={.spec.holderIdentity}")
}

// replicaDir makes a fresh data directory holding the keys of dir, as a
// second replica of the same deployment needs; it issues its own serving
// certificates.
func replicaDir(t testing.TB, dir string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "replica")
	if err := os.Mkdir(dst, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, name := range sharedKeys {
		data, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dst
}
