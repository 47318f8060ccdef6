// Package bootstrap holds the state of the etcd bootstrap on this node.
package bootstrap

import (
	"github.com/cosi-project/runtime/pkg/resource"
	"github.com/cosi-project/runtime/pkg/resource/meta"
	"github.com/cosi-project/runtime/pkg/resource/protobuf"
	"github.com/cosi-project/runtime/pkg/resource/typed"
)

// NamespaceName is the namespace of the bootstrap resources.
const NamespaceName resource.Namespace = "bootstrap"

// StatusType is the type of the Status resource.
const StatusType = resource.Type("Statuses.bootstrap.sovra.dev")

// StatusID is the ID of the singleton Status resource.
const StatusID = resource.ID("etcd")

// Phase is where this node is on the bootstrap path.
type Phase string

// Phases. Bootstrapped, Joined, AlreadyBootstrapped and NotParticipating
// are final: the bootstrap path is over for this boot.
const (
	PhaseWaiting             Phase = "waiting"
	PhaseBootstrapping       Phase = "bootstrapping"
	PhaseBootstrapped        Phase = "bootstrapped"
	PhaseFollowing           Phase = "following"
	PhaseJoined              Phase = "joined"
	PhaseAlreadyBootstrapped Phase = "already-bootstrapped"
	PhaseNotParticipating    Phase = "not-participating"
)

// Final reports whether the phase ends the bootstrap path.
func (p Phase) Final() bool {
	switch p {
	case PhaseBootstrapped, PhaseJoined, PhaseAlreadyBootstrapped, PhaseNotParticipating:
		return true
	case PhaseWaiting, PhaseBootstrapping, PhaseFollowing:
		return false
	}

	return false
}

// Status is the bootstrap state of this node.
type Status = typed.Resource[StatusSpec, StatusExtension]

// StatusSpec is the spec of Status.
type StatusSpec struct {
	// Phase is where the node is.
	Phase Phase `yaml:"phase" protobuf:"1"`
	// Leader is the node that bootstraps (or bootstrapped) etcd.
	Leader string `yaml:"leader" protobuf:"2"`
	// Message explains the phase in one sentence for operators.
	Message string `yaml:"message" protobuf:"3"`
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
			{Name: "Leader", JSONPath: "{.leader}"},
			{Name: "Message", JSONPath: "{.message}"},
		},
	}
}

func init() {
	if err := protobuf.RegisterDynamic[StatusSpec](StatusType, &Status{}); err != nil {
		panic(err)
	}
}
