// Package host holds the state of host mode: what the agent last reported
// to the daemon's host service, what it answered, and what the agent did
// about it. It never holds the machine configuration.
package host

import (
	"github.com/cosi-project/runtime/pkg/resource"
	"github.com/cosi-project/runtime/pkg/resource/meta"
	"github.com/cosi-project/runtime/pkg/resource/protobuf"
	"github.com/cosi-project/runtime/pkg/resource/typed"
)

// NamespaceName is the namespace of the host resources.
const NamespaceName resource.Namespace = "host"

// StatusType is the type of the Status resource.
const StatusType = resource.Type("Statuses.host.sovra.dev")

// StatusID is the ID of the singleton Status resource.
const StatusID = resource.ID("host")

// Mode is the configuration the machine runs, as the agent reports it.
type Mode string

// Modes.
const (
	// ModeEnrollment: the machine runs the enrollment configuration and
	// waits to be claimed.
	ModeEnrollment Mode = "enrollment"
	// ModeConfigured: the machine runs a configuration sovra released.
	ModeConfigured Mode = "configured"
)

// Phase is where the host is in host mode.
type Phase string

// Phases.
const (
	// PhaseWaitingAttestation: no passing attestation of this boot yet, so
	// no sync.
	PhaseWaitingAttestation Phase = "waiting-attestation"
	// PhaseWaiting: the daemon has nothing for the machine yet (not
	// accepted, not claimed, no bootstrap data).
	PhaseWaiting Phase = "waiting"
	// PhaseRunning: the machine runs the configuration it should.
	PhaseRunning Phase = "running"
	// PhaseApplied: the configuration was applied; Talos reboots into it.
	PhaseApplied Phase = "applied"
	// PhaseReset: STATE and EPHEMERAL are being wiped; Talos reboots into
	// the enrollment configuration.
	PhaseReset Phase = "reset"
	// PhaseFailed: the last sync, hardware read, apply or reset failed; the
	// agent retries with backoff.
	PhaseFailed Phase = "failed"
)

// Status is the state of host mode on this machine.
type Status = typed.Resource[StatusSpec, StatusExtension]

// StatusSpec is the spec of Status. It never holds the configuration.
type StatusSpec struct {
	Phase Phase `yaml:"phase" protobuf:"1"`
	// Mode is the configuration the machine runs.
	Mode Mode `yaml:"mode" protobuf:"2"`
	// Generation is the generation of the configuration the machine runs;
	// zero on the enrollment configuration.
	Generation int64 `yaml:"generation" protobuf:"3"`
	// LastAction is the daemon's last answer: wait, apply, reset or none.
	LastAction string `yaml:"lastAction" protobuf:"4"`
	// AppliedGeneration is the generation the agent last applied (or found
	// applied in this boot); zero before.
	AppliedGeneration int64 `yaml:"appliedGeneration" protobuf:"5"`
	// Message is the daemon's explanation of its last answer, or the
	// agent's of what it is waiting for.
	Message string `yaml:"message" protobuf:"6"`
	// LastSync is when the daemon last answered (RFC 3339).
	LastSync string `yaml:"lastSync" protobuf:"7"`
	// Error is the last failure; empty after a success.
	Error string `yaml:"error" protobuf:"8"`
	// Architecture, CPUs, MemoryBytes and Disks summarise the hardware
	// reported.
	Architecture string `yaml:"architecture" protobuf:"9"`
	CPUs         uint32 `yaml:"cpus" protobuf:"10"`
	MemoryBytes  uint64 `yaml:"memoryBytes" protobuf:"11"`
	Disks        int    `yaml:"disks" protobuf:"12"`
}

// DeepCopy implements typed.DeepCopyable.
func (s StatusSpec) DeepCopy() StatusSpec { return s }

// NewStatus returns an empty Status.
func NewStatus() *Status {
	return typed.NewResource[StatusSpec, StatusExtension](
		resource.NewMetadata(NamespaceName, StatusType, StatusID, resource.VersionUndefined),
		StatusSpec{},
	)
}

// StatusExtension provides the resource definition of Status.
type StatusExtension struct{}

// ResourceDefinition implements typed.Extension.
func (StatusExtension) ResourceDefinition() meta.ResourceDefinitionSpec {
	return meta.ResourceDefinitionSpec{
		Type:             StatusType,
		DefaultNamespace: NamespaceName,
		PrintColumns: []meta.PrintColumn{
			{Name: "Phase", JSONPath: "{.phase}"},
			{Name: "Mode", JSONPath: "{.mode}"},
			{Name: "Generation", JSONPath: "{.generation}"},
			{Name: "Last Action", JSONPath: "{.lastAction}"},
			{Name: "Message", JSONPath: "{.message}"},
		},
	}
}

func init() {
	if err := protobuf.RegisterDynamic[StatusSpec](StatusType, &Status{}); err != nil {
		panic(err)
	}
}
