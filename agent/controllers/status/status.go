// Package status holds the controller that keeps the agent's status document
// (agent/status, read with `talosctl read` and `sovra-agent status`) in step
// with the agent's resources: attestation, election, bootstrap, volumes and
// host mode.
package status

import (
	"context"
	"fmt"
	"time"

	"github.com/cosi-project/runtime/pkg/controller"
	"github.com/cosi-project/runtime/pkg/safe"
	"github.com/cosi-project/runtime/pkg/state"
	"go.uber.org/zap"

	"github.com/sovra-dev/sovra/agent/resources/attestation"
	"github.com/sovra-dev/sovra/agent/resources/bootstrap"
	"github.com/sovra-dev/sovra/agent/resources/election"
	"github.com/sovra-dev/sovra/agent/resources/host"
	"github.com/sovra-dev/sovra/agent/resources/volumes"
	agentstatus "github.com/sovra-dev/sovra/agent/status"
)

// StatusController writes the status document on every change of its inputs.
type StatusController struct {
	// Recorder writes the document; required.
	Recorder *agentstatus.Recorder
	// Daemon is the daemon endpoint shown in the document; empty in edge-only mode.
	Daemon string
	// Unavailable says why this machine cannot attest (agent/platform);
	// empty when it can. The document shows it as the attestation's state
	// and reason; with a daemon, the agent is Degraded.
	Unavailable string
	// ExpectedControlPlanes is shown as the election's expected count.
	ExpectedControlPlanes int
}

// Name implements controller.Controller.
func (ctrl *StatusController) Name() string { return "status.StatusController" }

// Inputs implements controller.Controller.
func (ctrl *StatusController) Inputs() []controller.Input {
	return []controller.Input{
		{Namespace: attestation.NamespaceName, Type: attestation.StatusType, Kind: controller.InputWeak},
		{Namespace: election.NamespaceName, Type: election.ElectionType, Kind: controller.InputWeak},
		{Namespace: bootstrap.NamespaceName, Type: bootstrap.StatusType, Kind: controller.InputWeak},
		{Namespace: volumes.NamespaceName, Type: volumes.StatusType, Kind: controller.InputWeak},
		{Namespace: host.NamespaceName, Type: host.StatusType, Kind: controller.InputWeak},
	}
}

// Outputs implements controller.Controller: the document is a file, not a resource.
func (ctrl *StatusController) Outputs() []controller.Output { return nil }

// Run implements controller.Controller.
func (ctrl *StatusController) Run(ctx context.Context, r controller.Runtime, logger *zap.Logger) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-r.EventCh():
		}

		att, err := safe.ReaderGetByID[*attestation.Status](ctx, r, attestation.StatusID)
		if err = absentIsNil(err); err != nil {
			return fmt.Errorf("reading the attestation status: %w", err)
		}

		el, err := safe.ReaderGetByID[*election.Election](ctx, r, election.ElectionID)
		if err = absentIsNil(err); err != nil {
			return fmt.Errorf("reading the election: %w", err)
		}

		bs, err := safe.ReaderGetByID[*bootstrap.Status](ctx, r, bootstrap.StatusID)
		if err = absentIsNil(err); err != nil {
			return fmt.Errorf("reading the bootstrap status: %w", err)
		}

		vols, err := safe.ReaderListAll[*volumes.Status](ctx, r)
		if err != nil {
			return fmt.Errorf("reading the volume statuses: %w", err)
		}

		hs, err := safe.ReaderGetByID[*host.Status](ctx, r, host.StatusID)
		if err = absentIsNil(err); err != nil {
			return fmt.Errorf("reading the host status: %w", err)
		}

		if err := ctrl.Recorder.Update(func(d *agentstatus.Document) {
			ctrl.fill(d, att, el, bs)
			fillVolumes(d, vols)
			fillHost(d, hs)
		}); err != nil {
			// The document is for people debugging the node: a write failure
			// is logged, not fatal.
			logger.Warn("writing the status document", zap.Error(err))
		}
	}
}

// fill sets the document from the resources present; nil means not there yet.
func (ctrl *StatusController) fill(d *agentstatus.Document, att *attestation.Status, el *election.Election, bs *bootstrap.Status) {
	d.Attestation.Daemon = ctrl.Daemon
	d.Phase, d.Message = agentstatus.PhaseStarting, "starting"

	if att != nil {
		s := att.TypedSpec()
		d.Attestation.Enrolled = s.Node != ""
		d.Attestation.LastAttempt = parseTime(s.LastAttempt)
		d.Attestation.LastSuccess = parseTime(s.LastSuccess)
		d.Attestation.CertificateExpiry = parseTime(s.CredentialExpires)
		d.Attestation.Reason = ""

		switch s.Phase {
		case attestation.PhaseAttested:
			d.Attestation.State = agentstatus.AttestationPassed
			d.Phase, d.Message = agentstatus.PhaseReady, s.Message
		case attestation.PhaseRefused:
			d.Attestation.State, d.Attestation.Reason = agentstatus.AttestationFailed, s.Message
			d.Phase, d.Message = agentstatus.PhaseDegraded, s.Message
		case attestation.PhaseEnrolling:
			d.Attestation.State = agentstatus.AttestationPending
			d.Phase, d.Message = agentstatus.PhaseEnrolling, s.Message
		case attestation.PhaseUnreachable:
			d.Attestation.State = agentstatus.AttestationPending
			d.Phase, d.Message = agentstatus.PhaseDegraded, s.Message
		}
	}

	if el != nil {
		s := el.TypedSpec()
		d.Election.Expected, d.Election.Quorum = ctrl.ExpectedControlPlanes, s.Quorum
		d.Election.StableRounds = s.StableRounds
		d.Election.Leader = s.Leader
		d.Election.Candidates = d.Election.Candidates[:0]

		for _, c := range s.Candidates {
			d.Election.Candidates = append(d.Election.Candidates, c.Address)
		}

		switch s.Decision {
		case election.DecisionLeader:
			d.Election.Role = agentstatus.RoleLeader
		case election.DecisionFollower:
			d.Election.Role = agentstatus.RoleFollower
		case election.DecisionEtcdExists:
			d.Election.Role, d.Election.Leader, d.Election.Bootstrapped = agentstatus.RoleFollower, s.EtcdPeer, true
		case election.DecisionWaiting:
			d.Election.Role = agentstatus.RoleCandidate
		}

		if s.Leader != "" && d.Election.DecidedAt.IsZero() {
			d.Election.DecidedAt = time.Now().UTC()
		}

		if att == nil || d.Phase == agentstatus.PhaseReady {
			d.Phase, d.Message = agentstatus.PhaseElecting, s.Reason
		}
	}

	if bs != nil {
		s := bs.TypedSpec()
		if s.Leader != "" {
			d.Election.Leader = s.Leader
		}

		switch {
		case s.Phase.Final():
			d.Election.Bootstrapped = s.Phase != bootstrap.PhaseNotParticipating
			if s.Phase == bootstrap.PhaseNotParticipating {
				d.Election.Role = agentstatus.RoleNone
			}

			if att == nil || att.TypedSpec().Phase == attestation.PhaseAttested {
				d.Phase, d.Message = agentstatus.PhaseReady, s.Message
			}
		case s.Phase == bootstrap.PhaseBootstrapping:
			d.Phase, d.Message = agentstatus.PhaseBootstrapping, s.Message
		}
	}

	if ctrl.Unavailable != "" {
		d.Attestation.State, d.Attestation.Reason = agentstatus.AttestationUnavailable, ctrl.Unavailable

		if ctrl.Daemon != "" {
			d.Phase, d.Message = agentstatus.PhaseDegraded, "attestation unavailable: "+ctrl.Unavailable
		}
	}
}

// fillVolumes lists every agent-managed volume with its state.
func fillVolumes(d *agentstatus.Document, vols safe.List[*volumes.Status]) {
	d.Volumes = d.Volumes[:0]

	for v := range vols.All() {
		s := v.TypedSpec()
		state := agentstatus.VolumeWaiting

		switch s.Phase {
		case volumes.PhaseReady:
			state = agentstatus.VolumeUnlocked
		case volumes.PhaseFailed:
			state = agentstatus.VolumeFailed
		case volumes.PhaseWaiting:
		}

		d.Volumes = append(d.Volumes, agentstatus.Volume{
			Name: v.Metadata().ID(), Device: s.Device, State: state, Message: s.Message, UpdatedAt: parseTime(s.LastAttempt),
		})
	}
}

// fillHost shows host mode's state; nil means host mode is off (or has
// not started).
func fillHost(d *agentstatus.Document, hs *host.Status) {
	if hs == nil {
		d.Host = nil

		return
	}

	s := hs.TypedSpec()
	d.Host = &agentstatus.Host{
		Phase: string(s.Phase), Mode: string(s.Mode), Generation: s.Generation, AppliedGeneration: s.AppliedGeneration,
		LastAction: s.LastAction, Message: s.Message, LastSync: parseTime(s.LastSync), Error: s.Error,
		Architecture: s.Architecture, CPUs: s.CPUs, MemoryBytes: s.MemoryBytes, Disks: s.Disks,
	}

	if s.Phase == host.PhaseFailed {
		d.Phase, d.Message = agentstatus.PhaseDegraded, "host mode: "+s.Error
	}
}

// absentIsNil treats a resource not written yet as no error: the
// resource's pointer is then nil.
func absentIsNil(err error) error {
	if err != nil && state.IsNotFoundError(err) {
		return nil
	}

	return err
}

func parseTime(s string) time.Time {
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		return time.Time{}
	}

	return t.UTC()
}
