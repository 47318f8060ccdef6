package fence

import (
	"strings"
	"testing"
	"time"

	controlplanev1 "github.com/siderolabs/cluster-api-control-plane-provider-talos/api/v1alpha3"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	clusterv1 "sigs.k8s.io/cluster-api/api/v1beta1"

	"github.com/sovra-dev/sovra/daemon/membership"
)

func machine(addrs ...clusterv1.MachineAddress) clusterv1.Machine {
	return clusterv1.Machine{Status: clusterv1.MachineStatus{Addresses: addrs}}
}

func internal(a string) clusterv1.MachineAddress {
	return clusterv1.MachineAddress{Type: clusterv1.MachineInternalIP, Address: a}
}

func external(a string) clusterv1.MachineAddress {
	return clusterv1.MachineAddress{Type: clusterv1.MachineExternalIP, Address: a}
}

// TestTargetIsCACPPTsChoice: CACPPT takes each machine's InternalIP before
// its ExternalIP and bootstraps the lowest in string order (10.0.0.10 sorts
// before 10.0.0.9).
func TestTargetIsCACPPTsChoice(t *testing.T) {
	for _, tc := range []struct {
		name     string
		machines []clusterv1.Machine
		want     string
		ok       bool
	}{
		{"none", nil, "", false},
		{"string order", []clusterv1.Machine{machine(internal("10.0.0.9")), machine(internal("10.0.0.10"))}, "10.0.0.10", true},
		{"internal first", []clusterv1.Machine{machine(external("1.1.1.1"), internal("10.0.0.5")), machine(internal("10.0.0.7"))}, "10.0.0.5", true},
		{"external fallback", []clusterv1.Machine{machine(external("192.0.2.9")), machine(internal("192.0.2.10"))}, "192.0.2.10", true},
		{"one without address", []clusterv1.Machine{machine(internal("10.0.0.1")), machine()}, "", false},
		{"hostname only", []clusterv1.Machine{machine(clusterv1.MachineAddress{Type: clusterv1.MachineHostName, Address: "a"})}, "", false},
	} {
		got, ok := Target(tc.machines)
		if got != tc.want || ok != tc.ok {
			t.Errorf("%s: Target = %q, %v; want %q, %v", tc.name, got, ok, tc.want, tc.ok)
		}
	}
}

func TestClusterNameFromOwnerThenLabel(t *testing.T) {
	tcp := &controlplanev1.TalosControlPlane{ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{clusterv1.ClusterNameLabel: "from-label"}}}
	if got := ClusterName(tcp); got != "from-label" {
		t.Fatalf("ClusterName = %q, want the label", got)
	}
	tcp.OwnerReferences = []metav1.OwnerReference{
		{APIVersion: "infrastructure.cluster.x-k8s.io/v1", Kind: "Cluster", Name: "not-capi"},
		{APIVersion: "cluster.x-k8s.io/v1beta2", Kind: "Cluster", Name: "prod"},
	}
	if got := ClusterName(tcp); got != "prod" {
		t.Fatalf("ClusterName = %q, want the Cluster API owner prod", got)
	}
}

func committed(holder, addr string, phase membership.Phase) membership.LeaseState {
	return membership.LeaseState{Holder: holder, HolderAddress: addr, Phase: phase}
}

// TestGateAdmitsOnlyTheLeaseAddress: CACPPT reaches the nodes of an
// unbootstrapped cluster only when every Machine list it read in the
// reconcile leads to the address the lease is committed to.
func TestGateAdmitsOnlyTheLeaseAddress(t *testing.T) {
	agent := committed("ek-1", "10.0.0.11", membership.PhaseBootstrapping)
	for _, tc := range []struct {
		name    string
		tcps    int
		targets []string
		lease   membership.LeaseState
		found   bool
		admit   bool
		reason  string
	}{
		{"outside a reconcile", 0, []string{"10.0.0.11"}, agent, true, false, "outside"},
		{"no lease", 1, []string{"10.0.0.10"}, membership.LeaseState{}, false, false, "no agent or provider holds it"},
		{"held, not committed", 1, []string{"10.0.0.11"}, committed("ek-1", "10.0.0.11", membership.PhaseHeld), true, false, "holds the bootstrap lease"},
		{"committed elsewhere", 1, []string{"10.0.0.10"}, agent, true, false, `would bootstrap "10.0.0.10"`},
		{"one list differs", 1, []string{"10.0.0.11", "10.0.0.10"}, agent, true, false, "would bootstrap"},
		{"machine without address", 1, []string{""}, agent, true, false, "would bootstrap"},
		{"no machine list", 1, nil, agent, true, false, "no control-plane Machine list"},
		{"unknown phase", 1, []string{"10.0.0.11"}, committed("ek-1", "10.0.0.11", "Weird"), true, false, "unknown phase"},
		{"committed to the target", 1, []string{"10.0.0.11"}, agent, true, true, ""},
		{"bootstrapped at the target", 1, []string{"10.0.0.11", "10.0.0.11"}, committed("ek-1", "10.0.0.11", membership.PhaseBootstrapped), true, true, ""},
		{"provider's own lease", 1, []string{"10.0.0.10"}, committed("taloscontrolplane/default/cp", "10.0.0.10", membership.PhaseBootstrapping), true, true, ""},
	} {
		reason, ok := admits("prod", tc.tcps, tc.targets, tc.lease, tc.found)
		if ok != tc.admit || !strings.Contains(reason, tc.reason) {
			t.Errorf("%s: admits = %v %q; want %v, reason containing %q", tc.name, ok, reason, tc.admit, tc.reason)
		}
	}
}

// TestDecide walks the fence controller's transitions.
func TestDecide(t *testing.T) {
	now := time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)
	const poll = 5 * time.Second
	base := view{
		Cluster: "prod", Holder: "taloscontrolplane/default/cp", Target: "10.0.0.10", Ready: true,
		Now: now, ReadySince: now, Grace: time.Minute,
	}
	held := func(holder string, renewed time.Time) membership.LeaseState {
		return membership.LeaseState{Holder: holder, HolderAddress: "10.0.0.11", Phase: membership.PhaseHeld, Renewed: renewed, Duration: time.Minute}
	}
	for _, tc := range []struct {
		name  string
		edit  func(*view)
		act   action
		after time.Duration
	}{
		{"no agents: the provider at once", func(v *view) {}, actCommit, 0},
		{"agents within grace: wait for the grace", func(v *view) { v.Enrolled = 3; v.ReadySince = now.Add(-20 * time.Second) }, actWait, poll},
		{"agents near the end of grace", func(v *view) { v.Enrolled = 3; v.ReadySince = now.Add(-58 * time.Second) }, actWait, 2 * time.Second},
		{"asked to wait for agents", func(v *view) { v.WaitForAgents = true; v.ReadySince = now.Add(-20 * time.Second) }, actWait, poll},
		{"asked to wait, past grace", func(v *view) { v.WaitForAgents = true; v.ReadySince = now.Add(-time.Minute) }, actCommit, 0},
		{"agents past grace: the provider", func(v *view) { v.Enrolled = 3; v.ReadySince = now.Add(-time.Minute) }, actCommit, 0},
		{"not ready", func(v *view) { v.Ready = false }, actWait, poll},
		{"agent holds", func(v *view) { v.LeaseFound, v.Lease = true, held("ek-1", now.Add(-58*time.Second)) }, actWait, 2 * time.Second},
		{"agent's hold expired", func(v *view) { v.LeaseFound, v.Lease = true, held("ek-1", now.Add(-time.Minute)) }, actCommit, 0},
		{"our hold (crash between the steps)", func(v *view) { v.LeaseFound, v.Lease = true, held(v.Holder, now) }, actCommit, 0},
		{"agent bootstrapping", func(v *view) {
			v.LeaseFound, v.Lease = true, committed("ek-1", "10.0.0.11", membership.PhaseBootstrapping)
		}, actWait, poll},
		{"agent bootstrapped", func(v *view) {
			v.LeaseFound, v.Lease = true, committed("ek-1", "10.0.0.11", membership.PhaseBootstrapped)
		}, actMarkBootstrapped, 0},
		{"provider's turn", func(v *view) {
			v.LeaseFound, v.Lease = true, committed(v.Holder, "10.0.0.10", membership.PhaseBootstrapping)
		}, actWait, poll},
		{"provider bootstrapped", func(v *view) {
			v.Bootstrapped, v.LeaseFound, v.Lease = true, true, committed(v.Holder, "10.0.0.10", membership.PhaseBootstrapping)
		}, actFinish, 0},
		{"bootstrapped, final", func(v *view) {
			v.Bootstrapped, v.Marked, v.LeaseFound, v.Lease = true, true, true, committed("ek-1", "10.0.0.11", membership.PhaseBootstrapped)
		}, actWait, 0},
		{"bootstrapped, condition written back", func(v *view) {
			v.Bootstrapped, v.LeaseFound, v.Lease = true, true, committed("ek-1", "10.0.0.11", membership.PhaseBootstrapped)
		}, actMarkBootstrapped, 0},
		{"bootstrapped without a lease", func(v *view) { v.Bootstrapped = true }, actCommit, 0},
		{"bootstrapped, an agent holds", func(v *view) { v.Bootstrapped, v.LeaseFound, v.Lease = true, true, held("ek-1", now) }, actWait, time.Minute},
		{"init configs", func(v *view) { v.InitConfig, v.Ready = true, false }, actCommit, 0},
		{"init configs, leased", func(v *view) {
			v.InitConfig, v.LeaseFound, v.Lease = true, true, committed(v.Holder, "", membership.PhaseBootstrapping)
		}, actWait, 0},
	} {
		v := base
		tc.edit(&v)
		act, after, why := decide(v, poll)
		if act != tc.act || after != tc.after || why == "" {
			t.Errorf("%s: decide = %v, %s, %q; want %v, %s", tc.name, act, after, why, tc.act, tc.after)
		}
	}
}

// TestLastSaidLogsChangesOnly: a reason repeated on every retry is logged
// once; a new reason, or the same one after forget, again.
func TestLastSaidLogsChangesOnly(t *testing.T) {
	var l lastSaid[string]
	for i, tc := range []struct {
		key, reason string
		forget      bool
		want        bool
	}{
		{"prod", "waiting", false, true},
		{"prod", "waiting", false, false},
		{"edge", "waiting", false, true},
		{"prod", "committed elsewhere", false, true},
		{"prod", "committed elsewhere", true, true},
	} {
		if tc.forget {
			l.forget(tc.key)
		}
		if got := l.changed(tc.key, tc.reason); got != tc.want {
			t.Errorf("step %d: changed(%s, %q) = %v, want %v", i, tc.key, tc.reason, got, tc.want)
		}
	}
}
