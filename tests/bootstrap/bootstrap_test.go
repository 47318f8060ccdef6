package bootstrap

import (
	"context"
	"math/rand/v2"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/internal/testutil"
	"github.com/sovra-dev/sovra/tests/talosfake"
)

// baseBoot is the boot time of the stories' nodes, in seconds since the epoch.
const baseBoot = 1_800_000_000

// bootInRandomOrder starts n control-plane hosts (fake node, then agent) in a
// random order with random pauses, with random boot times that include ties.
// It returns the hosts in address order and the expected leader.
func bootInRandomOrder(t *testing.T, c *cluster, n int, rng *rand.Rand) ([]*host, *host) {
	t.Helper()

	hosts := make([]*host, n)
	boots := make([]int64, n)

	for i := range n {
		hosts[i] = c.addHost()
		boots[i] = baseBoot + rng.Int64N(3) // few values: ties are likely, the address breaks them
	}

	for _, i := range rng.Perm(n) {
		hosts[i].startFake(fakeOptions{bootTime: boots[i]})
		hosts[i].startAgent(n)
		time.Sleep(time.Duration(rng.IntN(1500)) * time.Millisecond)
	}

	// Earliest boot time wins; addresses grow with the index, so the first
	// of equal boot times has the lowest address.
	leader := 0
	for i := range hosts {
		if boots[i] < boots[leader] {
			leader = i
		}
	}

	return hosts, hosts[leader]
}

func checkOneBootstrap(t *testing.T, c *cluster, leader *host) {
	t.Helper()

	if got := c.bootstraps(); got != 1 {
		c.dumpLogs()
		t.Fatalf("Bootstrap accepted %d times cluster-wide, want exactly 1", got)
	}

	if leader != nil && leader.acceptedBootstraps() != 1 {
		c.dumpLogs()
		t.Fatalf("the bootstrap did not happen on the expected leader %s", leader.addr)
	}
}

func testControlPlanes(t *testing.T, n int) {
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)

	c := newCluster(t)
	rng := rand.New(rand.NewPCG(seed, seed))

	hosts, leader := bootInRandomOrder(t, c, n, rng)

	// A worker on the same network leaves the bootstrap path and is no candidate.
	worker := c.addHost()
	worker.startFake(fakeOptions{machineType: "worker", bootTime: baseBoot - 100})
	worker.startAgent(n)

	c.waitFinal(append(hosts, worker)...)
	checkOneBootstrap(t, c, leader)

	if !leader.logHas(msgLeaderElected) || !worker.logHas(msgWorker) {
		t.Fatal("missing the leader's or the worker's decision line")
	}

	// A follower ends when it sees etcd on the leader, either while
	// following it or in its next discovery round.
	for _, h := range hosts {
		if h != leader && !h.logHas(msgJoined) && !h.logHas(msgEtcdExists) {
			t.Fatalf("follower %s did not see etcd come up on the leader", h.addr)
		}
	}

	// A node booting after the bootstrap, with the earliest boot time of
	// all, does not bootstrap.
	late := c.addHost()
	late.startFake(fakeOptions{bootTime: baseBoot - 1000})
	late.startAgent(n)
	c.waitFinal(late)

	if !late.logHas(msgEtcdExists) {
		t.Fatal("the late node did not see the existing etcd")
	}

	checkOneBootstrap(t, c, leader)
}

func TestThreeControlPlanesBootstrapOnce(t *testing.T) { testControlPlanes(t, 3) }

func TestFiveControlPlanesBootstrapOnce(t *testing.T) { testControlPlanes(t, 5) }

// TestPartitionedNodeNeverBootstrapsSecondEtcd cuts the link of the node with
// the earliest boot time: the three others (the expected count) bootstrap
// without it, it never does, and once its link is back it sees etcd.
func TestPartitionedNodeNeverBootstrapsSecondEtcd(t *testing.T) {
	c := newCluster(t)

	cut := c.addHost()
	cut.setLink(false)
	cut.startFake(fakeOptions{bootTime: baseBoot - 500})
	cut.startAgent(3)

	var others []*host

	for i := range 3 {
		h := c.addHost()
		h.startFake(fakeOptions{bootTime: baseBoot + int64(i)})
		h.startAgent(3)
		others = append(others, h)
	}

	c.waitFinal(others...)
	checkOneBootstrap(t, c, others[0])

	// Partitioned for several more rounds: it waits for a quorum it cannot see.
	time.Sleep(3 * time.Second)

	if cut.final() || cut.acceptedBootstraps() != 0 {
		t.Fatal("the partitioned node left the waiting state")
	}

	cut.setLink(true)
	c.waitFinal(cut)

	if !cut.logHas(msgEtcdExists) || cut.acceptedBootstraps() != 0 {
		t.Fatal("the healed node did not see the existing etcd")
	}

	checkOneBootstrap(t, c, others[0])
}

// TestHostFromAnotherCAIsIgnored adds a Talos node from another cluster, with
// the earliest boot time: it is logged and ignored, and not counted.
func TestHostFromAnotherCAIsIgnored(t *testing.T) {
	c := newCluster(t)

	otherDir := t.TempDir()

	other, err := talosfake.NewPKI("other")
	if err != nil {
		t.Fatal(err)
	}

	if err := other.Write(otherDir); err != nil {
		t.Fatal(err)
	}

	rogue := c.addHost()
	rogue.startFake(fakeOptions{bootTime: baseBoot - 500, pkiDir: otherDir})

	var hosts []*host

	for i := range 3 {
		h := c.addHost()
		h.startFake(fakeOptions{bootTime: baseBoot + int64(i)})
		h.startAgent(3)
		hosts = append(hosts, h)
	}

	c.waitFinal(hosts...)
	checkOneBootstrap(t, c, hosts[0])

	if rogue.acceptedBootstraps() != 0 {
		t.Fatal("the host from another CA was bootstrapped")
	}

	for _, h := range hosts {
		if !h.logHas(msgUnverified) || !strings.Contains(readFile(h.agentLog()), rogue.addr.String()) {
			t.Fatalf("agent on %s did not log the unverified host %s", h.addr, rogue.addr)
		}
	}
}

// TestPublicCIDRIsRefused starts the agent with a public range: it exits with
// a usage error that says why, before sending any packet.
func TestPublicCIDRIsRefused(t *testing.T) {
	c := newCluster(t)
	h := c.addHost()

	txBefore := txPackets(t, h)

	env := h.agentEnv(3)
	for i, e := range env {
		if strings.HasPrefix(e, "KOMMODITY_AUTOBOOTSTRAP_NETWORK_CIDR=") {
			env[i] = "KOMMODITY_AUTOBOOTSTRAP_NETWORK_CIDR=203.0.113.0/24"
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	_, stderr, err := runIn(ctx, h.ns, env, testutil.Bin(t, "sovra-agent"), "run")
	if err == nil {
		t.Fatal("the agent accepted a public CIDR")
	}

	if !strings.Contains(string(stderr), "203.0.113.0/24 is not a private range") {
		t.Fatalf("unclear refusal:\n%s", stderr)
	}

	if tx := txPackets(t, h); tx != txBefore {
		t.Fatalf("the refused agent sent %d packets", tx-txBefore)
	}
}

func txPackets(t *testing.T, h *host) int {
	t.Helper()

	out, _, err := runIn(context.Background(), h.ns, nil, "cat", "/sys/class/net/eth0/statistics/tx_packets")
	if err != nil {
		t.Fatal(err)
	}

	n, err := strconv.Atoi(strings.TrimSpace(string(out)))
	if err != nil {
		t.Fatal(err)
	}

	return n
}
