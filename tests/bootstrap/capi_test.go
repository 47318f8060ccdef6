package bootstrap

import (
	"encoding/base64"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/internal/testutil"
	"github.com/sovra-dev/sovra/tests/capi/testinfra"
	"github.com/sovra-dev/sovra/tests/sovradtest"
	"github.com/sovra-dev/sovra/tests/swtpmlab"
	"github.com/sovra-dev/sovra/tests/talosfake"
)

// The Cluster API stories' constants.
const (
	capiNamespace = "fence"
	capiTCP       = storyCluster + "-control-plane"
	// capiWait bounds every wait on the controllers: CACPPT creates one
	// Machine per reconcile and retries a refused bootstrap after 20 s.
	capiWait = 3 * time.Minute
	// fencedMsg starts the error CACPPT gets from the fence (daemon/capi/fence).
	fencedMsg = "sovra bootstrap fence: "
)

// capiStory is the daemon with Cluster API and the bootstrap fence, a
// cluster's CAPI objects, and three hosts whose fake Talos nodes carry the
// Talos CA that the bootstrap provider generated for the cluster, so that
// CACPPT reaches them with its own talosconfig. CACPPT would bootstrap
// hosts[0] (the lowest address); the agents would elect hosts[1] (the
// earliest boot time).
type capiStory struct {
	t        *testing.T
	c        *cluster
	d        *sovradtest.Daemon
	lab      *swtpmlab.Lab
	hosts    []*host
	endpoint string
	dataDir  string
}

func newCAPIStory(t *testing.T, daemonArgs ...string) *capiStory {
	testutil.Require(t, "swtpm", "swtpm_setup", "swtpm_localca")
	s := &capiStory{t: t, c: newCluster(t)}
	leg := s.c.addLeg()
	s.lab = swtpmlab.New(t, 3, leg)
	s.dataDir = filepath.Join(t.TempDir(), "data")
	s.endpoint = net.JoinHostPort(leg, strconv.Itoa(testutil.FreePort(t)))
	s.d = sovradtest.Start(t, s.dataDir, append([]string{
		"--node-listen", s.endpoint, "--tls-san", leg,
		"--ek-roots", s.lab.Roots(), "--ek-intermediates", s.lab.Intermediates(),
	}, daemonArgs...)...)
	s.d.WaitEstablished("clusters.cluster.x-k8s.io", "machines.cluster.x-k8s.io",
		"taloscontrolplanes.controlplane.cluster.x-k8s.io", "talosconfigs.bootstrap.cluster.x-k8s.io")
	testinfra.Start(t, s.d)
	// A user's cluster: three control-plane machines, no workers.
	s.apply(testinfra.ClusterYAML(capiNamespace, storyCluster, 3, 0))

	// The fake nodes and the agents trust the cluster's own Talos CA.
	bundle := s.waitFor("the bootstrap provider's secrets bundle", func() (string, bool) {
		out, err := s.d.TryKubectl("-n", capiNamespace, "get", "secret", storyCluster+"-talos", "-o", "jsonpath={.data.bundle}")
		return out, err == nil && out != ""
	})
	raw, err := base64.StdEncoding.DecodeString(bundle)
	if err != nil {
		t.Fatal(err)
	}
	pki, err := talosfake.PKIFromBundle(storyCluster, raw)
	if err != nil {
		t.Fatal(err)
	}
	if err := pki.Write(s.c.dir); err != nil {
		t.Fatal(err)
	}

	boots := []int64{baseBoot + 2, baseBoot, baseBoot + 1}
	for i := range 3 {
		h := s.c.addHost()
		h.startFake(fakeOptions{bootTime: boots[i]})
		s.hosts = append(s.hosts, h)
	}
	return s
}

// apply applies manifest, retrying while the webhooks are being
// registered.
func (s *capiStory) apply(manifest string) {
	f := filepath.Join(s.t.TempDir(), "manifest.yaml")
	if err := os.WriteFile(f, []byte(manifest), 0o600); err != nil {
		s.t.Fatal(err)
	}
	s.waitFor("kubectl apply", func() (string, bool) {
		out, err := s.d.TryKubectl("apply", "-f", f)
		return out, err == nil
	})
}

// waitFor polls get until it reports done and returns its last value.
func (s *capiStory) waitFor(what string, get func() (string, bool)) string {
	s.t.Helper()
	deadline := time.Now().Add(capiWait)
	for {
		v, done := get()
		if done {
			return v
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("timed out waiting for %s (last: %q)\ndaemon log:\n%s", what, v, s.d.Tail(60))
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// giveAddresses waits for the three control-plane machines and gives each
// one host's address, as an infrastructure provider does once the machine
// has booted; CACPPT may try to bootstrap from then on.
func (s *capiStory) giveAddresses() {
	names := strings.Fields(s.waitFor("three control-plane machines", func() (string, bool) {
		out, _ := s.d.TryKubectl("-n", capiNamespace, "get", "sovratestmachines", "-o", "jsonpath={.items[*].metadata.name}")
		return out, len(strings.Fields(out)) == 3
	}))
	slices.Sort(names)
	for i, name := range names {
		s.d.Kubectl("-n", capiNamespace, "patch", "sovratestmachine", name, "--type", "merge", "-p",
			fmt.Sprintf(`{"status":{"addresses":[{"type":"InternalIP","address":%q}]}}`, s.hosts[i].addr))
	}
	s.waitFor("the Machines' addresses", func() (string, bool) {
		out, _ := s.d.TryKubectl("-n", capiNamespace, "get", "machines", "-o", "jsonpath={.items[*].status.addresses[0].address}")
		return out, len(strings.Fields(out)) == 3
	})
}

// startAgents starts the real agent on every host, in daemon mode, and
// returns the names of their SovraNodes once all three are attested.
func (s *capiStory) startAgents() []string {
	for i, h := range s.hosts {
		h.startAgentEnv(h.daemonAgentEnv(s.endpoint, s.dataDir, s.lab.TPMs[i]))
	}
	return waitAttested(s.t, s.d, s.c, len(s.hosts))
}

// tcp returns a jsonpath of the TalosControlPlane.
func (s *capiStory) tcp(path string) string {
	out, _ := s.d.TryKubectl("-n", capiNamespace, "get", "taloscontrolplane", capiTCP, "-o", "jsonpath="+path)
	return out
}

// bootstrapCalls counts every Bootstrap call a host's fake got, accepted or
// answered AlreadyExists.
func bootstrapCalls(h *host) int {
	return strings.Count(readFile(filepath.Join(h.dir, talosfake.BootstrapLogFile)), "\n")
}

// checkOnlyOn asserts that exactly one node was bootstrapped cluster-wide,
// want, and that no other node got a Bootstrap call at all.
func (s *capiStory) checkOnlyOn(want *host) {
	s.t.Helper()
	if n := s.c.bootstraps(); n != 1 || want.acceptedBootstraps() != 1 {
		s.t.Fatalf("accepted Bootstraps cluster-wide = %d (on %s: %d), want exactly 1 on %s", n, want.addr, want.acceptedBootstraps(), want.addr)
	}
	for _, h := range s.hosts {
		if h != want && bootstrapCalls(h) != 0 {
			s.t.Fatalf("%s got %d Bootstrap calls, want none:\n%s", h.addr, bootstrapCalls(h), readFile(filepath.Join(h.dir, talosfake.BootstrapLogFile)))
		}
	}
}

func (s *capiStory) logState() {
	s.t.Logf("kubectl get taloscontrolplane:\n%s", s.d.Kubectl("-n", capiNamespace, "get", "taloscontrolplane"))
	s.t.Logf("bootstrap lease: %v", storyLease(s.d))
	s.t.Logf("events on the control plane:\n%s", s.d.Kubectl("-n", capiNamespace, "get", "events",
		"--field-selector", "involvedObject.kind=TalosControlPlane", "--sort-by", ".lastTimestamp",
		"-o", "custom-columns=REASON:.reason,MESSAGE:.message"))
}

// TestCAPIFenceAgentsWin: the real sovrad with Cluster API (CACPPT behind
// the bootstrap fence) and three real agents. CACPPT is ready to bootstrap
// the lowest address while the agents still wait for their third peer; the
// fence keeps it from the nodes. Once the operator labels the third node,
// the agents elect and bootstrap the earliest-booted node, the fence marks
// the control plane bootstrapped, and CACPPT never calls Bootstrap.
func TestCAPIFenceAgentsWin(t *testing.T) {
	s := newCAPIStory(t, "--bootstrap-grace", "10m")
	names := s.startAgents()
	labelNodes(s.d, names[:2]...) // two of three: no quorum yet

	s.giveAddresses()
	refused := s.waitFor("CACPPT to be fenced off", func() (string, bool) {
		msg := s.tcp(`{.status.conditions[?(@.type=="MachinesBootstrapped")].message}`)
		return msg, strings.Contains(msg, fencedMsg) || s.c.bootstraps() > 0
	})
	t.Logf("CACPPT's MachinesBootstrapped condition while fenced: %s", refused)
	if n := s.c.bootstraps(); n != 0 {
		t.Fatalf("%d Bootstrap(s) before the agents had quorum", n)
	}

	labelled := time.Now()
	labelNodes(s.d, names[2])
	s.c.waitFinal(s.hosts...)
	s.waitFor("the fence to mark the control plane bootstrapped", func() (string, bool) {
		v := s.tcp("{.status.bootstrapped}")
		return v, v == "true"
	})
	t.Logf("from the third label to the control plane marked bootstrapped: %s", time.Since(labelled).Round(time.Millisecond))

	// CACPPT retries a refused bootstrap after 20 s: give it the chance.
	time.Sleep(25 * time.Second)
	leader := s.hosts[1]
	s.checkOnlyOn(leader)
	if l := storyLease(s.d); len(l) != 3 || !strings.HasPrefix(l[0], "ek-") || l[1] != leader.addr.String() || l[2] != "Bootstrapped" {
		t.Fatalf("lease = %v, want an agent's at %s, Bootstrapped", l, leader.addr)
	}
	if got := s.tcp(`{.status.conditions[?(@.type=="MachinesBootstrapped")].status}`); got != "True" {
		t.Fatalf("MachinesBootstrapped = %q, want True", got)
	}
	if ev := s.d.Kubectl("-n", capiNamespace, "get", "events", "--field-selector", "reason=BootstrappedBySovraAgent", "-o", "name"); ev == "" {
		t.Fatal("no BootstrappedBySovraAgent event on the control plane")
	}
	s.logState()
}

// TestCAPIFenceProviderWins: no SovraNode is labelled with the cluster when
// CACPPT is ready, so the fence commits the bootstrap lease to CACPPT's
// target and CACPPT bootstraps it through the gate, reaching every node
// through apid-style proxying. Agents that come later, and would elect
// another node, are denied the lease and find etcd instead.
func TestCAPIFenceProviderWins(t *testing.T) {
	s := newCAPIStory(t)
	s.giveAddresses()
	target := s.hosts[0]
	s.waitFor("CACPPT to bootstrap", func() (string, bool) {
		v := s.tcp("{.status.bootstrapped}")
		return v, v == "true"
	})
	s.waitFor("the lease to be final", func() (string, bool) {
		l := storyLease(s.d)
		return strings.Join(l, " "), len(l) == 3 && l[2] == "Bootstrapped"
	})
	if l := storyLease(s.d); l[0] != "taloscontrolplane/"+capiNamespace+"/"+capiTCP || l[1] != target.addr.String() {
		t.Fatalf("lease = %v, want the control plane's, at %s", l, target.addr)
	}

	names := s.startAgents()
	labelNodes(s.d, names...)
	s.c.waitFinal(s.hosts...)
	s.checkOnlyOn(target)
	for _, h := range s.hosts {
		if h.logHas(msgLeaseCommitted) {
			t.Fatalf("agent on %s committed to bootstrap after the provider did", h.addr)
		}
	}
	s.logState()

	// Deleting the cluster deletes its lease: a cluster created again under
	// the same name is not fenced off by the old one.
	s.d.Kubectl("-n", capiNamespace, "delete", "cluster", storyCluster, "--wait=false")
	s.waitFor("the lease to go with the cluster", func() (string, bool) {
		out, err := s.d.TryKubectl("-n", "sovra-system", "get", "lease", "bootstrap-"+storyCluster)
		return out, err != nil && strings.Contains(err.Error(), "NotFound")
	})
}
