package machines

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/constants"
	"k8s.io/apimachinery/pkg/types"

	"github.com/sovra-dev/sovra/internal/hostapi"
	"github.com/sovra-dev/sovra/internal/testutil"
	"github.com/sovra-dev/sovra/tests/swtpmlab"
	"github.com/sovra-dev/sovra/tests/talosfake/bootsimtest"
)

const (
	// poolHosts simulated hosts, and as many replicas of the pool
	// cluster's MachineDeployment.
	poolHosts = 50
	// poolSyncers Sync at once, as that many agents would.
	poolSyncers = 8
	// kubectlWorkers write the simulated records at once.
	kubectlWorkers = 4
	// poolNS and poolCluster name the pool benchmark's Cluster.
	poolNS      = "pool"
	poolCluster = "pool"
	// Bounds: every claim, and every host's configuration, within these.
	claimWait    = 10 * time.Minute
	deliveryWait = 2 * time.Minute
	// syncRetry is how soon a simulated agent told to wait Syncs again
	// (the real one waits the answer's retry_seconds).
	syncRetry = 200 * time.Millisecond
	// The daemon's log lines of a claim and of a release.
	msgClaimed  = "host claimed"
	msgReleased = "configuration released"
)

// simHardware is what every simulated host reports: the simulated
// machines' hardware.
var simHardware = &hostapi.Hardware{
	Architecture: "amd64", Cpus: machineCPUs, MemoryBytes: machineMemoryMiB << 20,
	Disks: []*hostapi.Disk{{Name: "sda", SizeBytes: machineDiskBytes, Model: "SIMDISK"}},
}

// simHost is a host of the pool benchmark: a SovraNode record written as
// an enrollment and a passing attestation of boot would write it, and the
// node credential that attestation would have returned.
type simHost struct {
	name string
	uid  types.UID
	boot string
	cred tls.Certificate
	// config and gen are the configuration released to it.
	config []byte
	gen    int64
	// last is the last answer it got, for failure messages.
	last string
}

// BenchmarkHostPool measures the pool with the built sovrad (SQLite) and
// 50 simulated hosts: attested SovraNode records whose Hosts were created
// by their first Sync and accepted with kubectl. It applies a Cluster whose
// MachineDeployment has 50 replicas (workers only: no control plane, so
// that CACPPT, which would dial the simulated control-plane host, is out of
// the measure) and reports:
//
//   - claims/s: 50 over the time from `kubectl apply` until all 50 hosts
//     are claimed (Cluster API creating the Machines, CABPT their bootstrap
//     data, the provider claiming);
//   - releases/s: the 50 hosts' agents Sync over mutual TLS with their node
//     credentials, 8 at a time, each until its configuration is released;
//     50 over the time until every host has it, with the p50 and p99 of a
//     Sync (a fresh connection and handshake, as an agent's);
//   - the time from `kubectl apply` until every Machine is Provisioned,
//     once each simulated agent reported it runs its configuration.
//
// It fails when a claim or a release does not happen within its bound.
func BenchmarkHostPool(b *testing.B) {
	for range b.N {
		n := newNetwork(b)
		d := startDaemon(b, n, nil)
		b.Cleanup(func() {
			if b.Failed() {
				b.Logf("=== sovrad:\n%s", d.Tail(40))
				b.Logf("=== hosts:\n%s", d.jsonpath("get", "hosts.sovra.dev", "-o", "wide"))
			}
		})

		pool := simulatePool(b, d, poolHosts)

		manifest := filepath.Join(b.TempDir(), "pool.yaml")
		if err := os.WriteFile(manifest, []byte(poolClusterYAML(poolHosts)), 0o600); err != nil {
			b.Fatal(err)
		}

		off := d.LogSize()
		applied := time.Now()
		d.Kubectl("apply", "-f", manifest)

		// bootstrapped is when every Machine had its bootstrap data (claims
		// need none: they may finish first).
		var bootstrapped time.Duration
		withData := func() int {
			n := len(strings.Fields(d.jsonpath("-n", poolNS, "get", "machines.cluster.x-k8s.io", "-o",
				"jsonpath={range .items[*]}{.spec.bootstrap.dataSecretName}{\"\\n\"}{end}")))
			if bootstrapped == 0 && n == poolHosts {
				bootstrapped = time.Since(applied)
			}
			return n
		}

		waitFor(b, claimWait, fmt.Sprintf("%d hosts claimed", poolHosts), func() (bool, string) {
			withData()

			n := strings.Count(d.jsonpath("get", "hosts.sovra.dev", "-o",
				"jsonpath={range .items[*]}{.spec.consumerRef.name}{\"\\n\"}{end}"), poolCluster+"-")

			return n == poolHosts, fmt.Sprintf("%d claimed", n)
		})
		claimed := time.Since(applied)
		waitFor(b, claimWait, "every Machine's bootstrap data", func() (bool, string) {
			n := withData()
			return n == poolHosts, fmt.Sprintf("%d of %d", n, poolHosts)
		})
		checkClaims(b, d, pool)

		claims := logTimes(d.LogSince(off), msgClaimed)
		if len(claims) != poolHosts {
			b.Fatalf("sovrad logged %d claims, want %d", len(claims), poolHosts)
		}

		off = d.LogSize()
		released, lat := deliver(b, d, pool)

		if got := len(logTimes(d.LogSince(off), msgReleased)); got != poolHosts {
			b.Fatalf("sovrad logged %d releases, want %d", got, poolHosts)
		}

		reportRunning(b, d, pool)
		waitFor(b, provisionWait, fmt.Sprintf("%d Machines Provisioned", poolHosts), func() (bool, string) {
			n := provisionedMachines(b, d, poolNS)

			return n == poolHosts, fmt.Sprintf("%d Provisioned", n)
		})
		provisioned := time.Since(applied)

		p50, p99 := percentile(lat, 50), percentile(lat, 99)
		b.ReportMetric(poolHosts/claimed.Seconds(), "claims/s")
		b.ReportMetric(poolHosts/released.Seconds(), "releases/s")
		b.ReportMetric(float64(p50.Microseconds())/1000, "sync-p50-ms")
		b.ReportMetric(float64(p99.Microseconds())/1000, "sync-p99-ms")
		b.ReportMetric(bootstrapped.Seconds(), "apply-to-bootstrap-data-s")
		b.ReportMetric(claimed.Seconds(), "apply-to-claimed-s")
		b.ReportMetric(provisioned.Seconds(), "apply-to-provisioned-s")
		b.Logf("%d hosts: kubectl apply to all claimed %s (%.1f claims/s); first claim %s after apply, last %s after the first; "+
			"every Machine had its bootstrap data %s after apply",
			poolHosts, claimed.Round(10*time.Millisecond), poolHosts/claimed.Seconds(),
			claims[0].Sub(applied).Round(10*time.Millisecond), claims[len(claims)-1].Sub(claims[0]).Round(10*time.Millisecond),
			bootstrapped.Round(10*time.Millisecond))
		b.Logf("%d configurations released in %s (%.1f releases/s), %d Syncs from %d agents at a time: p50 %s, p99 %s",
			poolHosts, released.Round(10*time.Millisecond), poolHosts/released.Seconds(), len(lat), poolSyncers,
			p50.Round(100*time.Microsecond), p99.Round(100*time.Microsecond))
		b.Logf("kubectl apply to all %d Machines Provisioned (simulated agents): %s", poolHosts, provisioned.Round(10*time.Millisecond))
	}
}

// simulatePool writes count attested SovraNode records, lets each one's
// first Sync create its Host (with the simulated hardware's labels),
// accepts the Hosts with kubectl, and waits until all are Available.
func simulatePool(t testing.TB, d *daemon, count int) []*simHost {
	t.Helper()

	var docs strings.Builder

	pool := make([]*simHost, count)
	for i := range pool {
		name, doc := simRecordYAML(i)
		docs.WriteString(doc)
		pool[i] = &simHost{name: name, boot: bootsimtest.NewUUID(t)}
	}

	manifest := filepath.Join(t.TempDir(), "records.yaml")
	if err := os.WriteFile(manifest, []byte(docs.String()), 0o600); err != nil {
		t.Fatal(err)
	}

	d.Kubectl("apply", "-f", manifest)

	uids := map[string]types.UID{}
	for _, rec := range d.nodes(t) {
		uids[rec.Metadata.Name] = rec.Metadata.UID
	}

	for _, h := range pool {
		h.uid = uids[h.name]
		h.cred = d.credential(t, h.name, h.uid, h.boot)
	}

	now := time.Now().UTC().Format(time.RFC3339)
	parallel(t, pool, kubectlWorkers, func(h *simHost) error {
		_, err := d.TryKubectl("patch", "sovranode", h.name, "--subresource=status", "--type=merge", "-p", attestedStatus(h.boot, now))

		return err
	})

	deadline := time.Now().Add(deliveryWait)
	parallel(t, pool, poolSyncers, func(h *simHost) error {
		_, _, err := h.syncUntil(t, d, hostapi.Mode_MODE_ENROLLMENT, hostapi.Action_ACTION_WAIT, deadline)

		return err
	})

	parallel(t, pool, kubectlWorkers, func(h *simHost) error {
		_, err := d.TryKubectl("patch", "host", h.name, "--type", "merge", "-p", `{"spec":{"accepted":true}}`)

		return err
	})

	waitFor(t, enrollTimeout, fmt.Sprintf("%d hosts Available", count), func() (bool, string) {
		hs := d.hosts(t)
		n := 0

		for _, h := range hs {
			if h.Status.Phase == "Available" {
				n++
			}
		}

		return n == count, phases(hs)
	})

	return pool
}

// simRecordYAML is simulated host i's SovraNode, named after its EK hash
// as enrollment names records.
func simRecordYAML(i int) (string, string) {
	sum := sha256.Sum256(fmt.Appendf(nil, "pool-ek-%d", i))
	ekHash := hex.EncodeToString(sum[:])
	name := "ek-" + ekHash[:32]

	return name, fmt.Sprintf(`---
apiVersion: sovra.dev/v1alpha1
kind: SovraNode
metadata:
  name: %s
spec:
  ekHash: %s
  uuid: %08x-0000-4000-8000-%012x
  addresses: ["198.18.0.%d"]
`, name, ekHash, i+1, i+1, i+1)
}

// attestedStatus is the status an enrollment and a passing attestation of
// boot (at now) write: what the metadata service requires of a record.
func attestedStatus(boot, now string) string {
	return fmt.Sprintf(`{"status":{"enrollmentMethod":"Certificate","lastAttestationResult":"Passed","lastAttestationTime":%[2]q,"reason":"AttestationPassed",`+
		`"conditions":[{"type":"Enrolled","status":"True","reason":"Activated","message":"simulated","lastTransitionTime":%[2]q},`+
		`{"type":"Attested","status":"True","reason":"AttestationPassed","message":"simulated","lastTransitionTime":%[2]q}],`+
		`"boots":[{"id":%[1]q,"started":%[2]q,"firstAttested":%[2]q,"lastAttested":%[2]q,"result":"Passed"}]}}`, boot, now)
}

// poolClusterYAML is a Cluster on sovra's provider whose MachineDeployment
// has replicas workers (CABPT's worker configurations), selecting hosts as
// images/example-cluster.yaml's control plane does.
func poolClusterYAML(replicas int) string {
	return fmt.Sprintf(`apiVersion: v1
kind: Namespace
metadata:
  name: %[1]s
---
apiVersion: cluster.x-k8s.io/v1beta1
kind: Cluster
metadata:
  name: %[2]s
  namespace: %[1]s
spec:
  clusterNetwork:
    pods:
      cidrBlocks: ["10.244.0.0/16"]
    services:
      cidrBlocks: ["10.96.0.0/12"]
  infrastructureRef:
    apiVersion: infrastructure.cluster.x-k8s.io/v1alpha1
    kind: SovraCluster
    name: %[2]s
---
apiVersion: infrastructure.cluster.x-k8s.io/v1alpha1
kind: SovraCluster
metadata:
  name: %[2]s
  namespace: %[1]s
spec:
  controlPlaneEndpoint:
    host: 198.18.0.1
    port: 6443
---
apiVersion: infrastructure.cluster.x-k8s.io/v1alpha1
kind: SovraMachineTemplate
metadata:
  name: %[2]s-workers
  namespace: %[1]s
spec:
  template:
    spec:
      hostSelector:
        matchExpressions:
          - {key: host.sovra.dev/cpus, operator: NotIn, values: ["0", "1"]}
---
apiVersion: bootstrap.cluster.x-k8s.io/v1alpha3
kind: TalosConfigTemplate
metadata:
  name: %[2]s-workers
  namespace: %[1]s
spec:
  template:
    spec:
      generateType: worker
      talosVersion: v1.13
---
apiVersion: cluster.x-k8s.io/v1beta1
kind: MachineDeployment
metadata:
  name: %[2]s-workers
  namespace: %[1]s
spec:
  clusterName: %[2]s
  replicas: %[3]d
  selector:
    matchLabels: {}
  template:
    spec:
      clusterName: %[2]s
      version: v1.32.6
      bootstrap:
        configRef:
          apiVersion: bootstrap.cluster.x-k8s.io/v1alpha3
          kind: TalosConfigTemplate
          name: %[2]s-workers
      infrastructureRef:
        apiVersion: infrastructure.cluster.x-k8s.io/v1alpha1
        kind: SovraMachineTemplate
        name: %[2]s-workers
`, poolNS, poolCluster, replicas)
}

// checkClaims: every host of the pool is claimed, by a distinct machine.
func checkClaims(t testing.TB, d *daemon, pool []*simHost) {
	t.Helper()

	var consumers []string

	for _, h := range d.hosts(t) {
		if h.Spec.ConsumerRef == nil {
			t.Fatalf("host %s is not claimed", h.Metadata.Name)
		}

		consumers = append(consumers, h.Spec.ConsumerRef.Name)
	}

	if len(consumers) != len(pool) || !distinct(consumers) {
		t.Fatalf("%d hosts claimed by %v: want %d distinct machines", len(consumers), consumers, len(pool))
	}
}

// deliver plays the pool's agents on the enrollment configuration: each
// host Syncs, poolSyncers at a time, until its configuration is released.
// It returns the time until every host had it and the latency of every
// Sync, failing when a host got none within deliveryWait or got another
// host's.
func deliver(t testing.TB, d *daemon, pool []*simHost) (time.Duration, []time.Duration) {
	t.Helper()

	var (
		mu  sync.Mutex // guards lat
		lat []time.Duration
	)

	start := time.Now()
	deadline := start.Add(deliveryWait)

	parallel(t, pool, poolSyncers, func(h *simHost) error {
		resp, took, err := h.syncUntil(t, d, hostapi.Mode_MODE_ENROLLMENT, hostapi.Action_ACTION_APPLY, deadline)

		mu.Lock()
		lat = append(lat, took...)
		mu.Unlock()

		if err == nil {
			h.config, h.gen = resp.GetConfig(), resp.GetGeneration()
		}

		return nil // reported below, with every host that got nothing
	})

	released := time.Since(start)

	var missing []string

	for _, h := range pool {
		switch {
		case h.config == nil:
			missing = append(missing, h.name+": "+h.last)
		case !bytes.Contains(h.config, []byte("sovra://"+h.name)):
			t.Fatalf("host %s received a configuration without its provider ID sovra://%s", h.name, h.name)
		}
	}

	if len(missing) > 0 {
		t.Fatalf("%d of %d hosts got no configuration within %s:\n%s", len(missing), len(pool), deliveryWait, strings.Join(missing, "\n"))
	}

	return released, lat
}

// reportRunning plays the agents after the reboot: each host reports the
// generation it runs (the same boot: the benchmark measures the daemon,
// not the reboot).
func reportRunning(t testing.TB, d *daemon, pool []*simHost) {
	t.Helper()

	deadline := time.Now().Add(deliveryWait)

	parallel(t, pool, poolSyncers, func(h *simHost) error {
		_, _, err := h.syncUntil(t, d, hostapi.Mode_MODE_CONFIGURED, hostapi.Action_ACTION_NONE, deadline)

		return err
	})
}

// syncUntil Syncs as h's agent in mode (reporting its generation and the
// simulated hardware) until the answer is want, syncRetry apart, until
// deadline. It returns that answer and the latency of every Sync it made.
// An answer of APPLY must carry a configuration.
func (h *simHost) syncUntil(t testing.TB, d *daemon, mode hostapi.Mode, want hostapi.Action, deadline time.Time) (*hostapi.SyncResponse, []time.Duration, error) {
	var lat []time.Duration

	for {
		began := time.Now()
		resp, err := d.sync(t, "", h.cred, &hostapi.SyncRequest{Mode: mode, Generation: h.gen, Hardware: simHardware})
		lat = append(lat, time.Since(began))

		if err == nil && resp.GetAction() == want && (want != hostapi.Action_ACTION_APPLY || len(resp.GetConfig()) > 0) {
			return resp, lat, nil
		}

		h.last = fmt.Sprintf("%v %q %v", resp.GetAction(), resp.GetMessage(), err)
		if time.Now().After(deadline) {
			return nil, lat, fmt.Errorf("host %s (%v): %s, want %v", h.name, mode, h.last, want)
		}

		time.Sleep(syncRetry)
	}
}

// provisionedMachines counts the Machines of namespace ns that are
// Provisioned (or Running).
func provisionedMachines(t testing.TB, d *daemon, ns string) int {
	t.Helper()

	n := 0

	for _, m := range d.capiMachines(t, ns) {
		if m.Status.Phase == "Provisioned" || m.Status.Phase == "Running" {
			n++
		}
	}

	return n
}

// parallel runs f on every item, workers at a time, and fails the
// benchmark with the errors it returned.
func parallel[T any](t testing.TB, items []T, workers int, f func(T) error) {
	t.Helper()

	work := make(chan T)

	var (
		wg   sync.WaitGroup
		mu   sync.Mutex // guards errs
		errs []string
	)

	for range workers {
		wg.Add(1)

		go func() {
			defer wg.Done()

			for item := range work {
				if err := f(item); err != nil {
					mu.Lock()
					errs = append(errs, err.Error())
					mu.Unlock()
				}
			}
		}()
	}

	for _, item := range items {
		work <- item
	}

	close(work)
	wg.Wait()

	if len(errs) > 0 {
		t.Fatalf("%d of %d failed, first: %s", len(errs), len(items), errs[0])
	}
}

// logTimes are the times of sovrad's JSON log lines with message msg, in
// order.
func logTimes(log, msg string) []time.Time {
	var out []time.Time

	for _, line := range strings.Split(log, "\n") {
		var e struct {
			Time time.Time `json:"time"`
			Msg  string    `json:"msg"`
		}

		if json.Unmarshal([]byte(line), &e) == nil && e.Msg == msg {
			out = append(out, e.Time)
		}
	}

	slices.SortFunc(out, func(a, b time.Time) int { return a.Compare(b) })

	return out
}

// percentile is the p-th percentile of ds (nearest rank).
func percentile(ds []time.Duration, p int) time.Duration {
	if len(ds) == 0 {
		return 0
	}

	s := slices.Clone(ds)
	slices.Sort(s)

	return s[min(len(s)-1, (len(s)*p+99)/100-1)]
}

// BenchmarkProvision measures, with the built sovrad (SQLite,
// --kms-bind-addresses) and five simulated Talos machines (bootsim, each
// with its own swtpm and the real sovra-agent, in network namespaces), the
// time from `kubectl apply` of images/example-cluster.yaml (three control
// planes behind the test's load balancer, a MachineDeployment of two
// workers) until every Machine is
// Provisioned: claims, bootstrap data, attested release of each
// configuration, apply and reboot, re-attestation, the agent's report. The
// machines enroll, attest and are accepted before the clock starts.
func BenchmarkProvision(b *testing.B) {
	testutil.Require(b, "swtpm", "swtpm_setup", "swtpm_localca")

	for range b.N {
		n := newNetwork(b)
		lab := swtpmlab.New(b, hostCount, n.addr(legHost).String())
		d := startDaemon(b, n, lab, "--kms-bind-addresses")

		var ms []*machine

		b.Cleanup(func() { dumpParties(b, d, ms) })

		ms = bootPool(b, n, d, lab, hostCount)
		acceptPool(b, d, ms)
		lb := n.newLoadBalancer(b, lbHost, constants.TrustdPort)

		manifest := filepath.Join(b.TempDir(), "cluster.yaml")
		if err := os.WriteFile(manifest, []byte(clusterYAML(b, lb.addr.String())), 0o600); err != nil {
			b.Fatal(err)
		}

		applied := time.Now()
		d.Kubectl("apply", "-f", manifest)

		var claimed time.Duration

		waitFor(b, provisionWait, fmt.Sprintf("all %d Machines Provisioned", hostCount), func() (bool, string) {
			if claimed == 0 && strings.Count(d.jsonpath("get", "hosts.sovra.dev", "-o",
				"jsonpath={range .items[*]}{.spec.consumerRef.name}{\"\\n\"}{end}"), clusterName+"-") == hostCount {
				claimed = time.Since(applied)
			}

			lb.setBackends(controlPlaneHosts(d.hosts(b), ms))
			n := provisionedMachines(b, d, clusterNS)

			return n == hostCount, fmt.Sprintf("%d Provisioned; hosts %s", n, phases(d.hosts(b)))
		})
		provisioned := time.Since(applied)

		b.ReportMetric(claimed.Seconds(), "apply-to-claimed-s")
		b.ReportMetric(provisioned.Seconds(), "apply-to-provisioned-s")
		b.Logf("%d machines (images/example-cluster.yaml: %d control planes, %d workers): kubectl apply to all hosts claimed %s, to every Machine Provisioned %s",
			hostCount, controlPlanes, hostCount-controlPlanes, claimed.Round(100*time.Millisecond), provisioned.Round(100*time.Millisecond))
	}
}
