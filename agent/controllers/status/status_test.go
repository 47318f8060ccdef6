package status_test

import (
	"context"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/agent/controllers/ctest"
	statusctrl "github.com/sovra-dev/sovra/agent/controllers/status"
	"github.com/sovra-dev/sovra/agent/resources/attestation"
	"github.com/sovra-dev/sovra/agent/resources/bootstrap"
	"github.com/sovra-dev/sovra/agent/resources/election"
	"github.com/sovra-dev/sovra/agent/resources/host"
	"github.com/sovra-dev/sovra/agent/resources/volumes"
	agentstatus "github.com/sovra-dev/sovra/agent/status"
)

func TestDocumentFollowsResources(t *testing.T) {
	dir := t.TempDir()
	rec := agentstatus.NewRecorder(dir, "test", "node-1", nil)
	st := ctest.Start(t, &statusctrl.StatusController{Recorder: rec, Daemon: "10.0.0.1:7443", ExpectedControlPlanes: 3})
	ctx := context.Background()

	att := attestation.NewStatus()
	*att.TypedSpec() = attestation.StatusSpec{Phase: attestation.PhaseAttested, Node: "ek-1", LastSuccess: time.Now().UTC().Format(time.RFC3339), Message: "attestation passed"}
	if err := st.Create(ctx, att); err != nil {
		t.Fatal(err)
	}
	waitDoc(t, dir, func(d agentstatus.Document) bool {
		return d.Phase == agentstatus.PhaseReady && d.Attestation.State == agentstatus.AttestationPassed && d.Attestation.Enrolled
	})

	el := election.NewElection()
	*el.TypedSpec() = election.ElectionSpec{Round: 4, Self: "10.0.0.5", Quorum: 3, Decision: election.DecisionLeader, Leader: "10.0.0.5",
		Candidates: []election.Candidate{{Address: "10.0.0.5"}, {Address: "10.0.0.6"}, {Address: "10.0.0.7"}}, StableRounds: 2, Reason: "earliest boot"}
	if err := st.Create(ctx, el); err != nil {
		t.Fatal(err)
	}
	waitDoc(t, dir, func(d agentstatus.Document) bool {
		return d.Election.Role == agentstatus.RoleLeader && len(d.Election.Candidates) == 3 && d.Phase == agentstatus.PhaseElecting
	})

	bs := bootstrap.NewStatus()
	*bs.TypedSpec() = bootstrap.StatusSpec{Phase: bootstrap.PhaseBootstrapped, Leader: "10.0.0.5", Message: "etcd bootstrapped"}
	if err := st.Create(ctx, bs); err != nil {
		t.Fatal(err)
	}
	waitDoc(t, dir, func(d agentstatus.Document) bool {
		return d.Election.Bootstrapped && d.Phase == agentstatus.PhaseReady && d.Message == "etcd bootstrapped"
	})

	vol := volumes.NewStatus("data")
	*vol.TypedSpec() = volumes.StatusSpec{Phase: volumes.PhaseReady, Device: "/dev/sdb1", Outcome: "formatted"}
	if err := st.Create(ctx, vol); err != nil {
		t.Fatal(err)
	}
	waitDoc(t, dir, func(d agentstatus.Document) bool {
		return len(d.Volumes) == 1 && d.Volumes[0].Name == "data" && d.Volumes[0].State == agentstatus.VolumeUnlocked && d.Volumes[0].Device == "/dev/sdb1"
	})

	hs := host.NewStatus()
	*hs.TypedSpec() = host.StatusSpec{Phase: host.PhaseRunning, Mode: host.ModeConfigured, Generation: 2, LastAction: "none", CPUs: 8}
	if err := st.Create(ctx, hs); err != nil {
		t.Fatal(err)
	}
	waitDoc(t, dir, func(d agentstatus.Document) bool {
		return d.Host != nil && d.Host.Phase == "running" && d.Host.Mode == "configured" && d.Host.Generation == 2 && d.Host.CPUs == 8
	})

	// A failed host step degrades the agent and says why.
	hs.TypedSpec().Phase, hs.TypedSpec().Error = host.PhaseFailed, "syncing with the daemon's host service: unavailable"
	ctest.Put(t, st, hs)
	waitDoc(t, dir, func(d agentstatus.Document) bool {
		return d.Phase == agentstatus.PhaseDegraded && d.Message == "host mode: syncing with the daemon's host service: unavailable"
	})
}

func waitDoc(t *testing.T, dir string, ok func(agentstatus.Document) bool) {
	t.Helper()
	var last agentstatus.Document
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		d, err := agentstatus.Read(agentstatus.Path(dir))
		if err == nil {
			last = d
			if ok(d) {
				return
			}
		}
	}
	t.Fatalf("status document never matched; last: %+v", last)
}

// TestDocumentSaysAttestationIsUnavailable: on a machine without a TPM or
// UEFI the document says so from the start, and the bootstrap path still
// shows; with a daemon, the agent is Degraded.
func TestDocumentSaysAttestationIsUnavailable(t *testing.T) {
	const why = "no TPM device: /dev/tpmrm0 not found; no UEFI variables: /sys/firmware/efi/efivars not found"

	for _, daemon := range []string{"", "10.0.0.1:7443"} {
		t.Run("daemon "+daemon, func(t *testing.T) {
			dir := t.TempDir()
			rec := agentstatus.NewRecorder(dir, "test", "node-1", nil)
			ctrl := &statusctrl.StatusController{Recorder: rec, Daemon: daemon, Unavailable: why, ExpectedControlPlanes: 3}
			st := ctest.Start(t, ctrl)

			unavailable := func(d agentstatus.Document) bool {
				return d.Attestation.State == agentstatus.AttestationUnavailable && d.Attestation.Reason == why
			}
			// Written at start, before any resource.
			waitDoc(t, dir, unavailable)

			bs := bootstrap.NewStatus()
			*bs.TypedSpec() = bootstrap.StatusSpec{Phase: bootstrap.PhaseBootstrapped, Leader: "10.0.0.5", Message: "etcd bootstrapped"}
			if err := st.Create(context.Background(), bs); err != nil {
				t.Fatal(err)
			}
			waitDoc(t, dir, func(d agentstatus.Document) bool {
				if daemon == "" {
					return unavailable(d) && d.Election.Bootstrapped && d.Phase == agentstatus.PhaseReady
				}
				return unavailable(d) && d.Election.Bootstrapped && d.Phase == agentstatus.PhaseDegraded
			})
		})
	}
}
