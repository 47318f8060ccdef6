// Package attestation holds the state of this node's enrollment and
// attestation with the daemon.
package attestation

import (
	"github.com/cosi-project/runtime/pkg/resource"
	"github.com/cosi-project/runtime/pkg/resource/meta"
	"github.com/cosi-project/runtime/pkg/resource/protobuf"
	"github.com/cosi-project/runtime/pkg/resource/typed"
)

// NamespaceName is the namespace of the attestation resources.
const NamespaceName resource.Namespace = "attestation"

// StatusType is the type of the Status resource.
const StatusType = resource.Type("Statuses.attestation.sovra.dev")

// StatusID is the ID of the singleton Status resource.
const StatusID = resource.ID("node")

// Phase is where the node is on the attestation path.
type Phase string

// Phases.
const (
	// PhaseEnrolling: the node has no enrolled AK yet.
	PhaseEnrolling Phase = "enrolling"
	// PhaseAttested: the last attestation passed; the credential is valid.
	PhaseAttested Phase = "attested"
	// PhaseRefused: the daemon refused the last enrollment or attestation.
	PhaseRefused Phase = "refused"
	// PhaseUnreachable: the daemon could not be reached.
	PhaseUnreachable Phase = "unreachable"
)

// Status is the attestation state of this node.
type Status = typed.Resource[StatusSpec, StatusExtension]

// StatusSpec is the spec of Status. It holds no key material.
type StatusSpec struct {
	Phase Phase `yaml:"phase" protobuf:"1"`
	// Node is the daemon's name for this node (from its EK), once enrolled.
	Node string `yaml:"node" protobuf:"2"`
	// LastAttempt is when the last attestation was tried (RFC 3339).
	LastAttempt string `yaml:"lastAttempt" protobuf:"3"`
	// LastSuccess is when an attestation last passed (RFC 3339).
	LastSuccess string `yaml:"lastSuccess" protobuf:"4"`
	// CredentialExpires is when the node credential expires (RFC 3339).
	CredentialExpires string `yaml:"credentialExpires" protobuf:"5"`
	// Message explains the phase in one sentence for operators.
	Message string `yaml:"message" protobuf:"6"`
	// Warnings are the daemon's Warn-mode policy findings.
	Warnings []string `yaml:"warnings" protobuf:"7"`
}

// DeepCopy implements typed.DeepCopyable.
func (s StatusSpec) DeepCopy() StatusSpec {
	s.Warnings = append([]string(nil), s.Warnings...)
	return s
}

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
			{Name: "Node", JSONPath: "{.node}"},
			{Name: "Last Success", JSONPath: "{.lastSuccess}"},
			{Name: "Expires", JSONPath: "{.credentialExpires}"},
			{Name: "Message", JSONPath: "{.message}"},
		},
	}
}

func init() {
	if err := protobuf.RegisterDynamic[StatusSpec](StatusType, &Status{}); err != nil {
		panic(err)
	}
}
