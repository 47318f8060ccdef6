package machines

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/tests/swtpmlab"
	"github.com/sovra-dev/sovra/tests/talosfake/bootsim"
)

// adoptionWait bounds the wait for the KMS's adoption of the pending
// records of the enrollment-configuration fetches.
const adoptionWait = 2 * time.Minute

// The pool steps that the story and the benchmarks share: boot machines
// on the enrollment configuration until each is an attested host, then
// accept them with kubectl.

// bootPool starts count machines (numbers 0..count-1) on talos.config= as
// `sovrad hosts boot-config` prints it, each with its TPM of lab, and waits
// until every one runs the enrollment configuration, enrolled, attested,
// and its pending record was adopted. A run whose pending records are not
// adopted is a skip that names the known defect, as in the story.
func bootPool(t testing.TB, n *network, d *daemon, lab *swtpmlab.Lab, count int) []*machine {
	t.Helper()

	url := d.bootArgument(t)
	off := d.LogSize()

	var ms []*machine
	for i := range count {
		ms = append(ms, startMachine(t, n, d, lab.TPMs[i], i, url))
	}

	for _, m := range ms {
		m.WaitPhase(1, bootsim.PhaseRunning, bootTimeout)
	}

	waitFor(t, enrollTimeout, "every machine enrolled and attested", func() (bool, string) {
		var got []string

		for _, rec := range d.nodes(t) {
			if rec.Metadata.Labels["kms.sovra.dev/lab-pending"] == "" && rec.Status.LastAttestationResult == "Passed" &&
				slices.ContainsFunc(ms, func(m *machine) bool { return m.UUID == rec.Spec.UUID }) {
				got = append(got, rec.Spec.UUID)
			}
		}

		return len(got) == count, fmt.Sprintf("attested: %v", got)
	})

	deadline := time.Now().Add(adoptionWait)

	for {
		var left []string

		for _, rec := range d.nodes(t) {
			if rec.Metadata.Labels["kms.sovra.dev/lab-pending"] != "" {
				left = append(left, rec.Metadata.Name)
			}
		}

		if len(left) == 0 {
			return ms
		}

		if time.Now().After(deadline) {
			t.Fatalf("pending records not adopted within %s of enrollment: %v\n%s", adoptionWait, left, adoptionReport(t, d, ms, off))
		}

		time.Sleep(pollInterval)
	}
}

// acceptPool waits for a Pending host of every machine, accepts each with
// kubectl, and waits until all are Available. It returns the host name of
// each machine's UUID.
func acceptPool(t testing.TB, d *daemon, ms []*machine) map[string]string {
	t.Helper()

	hostOf := map[string]string{}

	waitFor(t, enrollTimeout, "a Pending host for every machine", func() (bool, string) {
		hs := d.hosts(t)

		for _, h := range hs {
			if h.Status.Phase == "Pending" && slices.ContainsFunc(ms, func(m *machine) bool { return m.UUID == h.Status.UUID }) {
				hostOf[h.Status.UUID] = h.Metadata.Name
			}
		}

		return len(hostOf) == len(ms), phases(hs)
	})

	for _, m := range ms {
		d.Kubectl("patch", "host", hostOf[m.UUID], "--type", "merge", "-p", `{"spec":{"accepted":true}}`)
	}

	waitFor(t, enrollTimeout, "every host Available", func() (bool, string) {
		hs := d.hosts(t)
		available := 0

		for _, h := range hs {
			if h.Status.Phase == "Available" && hostOf[h.Status.UUID] == h.Metadata.Name {
				available++
			}
		}

		return available == len(ms), phases(hs)
	})

	return hostOf
}

// adoptionReport says, for a run whose pending records were not adopted,
// what each record holds and what sovrad logged since off about the
// records and the machines ms: what the next look at the defect needs.
func adoptionReport(t testing.TB, d *daemon, ms []*machine, off int64) string {
	var b strings.Builder
	for _, n := range d.nodes(t) {
		fmt.Fprintf(&b, "record %s uuid=%s labels=%v salt=%t uid=%s\n", n.Metadata.Name, n.Spec.UUID, n.Metadata.Labels, len(n.Status.KeySalt) > 0, n.Metadata.UID)
	}
	lines := 0
	for _, l := range strings.Split(d.LogSince(off), "\n") {
		about := strings.Contains(l, "lab record") || strings.Contains(l, "pending") || strings.Contains(l, "sweeping") ||
			slices.ContainsFunc(ms, func(m *machine) bool { return strings.Contains(l, m.UUID) && !strings.Contains(l, "kms decision") })
		if about && lines < 60 {
			b.WriteString(l + "\n")
			lines++
		}
	}
	return b.String()
}

// controlPlaneHosts is the operator's load balancer pool: the addresses of
// the hosts that control-plane Machines of the cluster claimed.
func controlPlaneHosts(hs []host, ms []*machine) []netip.Addr {
	var pool []netip.Addr
	for _, h := range hs {
		if !strings.HasPrefix(h.Status.Machine, clusterNS+"/"+clusterName+"-control-plane-") {
			continue
		}
		if i := slices.IndexFunc(ms, func(m *machine) bool { return m.UUID == h.Status.UUID }); i >= 0 {
			pool = append(pool, ms[i].addr)
		}
	}
	return pool
}

// dumpParties logs what each party said (the machines ms, sovrad, the
// hosts), when t failed.
func dumpParties(t testing.TB, d *daemon, ms []*machine) {
	if !t.Failed() {
		return
	}

	for _, m := range ms {
		st := m.Status()
		t.Logf("=== machine %s (%s) %+v\n%s\n--- agent, boot %d:\n%s", m.UUID, m.addr, st, m.Tail(25), st.Boot, tail(m.agentLog(st.Boot), 25))
	}

	t.Logf("=== sovrad:\n%s", d.Tail(60))
	t.Logf("=== hosts:\n%s", d.jsonpath("get", "hosts.sovra.dev", "-o", "wide"))
}
