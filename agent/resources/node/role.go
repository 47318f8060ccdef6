// Package node holds the resources that describe this node to the other
// controllers: its role in the cluster.
package node

import (
	"github.com/cosi-project/runtime/pkg/resource"
	"github.com/cosi-project/runtime/pkg/resource/meta"
	"github.com/cosi-project/runtime/pkg/resource/protobuf"
	"github.com/cosi-project/runtime/pkg/resource/typed"
)

// NamespaceName is the namespace of the node resources.
const NamespaceName resource.Namespace = "node"

// RoleType is the type of the Role resource.
const RoleType = resource.Type("Roles.node.sovra.dev")

// RoleID is the ID of the singleton Role resource.
const RoleID = resource.ID("local")

// Role is this node's part in the cluster, as the bootstrap path sees it.
type Role = typed.Resource[RoleSpec, RoleExtension]

// RoleSpec is the spec of Role.
type RoleSpec struct {
	// MachineType is the Talos machine type: controlplane, init or worker.
	MachineType string `yaml:"machineType" protobuf:"1"`
	// ControlPlane is true for the types that take part in the bootstrap.
	ControlPlane bool `yaml:"controlPlane" protobuf:"2"`
	// Source says where the type came from: config or talos.
	Source string `yaml:"source" protobuf:"3"`
}

// DeepCopy implements typed.DeepCopyable.
func (s RoleSpec) DeepCopy() RoleSpec { return s }

// NewRole returns an empty Role.
func NewRole() *Role {
	return typed.NewResource[RoleSpec, RoleExtension](
		resource.NewMetadata(NamespaceName, RoleType, RoleID, resource.VersionUndefined),
		RoleSpec{},
	)
}

// RoleExtension provides the resource definition of Role.
type RoleExtension struct{}

// ResourceDefinition implements typed.Extension.
func (RoleExtension) ResourceDefinition() meta.ResourceDefinitionSpec {
	return meta.ResourceDefinitionSpec{
		Type:             RoleType,
		DefaultNamespace: NamespaceName,
		PrintColumns: []meta.PrintColumn{
			{Name: "Machine Type", JSONPath: "{.machineType}"},
			{Name: "Control Plane", JSONPath: "{.controlPlane}"},
			{Name: "Source", JSONPath: "{.source}"},
		},
	}
}

func init() {
	if err := protobuf.RegisterDynamic[RoleSpec](RoleType, &Role{}); err != nil {
		panic(err)
	}
}
