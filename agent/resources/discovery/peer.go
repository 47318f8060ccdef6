package discovery

import (
	"github.com/cosi-project/runtime/pkg/resource"
	"github.com/cosi-project/runtime/pkg/resource/meta"
	"github.com/cosi-project/runtime/pkg/resource/protobuf"
	"github.com/cosi-project/runtime/pkg/resource/typed"
)

// PeerType is the type of the Peer resource.
const PeerType = resource.Type("Peers.discovery.sovra.dev")

// Peer is one Talos node that answered on its API with a certificate from
// the cluster's Talos CA, as seen in the latest round. Its ID is its address.
type Peer = typed.Resource[PeerSpec, PeerExtension]

// PeerSpec is what the agent read from one verified peer through the Talos
// API. The same fields, read the same way, describe this node itself.
type PeerSpec struct {
	// Address is the address the peer answered on.
	Address string `yaml:"address" protobuf:"1"`
	// Self is true for this node's own entry.
	Self bool `yaml:"self" protobuf:"2"`
	// MachineType is the peer's Talos machine type.
	MachineType string `yaml:"machineType" protobuf:"3"`
	// ControlPlane is true when the machine type is controlplane or init.
	ControlPlane bool `yaml:"controlPlane" protobuf:"4"`
	// BootTime is the peer's boot time in seconds since the epoch, from
	// Talos SystemStat on the peer.
	BootTime int64 `yaml:"bootTime" protobuf:"5"`
	// EtcdMembers is the number of members etcd on the peer reports; zero
	// when etcd is not running there.
	EtcdMembers int `yaml:"etcdMembers" protobuf:"6"`
	// EtcdData is true when the peer has an etcd data directory.
	EtcdData bool `yaml:"etcdData" protobuf:"7"`
	// EtcdUnknown is true when the etcd state could not be read: such a
	// peer blocks the election until it can.
	EtcdUnknown bool `yaml:"etcdUnknown" protobuf:"8"`
	// TimeSynced is true when Talos on the peer reports its clock in sync
	// (or time sync disabled): only then is its boot time final, since
	// the kernel's boot time moves when the clock is stepped.
	TimeSynced bool `yaml:"timeSynced" protobuf:"9"`
}

// HasEtcd reports whether etcd already exists on the peer.
func (s PeerSpec) HasEtcd() bool { return s.EtcdMembers > 0 || s.EtcdData }

// DeepCopy implements typed.DeepCopyable.
func (s PeerSpec) DeepCopy() PeerSpec { return s }

// NewPeer returns an empty Peer with the given ID (its address).
func NewPeer(id resource.ID) *Peer {
	return typed.NewResource[PeerSpec, PeerExtension](
		resource.NewMetadata(NamespaceName, PeerType, id, resource.VersionUndefined),
		PeerSpec{},
	)
}

// PeerExtension provides the resource definition of Peer.
type PeerExtension struct{}

// ResourceDefinition implements typed.Extension.
func (PeerExtension) ResourceDefinition() meta.ResourceDefinitionSpec {
	return meta.ResourceDefinitionSpec{
		Type:             PeerType,
		DefaultNamespace: NamespaceName,
		PrintColumns: []meta.PrintColumn{
			{Name: "Self", JSONPath: "{.self}"},
			{Name: "Machine Type", JSONPath: "{.machineType}"},
			{Name: "Boot Time", JSONPath: "{.bootTime}"},
			{Name: "Etcd Members", JSONPath: "{.etcdMembers}"},
			{Name: "Etcd Data", JSONPath: "{.etcdData}"},
		},
	}
}

func init() {
	if err := protobuf.RegisterDynamic[PeerSpec](PeerType, &Peer{}); err != nil {
		panic(err)
	}
}
