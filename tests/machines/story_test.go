package machines

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/config/configloader"
	"github.com/siderolabs/talos/pkg/machinery/constants"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sovra-dev/sovra/internal/hostapi"
	"github.com/sovra-dev/sovra/internal/testutil"
	"github.com/sovra-dev/sovra/tests/swtpmlab"
	"github.com/sovra-dev/sovra/tests/talosfake/bootsim"
)

const (
	// hostCount machines for images/example-cluster.yaml: three control
	// planes and two workers, so that the host a scale-down releases is
	// the only one a scale-up can claim.
	hostCount     = 5
	controlPlanes = 3
	// exampleCluster is the example the docs give, applied unchanged but
	// for its control-plane endpoint (exampleEndpoint, in the endpoint and
	// the control planes' certSANs), which becomes the address of the
	// test's load balancer in front of the control planes.
	exampleCluster  = "images/example-cluster.yaml"
	exampleEndpoint = "10.0.0.10"
	lbHost          = 200
	// labelCluster puts a SovraNode in a cluster (membership.LabelCluster).
	labelCluster = "sovra.dev/cluster"
	// controlPlaneLabel marks the Machines of a control plane (CAPI).
	controlPlaneLabel = "cluster.x-k8s.io/control-plane"
	// clusterNS and clusterName name the example's Cluster.
	clusterNS   = "prod"
	clusterName = "prod"
	workers     = clusterName + "-workers"
	// Bounds of the waits (two cores shared with other work).
	bootTimeout     = 3 * time.Minute
	enrollTimeout   = 4 * time.Minute
	provisionWait   = 8 * time.Minute
	releaseWait     = 5 * time.Minute
	bootstrapWait   = 3 * time.Minute
	sovradLogMarker = "enrollment configuration served"
	// bootstrapGrace is the story's --bootstrap-grace (the default): how
	// long the fence keeps CACPPT from bootstrapping once the control
	// plane's Machines have addresses, while their SovraNodes are labelled
	// with the cluster. agentBootstrapBound, well under it, bounds the
	// time from `kubectl apply` to the agents' bootstrap.
	bootstrapGrace      = 5 * time.Minute
	agentBootstrapBound = 150 * time.Second
	fenceWait           = 30 * time.Second
	// Reasons of the bootstrap fence's events on the TalosControlPlane.
	reasonAgentBootstrapped    = "BootstrappedBySovraAgent"
	reasonProviderBootstrapped = "BootstrapLeaseFinal"
	reasonProviderLease        = "BootstrapLeaseCommitted"
	// msgFormatting is the simulator's line of a volume's creation (its
	// KMS Seal).
	msgFormatting = "formatting and encrypting volume"
	// msgBootstrapped and msgBootstrapRefused are the simulator's lines
	// of an etcd bootstrap through the Talos API, and of a refused one.
	msgBootstrapped     = "Bootstrap accepted: etcd bootstrapping"
	msgBootstrapRefused = "Bootstrap refused: etcd data directory is not empty"
)

// clusterYAML is images/example-cluster.yaml with its control-plane
// endpoint (and the control planes' certSANs) at endpoint.
func clusterYAML(t testing.TB, endpoint string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(testutil.RepoRoot(t), exampleCluster))
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(b), exampleEndpoint); n != 2 {
		t.Fatalf("%s names %q %d times, want twice (the endpoint and the certSANs)", exampleCluster, exampleEndpoint, n)
	}
	return strings.ReplaceAll(string(b), exampleEndpoint, endpoint)
}

// story is the state the steps share.
type story struct {
	t        *testing.T
	net      *network
	d        *daemon
	machines []*machine
	// hostOf maps a machine's UUID to its host's name.
	hostOf map[string]string
	// attacker is a namespace on the bridge with no machine.
	attacker string
	timings  []string
	// applied is when the operator applied the Cluster.
	applied time.Time
}

func (s *story) timed(what string, start time.Time) {
	line := fmt.Sprintf("%-58s %s", what, time.Since(start).Round(100*time.Millisecond))
	s.timings = append(s.timings, line)
	s.t.Log(line)
}

func (s *story) byUUID(uuid string) *machine {
	for _, m := range s.machines {
		if m.UUID == uuid {
			return m
		}
	}

	s.t.Fatalf("no machine with UUID %s", uuid)

	return nil
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}

	return strings.Join(lines, "\n")
}

// TestMachinesStory is the machines story of issue 12 on the built sovrad
// (SQLite, --kms-bind-addresses) and five simulated Talos machines, each
// in its own network namespace with its own swtpm and the real sovra-agent:
//
//  1. the machines boot talos.config= (printed by `sovrad hosts
//     boot-config`), fetch the enrollment configuration, seal STATE and
//     EPHEMERAL with sovrad's KMS (the pending record of the fetch), and
//     the agents enroll and attest: the pending records are adopted;
//  2. they appear as hosts (Pending, hardware in status and labels); a
//     host that is not claimed gets no configuration; the operator accepts
//     them with kubectl: Available;
//  3. the operator applies images/example-cluster.yaml (three control
//     planes, a MachineDeployment of two workers) with kubectl: every
//     SovraMachine claims a distinct host, each host
//     receives exactly its own Machine's configuration (its bootstrap data
//     merged: compared field by field with the bootstrap Secret), applies
//     it, reboots, unseals STATE, attests the new boot, and is
//     Provisioned; the SovraMachines have providerID sovra://<host> and
//     the host's address; each claimed host's SovraNode is labelled
//     with the cluster; etcd is bootstrapped exactly once, by the agent of
//     the control plane its peers elected (not by CACPPT, whom the
//     bootstrap fence keeps waiting its grace), well within the grace, and
//     never again for the rest of the story;
//  4. attacks on a provisioned host: the enrollment configuration fetched
//     for its UUID from another address opens nothing (its STATE blob does
//     not unseal there, nothing Seals there); Syncs with a credential of
//     its earlier boot, of an earlier record, or naming another host's
//     record get nothing; neither the host nor its record changes;
//  5. the MachineDeployment is scaled to 1: one worker host is reset
//     through the Talos API, its old STATE blob no longer unseals, it boots
//     the enrollment configuration again and is Available; scaled to 2
//     again, the new Machine claims that same host and it is Provisioned.
func TestMachinesStory(t *testing.T) {
	testutil.Require(t, "swtpm", "swtpm_setup", "swtpm_localca")

	s := &story{t: t, net: newNetwork(t), hostOf: map[string]string{}}
	start := time.Now()
	lab := swtpmlab.New(t, hostCount, s.net.addr(legHost).String())
	// --kms-bind-addresses: the KMS answers a machine's UUID only from the
	// machine's own addresses (docs/security.md: without it, a copy of a
	// healthy machine's disk and its UUID unseal STATE from anywhere, and
	// anyone may Seal during a sealing window).
	s.d = startDaemon(t, s.net, lab, "--kms-bind-addresses", "--bootstrap-grace", bootstrapGrace.String())
	s.timed(fmt.Sprintf("sovrad ready, %d swtpm manufactured", hostCount), start)

	t.Cleanup(func() { dumpParties(t, s.d, s.machines) })

	s.attacker = s.net.addNamespace(attackerHost)

	s.enroll(lab)
	s.acceptHosts()
	cps, ws := s.provision()
	for _, m := range ws {
		workerAgentIsReader(t, m)
	}
	s.bootstrappedOnce(cps)
	s.bootstrappedByAgent(cps)
	s.attacks(ws[0])
	s.scaleDownAndUp(ws)
	s.bootstrappedOnce(cps)

	t.Logf("timings:\n%s", strings.Join(s.timings, "\n"))
}

// bootstrappedByAgent checks who bootstrapped etcd: a control plane's
// agent, from the machine itself (not sovrad's address, whence CACPPT
// calls), within agentBootstrapBound of the Cluster's apply, well under the
// fence's grace; the fence marked the TalosControlPlane bootstrapped by
// an agent and never committed the lease to CACPPT. Each claimed host's
// SovraNode carries the cluster's label (the provisioned agents' election
// needs it).
func (s *story) bootstrappedByAgent(cps []*machine) {
	t, d := s.t, s.d
	waitFor(t, agentBootstrapBound-time.Since(s.applied), "etcd bootstrapped within "+agentBootstrapBound.String()+" of kubectl apply", func() (bool, string) {
		for _, m := range cps {
			if len(m.Find(0, msgBootstrapped)) > 0 {
				return true, ""
			}
		}
		return false, "no bootstrap yet"
	})
	s.timed("kubectl apply -> etcd bootstrapped", s.applied)
	daemonAddr := s.net.addr(legHost).String()
	for _, m := range cps {
		for _, e := range m.Find(0, msgBootstrapped) {
			host, _, err := net.SplitHostPort(e.Str("client"))
			if err != nil || host == daemonAddr {
				t.Errorf("machine %.8s: Bootstrap called by %q, want its own agent, not sovrad (%s: CACPPT)", m.UUID, e.Str("client"), daemonAddr)
			}
		}
	}
	// The fence sees the agent's lease on its next look (DefaultPoll, 5s).
	var provider []string
	waitFor(t, fenceWait, "the fence's "+reasonAgentBootstrapped+" event on the TalosControlPlane", func() (bool, string) {
		var agent, reasons []string
		provider = nil
		for _, e := range d.allEvents(t) {
			if e.InvolvedObject.Kind != "TalosControlPlane" {
				continue
			}
			reasons = append(reasons, e.Reason)
			switch e.Reason {
			case reasonAgentBootstrapped:
				agent = append(agent, e.Message)
			case reasonProviderBootstrapped, reasonProviderLease:
				provider = append(provider, e.Reason+": "+e.Message)
			}
		}
		return len(agent) > 0, fmt.Sprint(reasons)
	})
	if len(provider) > 0 {
		t.Errorf("the fence committed the bootstrap lease to CACPPT: %q", provider)
	}
	for _, cm := range d.capiMachines(t, clusterNS) {
		var sm sovraMachine
		d.get(t, &sm, "-n", clusterNS, "sovramachine", cm.Spec.InfrastructureRef.Name)
		if got := d.jsonpath("get", "sovranodes.sovra.dev", sm.Status.HostRef.Name, `-o=jsonpath={.metadata.labels.sovra\.dev/cluster}`); got != clusterName {
			t.Errorf("the SovraNode of host %s (machine %s) has %s=%q, want %q", sm.Status.HostRef.Name, cm.Metadata.Name, labelCluster, got, clusterName)
		}
	}
}

// bootstrappedOnce waits for the control plane's etcd bootstrap and checks
// that exactly one machine, a control plane, accepted one, once.
func (s *story) bootstrappedOnce(cps []*machine) {
	t := s.t
	waitFor(t, bootstrapWait, "etcd bootstrapped on a control plane", func() (bool, string) {
		n := 0
		for _, m := range s.machines {
			n += len(m.Find(0, msgBootstrapped))
		}
		return n > 0, fmt.Sprintf("%d bootstraps", n)
	})
	var got []string
	for _, m := range s.machines {
		accepted, refused := len(m.Find(0, msgBootstrapped)), len(m.Find(0, msgBootstrapRefused))
		if accepted > 0 {
			got = append(got, fmt.Sprintf("%.8s x%d", m.UUID, accepted))
			if !slices.Contains(cps, m) {
				t.Errorf("machine %s, not a control plane, bootstrapped etcd", m.UUID)
			}
		}
		t.Logf("machine %.8s: %d Bootstrap accepted, %d refused", m.UUID, accepted, refused)
	}
	if len(got) != 1 || !strings.HasSuffix(got[0], " x1") {
		t.Fatalf("etcd bootstrapped %v, want exactly once", got)
	}
}

// enroll is step 1: boot, fetch, seal, enroll, attest.
func (s *story) enroll(lab *swtpmlab.Lab) {
	t, d := s.t, s.d
	url := d.bootArgument(t)

	if !strings.Contains(url, "${uuid}") || !strings.Contains(url, d.BootAddr) {
		t.Fatalf("sovrad hosts boot-config printed %q: want the boot server with ${uuid}", url)
	}

	start, off := time.Now(), d.LogSize()

	for i := range hostCount {
		s.machines = append(s.machines, startMachine(t, s.net, d, lab.TPMs[i], i, url))
	}

	for _, m := range s.machines {
		m.WaitPhase(1, bootsim.PhaseRunning, bootTimeout)

		// Created (Sealed) and opened with the KMS. (A first Unseal may be
		// refused while the KMS has not seen the Seal yet; Talos retries.)
		for _, label := range []string{"STATE", "EPHEMERAL"} {
			m.WaitLog(0, time.Second, msgFormatting, "volume="+label, "boot=1")
			m.WaitLog(0, time.Second, bootsim.MsgVolumeReady, "volume="+label, "boot=1", "encrypted=true")
		}

		if src := m.Status().ConfigSource; src != "metal" {
			t.Fatalf("machine %s runs a configuration from %q, want talos.config= (metal)", m.UUID, src)
		}

		// The fetch named the machine and admitted its first Seals.
		if log := d.LogSince(off); !strings.Contains(log, m.UUID) || !strings.Contains(log, sovradLogMarker) {
			t.Fatalf("sovrad did not log the enrollment-configuration fetch of %s", m.UUID)
		}
	}

	s.timed(fmt.Sprintf("%d machines booted the enrollment config, volumes sealed", hostCount), start)

	waitFor(t, enrollTimeout, "every machine enrolled and attested", func() (bool, string) {
		var got []string

		for _, n := range d.nodes(t) {
			if n.Metadata.Labels["kms.sovra.dev/lab-pending"] != "" {
				continue
			}

			if n.Status.LastAttestationResult == "Passed" && slices.ContainsFunc(s.machines, func(m *machine) bool { return m.UUID == n.Spec.UUID }) {
				got = append(got, n.Spec.UUID)
			}
		}

		return len(got) == hostCount, fmt.Sprintf("attested: %v", got)
	})

	// The pending records of the fetches are adopted by the enrollments (the
	// KMS's sweep does it, a moment after the enrollment). Known defect, open
	// in issue 12: after the component-identity merge the adoption sometimes
	// does not happen (one run in three here); the rest of the story needs
	// it, so such a run stops here, reported as a skip with the records left.
	deadline := time.Now().Add(2 * time.Minute)
	for {
		var left []string
		for _, n := range d.nodes(t) {
			if n.Metadata.Labels["kms.sovra.dev/lab-pending"] != "" {
				left = append(left, n.Metadata.Name)
			}
		}
		if len(left) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pending records not adopted within 2 minutes of enrollment: %v\n%s", left, adoptionReport(t, d, s.machines, off))
		}
		time.Sleep(pollInterval)
	}

	s.timed(fmt.Sprintf("%d machines enrolled and attested (pending records adopted)", hostCount), start)
}

// acceptHosts is step 2.
func (s *story) acceptHosts() {
	t, d := s.t, s.d
	start := time.Now()

	waitFor(t, enrollTimeout, "a Pending host for every machine", func() (bool, string) {
		hs := d.hosts(t)
		n := 0

		for _, h := range hs {
			if h.Status.Phase == "Pending" && !h.Spec.Accepted && slices.ContainsFunc(s.machines, func(m *machine) bool { return m.UUID == h.Status.UUID }) {
				n++
			}
		}

		return n == hostCount, phases(hs)
	})
	s.timed(fmt.Sprintf("%d hosts Pending", hostCount), start)

	for _, h := range d.hosts(t) {
		s.hostOf[h.Status.UUID] = h.Metadata.Name
		m := s.byUUID(h.Status.UUID)

		if h.Status.Hardware == nil || h.Status.Hardware.CPUs != machineCPUs || h.Status.Hardware.MemoryMiB != machineMemoryMiB {
			t.Errorf("host %s hardware %+v: want %d CPUs, %d MiB", h.Metadata.Name, h.Status.Hardware, machineCPUs, machineMemoryMiB)
		}

		want := map[string]string{"host.sovra.dev/arch": "amd64", "host.sovra.dev/cpus": "4", "host.sovra.dev/memory-gib": "8", "host.sovra.dev/disks": "1", "host.sovra.dev/disk-gib": "100"}
		for k, v := range want {
			if h.Metadata.Labels[k] != v {
				t.Errorf("host %s label %s=%q, want %q", h.Metadata.Name, k, h.Metadata.Labels[k], v)
			}
		}

		if !slices.Contains(h.Status.Addresses, m.addr.String()) {
			t.Errorf("host %s addresses %v: want the machine's %s", h.Metadata.Name, h.Status.Addresses, m.addr)
		}
	}

	// A host that is not claimed gets no configuration, whatever it asks.
	first := s.machines[0]
	name := s.hostOf[first.UUID]
	rec := d.nodeByName(t, name)
	resp, err := d.sync(t, first.ns, d.credential(t, name, rec.Metadata.UID, rec.currentBoot()),
		&hostapi.SyncRequest{Mode: hostapi.Mode_MODE_ENROLLMENT})
	if err != nil || resp.GetAction() != hostapi.Action_ACTION_WAIT || len(resp.GetConfig()) != 0 {
		t.Fatalf("Sync of an unclaimed, unaccepted host: %v %v; want WAIT with no configuration", resp, err)
	}

	// The operator accepts every host.
	start = time.Now()

	for _, m := range s.machines {
		d.Kubectl("patch", "host", s.hostOf[m.UUID], "--type", "merge", "-p", `{"spec":{"accepted":true}}`)
	}

	waitFor(t, enrollTimeout, "every host Available", func() (bool, string) {
		hs := d.hosts(t)
		n := 0

		for _, h := range hs {
			if h.Status.Phase == "Available" {
				n++
			}
		}

		return n == hostCount, phases(hs)
	})
	s.timed("hosts accepted with kubectl: Available", start)
	t.Logf("kubectl get hosts -o wide:\n%s", d.Kubectl("get", "hosts.sovra.dev", "-o", "wide"))
}

// provision is step 3; it returns the control-plane machines and the
// workers.
func (s *story) provision() (cps, ws []*machine) {
	t, d := s.t, s.d

	lb := s.net.newLoadBalancer(t, lbHost, constants.TrustdPort)

	manifest := filepath.Join(t.TempDir(), "cluster.yaml")
	if err := os.WriteFile(manifest, []byte(clusterYAML(t, lb.addr.String())), 0o600); err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	s.applied = start
	d.Kubectl("apply", "-f", manifest)

	waitFor(t, provisionWait, "every host Provisioned", func() (bool, string) {
		hs := d.hosts(t)
		n := 0

		for _, h := range hs {
			if h.Status.Phase == "Provisioned" {
				n++
			}
		}
		lb.setBackends(controlPlaneHosts(hs, s.machines))

		return n == hostCount, phases(hs)
	})
	s.timed("kubectl apply -> every host Provisioned", start)

	waitFor(t, 2*time.Minute, "every SovraMachine ready", func() (bool, string) {
		sms := d.sovraMachines(t, clusterNS)
		n := 0

		for _, sm := range sms {
			if sm.Status.Ready {
				n++
			}
		}

		return n == hostCount && len(sms) == hostCount, fmt.Sprintf("%d of %d ready", n, len(sms))
	})
	s.timed("kubectl apply -> every SovraMachine ready", start)

	s.checkProvisioned()

	// Which machine got which role: the Machines of the control plane
	// carry CAPI's control-plane label.
	for _, cm := range d.capiMachines(t, clusterNS) {
		var sm sovraMachine
		d.get(t, &sm, "-n", clusterNS, "sovramachine", cm.Spec.InfrastructureRef.Name)
		var h host
		d.get(t, &h, "host", sm.Status.HostRef.Name)
		m := s.byUUID(h.Status.UUID)
		if _, ok := cm.Metadata.Labels[controlPlaneLabel]; ok {
			cps = append(cps, m)
		} else {
			ws = append(ws, m)
		}
	}
	if len(cps) != controlPlanes || len(ws) != hostCount-controlPlanes {
		t.Fatalf("%d control planes and %d workers, want %d and %d", len(cps), len(ws), controlPlanes, hostCount-controlPlanes)
	}

	return cps, ws
}

// checkProvisioned checks every Machine of the cluster: a distinct host,
// providerID and addresses, the host's own configuration in its STATE, a
// new boot that unsealed STATE and attested.
func (s *story) checkProvisioned() {
	t, d := s.t, s.d

	sms := d.sovraMachines(t, clusterNS)
	byName := map[string]sovraMachine{}

	var claimed []string

	for _, sm := range sms {
		byName[sm.Metadata.Name] = sm

		if sm.Status.HostRef == nil {
			t.Fatalf("SovraMachine %s has no host", sm.Metadata.Name)
		}

		claimed = append(claimed, sm.Status.HostRef.Name)
	}

	if !distinct(claimed) {
		t.Fatalf("a host was claimed twice: %v", claimed)
	}

	for _, cm := range d.capiMachines(t, clusterNS) {
		sm, ok := byName[cm.Spec.InfrastructureRef.Name]
		if !ok {
			continue
		}

		hostName := sm.Status.HostRef.Name

		var h host
		d.get(t, &h, "host", hostName)

		m := s.byUUID(h.Status.UUID)

		if sm.Spec.ProviderID != "sovra://"+hostName {
			t.Errorf("SovraMachine %s providerID %q, want sovra://%s", sm.Metadata.Name, sm.Spec.ProviderID, hostName)
		}

		if len(sm.Status.Addresses) == 0 || sm.Status.Addresses[0].Address != m.addr.String() {
			t.Errorf("SovraMachine %s addresses %+v, want %s", sm.Metadata.Name, sm.Status.Addresses, m.addr)
		}

		if h.Status.Machine != clusterNS+"/"+sm.Metadata.Name || h.Status.Cluster != clusterName {
			t.Errorf("host %s shows machine %q cluster %q", hostName, h.Status.Machine, h.Status.Cluster)
		}

		if cm.Status.Phase != "Provisioned" && cm.Status.Phase != "Running" {
			t.Errorf("Machine %s is %s, want Provisioned", cm.Metadata.Name, cm.Status.Phase)
		}

		checkConfig(t, m, hostName, d.bootstrapData(t, clusterNS, cm))
		s.checkRebooted(m, hostName)
	}
}

// checkConfig compares the configuration the machine runs (in its STATE)
// with its Machine's bootstrap data: the same cluster, identity and role,
// plus what sovra adds.
func checkConfig(t testing.TB, m *machine, hostName string, bootstrap []byte) {
	t.Helper()

	running, err := configloader.NewFromBytes(m.StoredConfig())
	if err != nil {
		t.Fatalf("the configuration in STATE of %s does not load: %v", m.UUID, err)
	}

	want, err := configloader.NewFromBytes(bootstrap)
	if err != nil {
		t.Fatalf("bootstrap data: %v", err)
	}

	r, w := running.RawV1Alpha1(), want.RawV1Alpha1()
	if r == nil || w == nil {
		t.Fatalf("machine %s: no v1alpha1 document", m.UUID)
	}

	checks := map[string][2]string{
		"machine type":         {r.MachineConfig.MachineType, w.MachineConfig.MachineType},
		"machine token":        {r.MachineConfig.MachineToken, w.MachineConfig.MachineToken},
		"machine CA":           {string(r.MachineConfig.MachineCA.Crt), string(w.MachineConfig.MachineCA.Crt)},
		"cluster ID":           {r.ClusterConfig.ClusterID, w.ClusterConfig.ClusterID},
		"cluster secret":       {r.ClusterConfig.ClusterSecret, w.ClusterConfig.ClusterSecret},
		"cluster name":         {r.ClusterConfig.ClusterName, w.ClusterConfig.ClusterName},
		"control-plane url":    {running.Cluster().Endpoint().String(), want.Cluster().Endpoint().String()},
		"kubernetes CA":        {string(r.ClusterConfig.ClusterCA.Crt), string(w.ClusterConfig.ClusterCA.Crt)},
		"kubelet provider ID":  {strings.Join(running.Machine().Kubelet().ExtraArgs()["provider-id"], ","), "sovra://" + hostName},
		"bootstrap token":      {r.ClusterConfig.BootstrapToken, w.ClusterConfig.BootstrapToken},
		"kubernetes version":   {r.MachineConfig.MachineKubelet.KubeletImage, w.MachineConfig.MachineKubelet.KubeletImage},
		"agent service config": {fmt.Sprint(len(running.ExtensionServiceConfigs())), "1"},
	}

	for what, c := range checks {
		if c[0] != c[1] {
			t.Errorf("machine %s runs %s %.60q, want its bootstrap data's %.60q", m.UUID, what, c[0], c[1])
		}
	}

	// sovra's documents: the KMS for both system volumes, the daemon CA.
	for _, label := range []string{"STATE", "EPHEMERAL"} {
		vc, ok := running.Volumes().ByName(label)
		if !ok || vc.Encryption() == nil || len(vc.Encryption().Keys()) == 0 || vc.Encryption().Keys()[0].KMS() == nil {
			t.Errorf("machine %s: %s is not encrypted with the KMS in the configuration it runs", m.UUID, label)
		}
	}

	if env := strings.Join(running.ExtensionServiceConfigs()[0].Environment(), " "); !strings.Contains(env, "SOVRA_HOST_GENERATION=") {
		t.Errorf("machine %s: the agent's configuration has no generation: %s", m.UUID, env)
	}
}

// checkRebooted: the machine rebooted into the configuration, STATE was
// unsealed (not sealed) in the new boot, and its record attested that
// boot.
func (s *story) checkRebooted(m *machine, hostName string) {
	t, d := s.t, s.d
	st := m.Status()

	if st.Boot < 2 || st.ConfigSource != "state" || st.Phase != bootsim.PhaseRunning {
		t.Fatalf("machine %s: %+v, want a later boot running the configuration in STATE", m.UUID, st)
	}

	if len(m.Find(0, bootsim.MsgUnsealed, "volume=STATE", fmt.Sprintf("boot=%d", st.Boot))) != 1 ||
		len(m.Find(0, bootsim.MsgSealed, fmt.Sprintf("boot=%d", st.Boot))) != 0 {
		t.Fatalf("machine %s boot %d did not unseal its STATE (or sealed anew)", m.UUID, st.Boot)
	}

	waitFor(t, time.Minute, "the record of "+hostName+" to show the new boot", func() (bool, string) {
		rec := d.nodeByName(t, hostName)

		return rec.currentBoot() == st.BootID && rec.Status.LastAttestationResult == "Passed",
			fmt.Sprintf("record boot %s %s, machine boot %s", rec.currentBoot(), rec.Status.LastAttestationResult, st.BootID)
	})
}

// attacks is step 4, on the provisioned worker m.
func (s *story) attacks(m *machine) {
	t, d := s.t, s.d
	name := s.hostOf[m.UUID]

	var before host
	d.get(t, &before, "host", name)

	rec := d.nodeByName(t, name)

	t.Run("enrollment config fetched for a claimed UUID opens nothing", func(t *testing.T) {
		off := d.LogSize()
		sealing := rec.sealing()

		code, body := d.fetchBootConfig(t, s.attacker, m.UUID)
		if code != 200 || len(body) == 0 {
			t.Fatalf("the enrollment configuration was not served: %d", code)
		}

		if log := d.LogSince(off); !strings.Contains(log, m.UUID) || !strings.Contains(log, `"sealing":"Known"`) {
			t.Fatalf("the fetch for a claimed UUID was not logged as one for a known machine:\n%s", log)
		}

		if after := d.nodeByName(t, name).sealing(); after != sealing {
			t.Fatalf("the fetch changed the record's sealing: %s -> %s", sealing, after)
		}

		if _, err := d.kms(t, s.attacker, false, m.UUID, m.stateBlob(t)); err == nil {
			t.Fatal("the machine's STATE blob was unsealed for another address")
		}

		for _, n := range d.nodes(t) {
			if n.Spec.UUID == m.UUID && n.Metadata.Name != name {
				t.Fatalf("a second record %s for the claimed UUID", n.Metadata.Name)
			}
		}
	})

	t.Run("Seal for a provisioned host from another address is refused", func(t *testing.T) {
		if _, err := d.kms(t, s.attacker, true, m.UUID, []byte("attacker's volume key")); status.Code(err) != codes.PermissionDenied {
			t.Fatalf("Seal for a claimed UUID from another address: %v, want PermissionDenied (record sealing %s)", err, d.nodeByName(t, name).sealing())
		}
	})

	t.Run("credential of an earlier boot gets no configuration", func(t *testing.T) {
		earlier := ""
		for _, b := range rec.Status.Boots[1:] {
			earlier = b.ID
		}

		if earlier == "" {
			t.Fatal("the record knows no earlier boot")
		}

		resp, err := d.sync(t, m.ns, d.credential(t, name, rec.Metadata.UID, earlier), &hostapi.SyncRequest{Mode: hostapi.Mode_MODE_ENROLLMENT})
		if status.Code(err) != codes.PermissionDenied || len(resp.GetConfig()) != 0 {
			t.Fatalf("Sync with a credential of boot %s: %v %v, want PermissionDenied", earlier, resp, err)
		}
	})

	t.Run("credential of an earlier record gets no configuration", func(t *testing.T) {
		resp, err := d.sync(t, m.ns, d.credential(t, name, "4f1d0c3e-0000-4000-8000-000000000000", rec.currentBoot()), &hostapi.SyncRequest{Mode: hostapi.Mode_MODE_ENROLLMENT})
		if c := status.Code(err); (c != codes.PermissionDenied && c != codes.Unauthenticated) || len(resp.GetConfig()) != 0 {
			t.Fatalf("Sync with a credential of another record instance: %v %v, want refused", resp, err)
		}
	})

	t.Run("another host's record with this host's boot gets nothing", func(t *testing.T) {
		// A credential naming another host's record and this worker's
		// boot, from this worker's address.
		i := slices.IndexFunc(s.machines, func(o *machine) bool { return o != m })
		other := s.hostOf[s.machines[i].UUID]
		orec := d.nodeByName(t, other)

		resp, err := d.sync(t, m.ns, d.credential(t, other, orec.Metadata.UID, rec.currentBoot()), &hostapi.SyncRequest{Mode: hostapi.Mode_MODE_ENROLLMENT})
		if status.Code(err) != codes.PermissionDenied || len(resp.GetConfig()) != 0 {
			t.Fatalf("Sync with another host's record and this host's boot: %v %v, want PermissionDenied", resp, err)
		}
	})

	var after host
	d.get(t, &after, "host", name)

	// Nothing changed: the host's lastSync moves with its own agent's
	// Syncs, nothing else may.
	if after.Status.Phase != before.Status.Phase || after.Status.ReleasedGeneration != before.Status.ReleasedGeneration ||
		after.Status.RunningGeneration != before.Status.RunningGeneration || after.Status.Boot != before.Status.Boot ||
		after.Spec.ConsumerRef == nil || after.Spec.ConsumerRef.UID != before.Spec.ConsumerRef.UID {
		t.Fatalf("the attacks changed host %s: %+v -> %+v", name, before.Status, after.Status)
	}

	if rec2 := d.nodeByName(t, name); rec2.currentBoot() != rec.currentBoot() || !bytes.Equal(rec2.Status.KeySalt, rec.Status.KeySalt) {
		t.Fatalf("the attacks changed the record of %s", name)
	}
}

// scaleDownAndUp is step 5.
func (s *story) scaleDownAndUp(ws []*machine) {
	t, d := s.t, s.d

	blobs := map[string][]byte{}
	boots := map[string]int{}

	for _, m := range ws {
		blobs[m.UUID] = m.stateBlob(t)
		boots[m.UUID] = m.Status().Boot
	}

	start, off := time.Now(), d.LogSize()
	d.Kubectl("-n", clusterNS, "scale", "machinedeployment", workers, "--replicas=1")

	var released *machine

	waitFor(t, releaseWait, "a worker host to be released", func() (bool, string) {
		for _, m := range ws {
			h, _ := d.hostByUUID(t, m.UUID)
			if h.Spec.ConsumerRef == nil {
				released = m

				return true, ""
			}
		}

		return false, phases(d.hosts(t))
	})

	name := s.hostOf[released.UUID]
	resetBoot := boots[released.UUID] + 1
	released.WaitPhase(resetBoot, bootsim.PhaseRunning, releaseWait)

	if len(released.Find(0, bootsim.MsgWiped, "volume=STATE")) == 0 || len(released.Find(0, bootsim.MsgReset)) == 0 {
		t.Fatalf("the released machine was not reset with STATE wiped:\n%s", released.Tail(30))
	}

	if st := released.Status(); st.ConfigSource != "metal" {
		t.Fatalf("after the reset the machine runs a configuration from %q, want the enrollment configuration", st.ConfigSource)
	}

	waitFor(t, releaseWait, "the released host to be Available again", func() (bool, string) {
		var h host
		d.get(t, &h, "host", name)

		return h.Status.Phase == "Available" && h.Spec.ConsumerRef == nil, h.Status.Phase
	})
	s.timed("scale 2->1: host reset, wiped, re-attested, Available", start)

	// The worker's agent holds an os:reader certificate only: sovrad reset
	// it, with the cluster's talosconfig.
	if log := d.LogSince(off); !strings.Contains(log, "through the worker's Talos API") || !strings.Contains(log, name) {
		t.Fatalf("sovrad did not log its reset of worker %s through the Talos API:\n%s", name, tail(log, 20))
	}

	// The old tenancy's STATE blob opens no more, even from the machine's
	// own address; the new one does.
	if _, err := d.kms(t, released.ns, false, released.UUID, blobs[released.UUID]); err == nil {
		t.Fatal("the STATE blob of the released tenancy still unseals")
	}

	if bytes.Equal(released.stateBlob(t), blobs[released.UUID]) {
		t.Fatal("STATE was not re-created after the reset")
	}

	if _, err := d.kms(t, released.ns, false, released.UUID, released.stateBlob(t)); err != nil {
		t.Fatalf("the new STATE blob does not unseal for the machine: %v", err)
	}

	// Scale up: the only Available worker host is the released one.
	start = time.Now()
	d.Kubectl("-n", clusterNS, "scale", "machinedeployment", workers, "--replicas=2")

	waitFor(t, provisionWait, "the released host to be claimed and Provisioned again", func() (bool, string) {
		var h host
		d.get(t, &h, "host", name)

		return h.Status.Phase == "Provisioned" && h.Spec.ConsumerRef != nil, h.Status.Phase
	})
	s.timed("scale 1->2: the same host claimed and Provisioned", start)

	s.checkProvisioned()
	workerAgentIsReader(t, released)
}
