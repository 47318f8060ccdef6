// Package volumes holds the state of the data volumes the agent encrypts
// itself: one Status per volume, holding no key material.
package volumes

import (
	"github.com/cosi-project/runtime/pkg/resource"
	"github.com/cosi-project/runtime/pkg/resource/meta"
	"github.com/cosi-project/runtime/pkg/resource/protobuf"
	"github.com/cosi-project/runtime/pkg/resource/typed"
)

// NamespaceName is the namespace of the volume resources.
const NamespaceName resource.Namespace = "volumes"

// StatusType is the type of the Status resource.
const StatusType = resource.Type("Statuses.volumes.sovra.dev")

// Phase is where a volume is on its way to ready.
type Phase string

// Phases.
const (
	// PhaseWaiting: the node has not passed an attestation in this boot,
	// so no key was asked for.
	PhaseWaiting Phase = "waiting"
	// PhaseReady: the volume's LUKS2 header took the released key (and the
	// volume is open when a mapped name is configured).
	PhaseReady Phase = "ready"
	// PhaseFailed: the key was refused or the volume did not take it; the
	// agent retries.
	PhaseFailed Phase = "failed"
)

// Status is the state of one volume; its ID is the volume ID.
type Status = typed.Resource[StatusSpec, StatusExtension]

// StatusSpec is the spec of Status. It holds no key material.
type StatusSpec struct {
	Phase Phase `yaml:"phase" protobuf:"1"`
	// Device is the raw partition.
	Device string `yaml:"device" protobuf:"2"`
	// Outcome is what the last preparation did: formatted, verified or opened.
	Outcome string `yaml:"outcome" protobuf:"3"`
	// MappedPath is the opened volume, when it was opened.
	MappedPath string `yaml:"mappedPath" protobuf:"4"`
	// LastAttempt is when the volume was last prepared (RFC 3339).
	LastAttempt string `yaml:"lastAttempt" protobuf:"5"`
	// Message explains the phase in one sentence for operators.
	Message string `yaml:"message" protobuf:"6"`
}

// DeepCopy implements typed.DeepCopyable.
func (s StatusSpec) DeepCopy() StatusSpec { return s }

// NewStatus returns an empty Status for volume id.
func NewStatus(id resource.ID) *Status {
	return typed.NewResource[StatusSpec, StatusExtension](
		resource.NewMetadata(NamespaceName, StatusType, id, resource.VersionUndefined),
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
			{Name: "Device", JSONPath: "{.device}"},
			{Name: "Outcome", JSONPath: "{.outcome}"},
			{Name: "Message", JSONPath: "{.message}"},
		},
	}
}

func init() {
	if err := protobuf.RegisterDynamic[StatusSpec](StatusType, &Status{}); err != nil {
		panic(err)
	}
}
