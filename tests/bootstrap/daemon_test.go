package bootstrap

import (
	"crypto/rand"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/internal/testutil"
	"github.com/sovra-dev/sovra/tests/sovradtest"
	"github.com/sovra-dev/sovra/tests/swtpmlab"
	"github.com/sovra-dev/sovra/tests/talosfake"
)

// The daemon story's constants.
const (
	// legAddr is the test's own address on the cluster's bridge, where
	// sovrad's node API and the swtpm instances listen.
	legAddr = netPrefix + ".1"
	// storyCluster is the cluster the operator labels the nodes with.
	storyCluster = "prod"
	// attestWait bounds enrollment and attestation of every node.
	attestWait = 120 * time.Second
	// Agent log messages of the daemon path (agent/daemonlink and
	// agent/controllers/bootstrap).
	msgLeaseGranted   = "bootstrap lease granted"
	msgLeaseCommitted = "bootstrap lease won and committed: this node alone may bootstrap"
)

// addLeg connects the test's own network namespace to the cluster's bridge
// with a veth whose end here has legAddr, so that processes the test runs
// (sovrad, swtpm) are reachable from the hosts. It is removed when the test
// ends; deleting the bridge namespace would remove it too.
func (c *cluster) addLeg() string {
	c.t.Helper()
	name := fmt.Sprintf("svl%d-%d", os.Getpid()%1_000_000, nsCounter.Add(1))
	c.ip("link", "add", name, "type", "veth", "peer", "name", "leg0", "netns", c.bridge)
	c.t.Cleanup(func() { exec.Command("ip", "link", "del", name).Run() }) //nolint:errcheck
	c.ip("-n", c.bridge, "link", "set", "leg0", "master", "br0")
	c.ip("-n", c.bridge, "link", "set", "leg0", "up")
	c.ip("addr", "add", legAddr+"/24", "dev", name)
	c.ip("link", "set", name, "up")
	return legAddr
}

// TestDaemonMembershipAndLeaseBootstrapOnce is the story with the daemon:
// the real sovrad and three real agents, each with its own swtpm as TPM and
// a fake Talos node in its own network namespace. No network CIDR is
// configured, so nothing is scanned: the agents find each other only through
// the daemon's membership list, once the operator labelled their SovraNodes
// with the cluster. A fourth fake Talos node with a certificate from the
// cluster's own Talos CA and the earliest boot time of all sits on the same
// network without an agent: a scan would elect and bootstrap it, the
// membership list never names it. Exactly one Bootstrap happens, on the
// node that holds the cluster's bootstrap lease.
func TestDaemonMembershipAndLeaseBootstrapOnce(t *testing.T) {
	testutil.Require(t, "swtpm", "swtpm_setup", "swtpm_localca")
	c := newCluster(t)
	leg := c.addLeg()
	lab := swtpmlab.New(t, 3, leg)

	dataDir := filepath.Join(t.TempDir(), "data")
	endpoint := net.JoinHostPort(leg, strconv.Itoa(testutil.FreePort(t)))
	d := sovradtest.Start(t, dataDir,
		"--node-listen", endpoint, "--tls-san", leg,
		"--ek-roots", lab.Roots(), "--ek-intermediates", lab.Intermediates(),
		"--controllers", "none")

	rogue := c.addHost()
	rogue.startFake(fakeOptions{bootTime: baseBoot - 100})

	hosts := make([]*host, 3)
	for i := range hosts {
		hosts[i] = c.addHost()
	}
	boots := []int64{baseBoot + 2, baseBoot, baseBoot + 1} // the middle one leads
	leader := hosts[1]
	for i, h := range hosts {
		h.startFake(fakeOptions{bootTime: boots[i]})
		h.startAgentEnv(h.daemonAgentEnv(endpoint, dataDir, lab.TPMs[i]))
	}

	// The operator's step: once the three nodes are attested, label their
	// records with the cluster. Until then no agent has a peer.
	names := waitAttested(t, d, c, len(hosts))
	time.Sleep(2 * time.Second) // a few unlabelled rounds
	if c.bootstraps() != 0 {
		t.Fatal("a node bootstrapped before its cluster was known")
	}
	labelled := time.Now()
	labelNodes(d, names...)

	c.waitFinal(hosts...)
	t.Logf("from the label to the end of every bootstrap path: %s", time.Since(labelled).Round(time.Millisecond))
	checkOneBootstrap(t, c, leader)
	if rogue.acceptedBootstraps() != 0 {
		t.Fatal("the node outside the membership list was bootstrapped")
	}

	fields := storyLease(d)
	if len(fields) != 3 || fields[1] != leader.addr.String() || fields[2] != "Bootstrapped" {
		t.Fatalf("lease = %q, want held by the leader %s, Bootstrapped", fields, leader.addr)
	}
	if !leader.logHas(msgLeaseGranted) || !leader.logHas(msgLeaseCommitted) {
		t.Fatal("the leader did not log the lease it won")
	}
	for _, h := range hosts {
		if h != leader && h.logHas(msgLeaseCommitted) {
			t.Fatalf("follower %s committed to bootstrap", h.addr)
		}
	}

	won := d.Kubectl("get", "events", "-n", "default", "--field-selector", "reason=BootstrapLeaseWon", "-o", "jsonpath={.items[*].involvedObject.name}")
	if strings.Fields(won)[0] != fields[0] || len(strings.Fields(won)) != 1 {
		t.Fatalf("BootstrapLeaseWon events on %q, want one on the holder %s", won, fields[0])
	}
	t.Logf("kubectl get sovranodes -L sovra.dev/cluster:\n%s", d.Kubectl("get", "sovranodes", "-L", "sovra.dev/cluster"))
	t.Logf("bootstrap lease: %v", fields)
	t.Logf("events:\n%s", d.Kubectl("get", "events", "-n", "default", "--sort-by", ".lastTimestamp",
		"-o", "custom-columns=NODE:.involvedObject.name,TYPE:.type,REASON:.reason,MESSAGE:.message"))
}

// labelNodes labels SovraNodes with storyCluster, as the operator does.
func labelNodes(d *sovradtest.Daemon, names ...string) {
	d.Kubectl(append(append([]string{"label", "sovranodes"}, names...), "sovra.dev/cluster="+storyCluster)...)
}

// storyLease returns storyCluster's bootstrap lease: holder, holder address
// and phase; nothing when there is none.
func storyLease(d *sovradtest.Daemon) []string {
	out, _ := d.TryKubectl("-n", "sovra-system", "get", "lease", "bootstrap-"+storyCluster, "-o",
		`jsonpath={.spec.holderIdentity} {.metadata.annotations.sovra\.dev/holder-address} {.metadata.annotations.sovra\.dev/bootstrap-phase}`)
	return strings.Fields(out)
}

// daemonAgentEnv is the environment of an agent that finds its peers
// through the daemon at endpoint (whose data directory is dataDir) and
// attests with tpm: no network CIDR, so nothing is scanned.
func (h *host) daemonAgentEnv(endpoint, dataDir string, tpm swtpmlab.TPM) []string {
	return []string{
		"PATH=" + os.Getenv("PATH"),
		"SOVRA_LOG_LEVEL=info",
		"SOVRA_TALOSCONFIG=" + filepath.Join(h.c.dir, talosfake.TalosconfigFile),
		"SOVRA_NODE_ADDRESS=" + h.addr.String(),
		"SOVRA_BOOTSTRAP_EXPECTED_CONTROL_PLANES=3",
		"SOVRA_BOOTSTRAP_SCAN_INTERVAL=1s",
		"SOVRA_BOOTSTRAP_POLL_INTERVAL=500ms",
		"SOVRA_BOOTSTRAP_CONNECT_TIMEOUT=300ms",
		"SOVRA_DAEMON_ENDPOINT=" + endpoint,
		"SOVRA_DAEMON_CA=" + filepath.Join(dataDir, "node-ca.crt"),
		"SOVRA_TPM=swtpm:" + tpm.Addr,
		"SOVRA_EVENT_LOG=" + tpm.EventLog,
		"SOVRA_NODE_UUID=" + newUUID(),
		"SOVRA_STATE_DIR=" + filepath.Join(h.dir, "state"),
	}
}

// waitAttested waits until n SovraNodes passed attestation and returns
// their names.
func waitAttested(t *testing.T, d *sovradtest.Daemon, c *cluster, n int) []string {
	t.Helper()
	deadline := time.Now().Add(attestWait)
	var out string
	for time.Now().Before(deadline) {
		out, _ = d.TryKubectl("get", "sovranodes", "-o", `jsonpath={range .items[*]}{.metadata.name} {.status.lastAttestationResult}{"\n"}{end}`)
		var names []string
		for _, line := range strings.Split(out, "\n") {
			if name, result, ok := strings.Cut(line, " "); ok && result == "Passed" {
				names = append(names, name)
			}
		}
		if len(names) == n {
			return names
		}
		time.Sleep(500 * time.Millisecond)
	}
	c.dumpLogs()
	t.Fatalf("the nodes did not all pass attestation: %q\ndaemon log:\n%s", out, d.Tail(40))
	return nil
}

func newUUID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}
