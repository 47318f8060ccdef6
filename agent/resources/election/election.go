// Package election holds the result of the deterministic leader election
// among control-plane nodes: who leads the etcd bootstrap, or why nobody may.
package election

import (
	"slices"

	"github.com/cosi-project/runtime/pkg/resource"
	"github.com/cosi-project/runtime/pkg/resource/meta"
	"github.com/cosi-project/runtime/pkg/resource/protobuf"
	"github.com/cosi-project/runtime/pkg/resource/typed"
)

// NamespaceName is the namespace of the election resources.
const NamespaceName resource.Namespace = "election"

// ElectionType is the type of the Election resource.
const ElectionType = resource.Type("Elections.election.sovra.dev")

// ElectionID is the ID of the singleton Election resource.
const ElectionID = resource.ID("etcd-bootstrap")

// Decision is the outcome of one election round.
type Decision string

// Decisions.
const (
	// DecisionWaiting: no leader yet; Reason says what is missing.
	DecisionWaiting Decision = "waiting"
	// DecisionLeader: this node bootstraps etcd.
	DecisionLeader Decision = "leader"
	// DecisionFollower: another node bootstraps etcd; this one waits for it.
	DecisionFollower Decision = "follower"
	// DecisionEtcdExists: etcd already exists on a peer; nobody bootstraps.
	DecisionEtcdExists Decision = "etcd-exists"
)

// Election is the latest election result.
type Election = typed.Resource[ElectionSpec, ElectionExtension]

// Candidate is one control-plane node taking part in the election.
type Candidate struct {
	// Address is the node's address.
	Address string `yaml:"address" protobuf:"1"`
	// BootTime is its boot time in seconds since the epoch, from Talos
	// SystemStat on that node.
	BootTime int64 `yaml:"bootTime" protobuf:"2"`
}

// ElectionSpec is the result of the election over one discovery round.
type ElectionSpec struct {
	// Round is the discovery round the result was computed from.
	Round int `yaml:"round" protobuf:"1"`
	// Self is this node's address.
	Self string `yaml:"self" protobuf:"2"`
	// Quorum is the number of control-plane nodes required: the expected count.
	Quorum int `yaml:"quorum" protobuf:"3"`
	// Candidates are the control-plane nodes seen, sorted by (boot time, address).
	Candidates []Candidate `yaml:"candidates" protobuf:"4"`
	// StableRounds counts consecutive rounds with this exact candidate set.
	StableRounds int `yaml:"stableRounds" protobuf:"5"`
	// Decision is the outcome.
	Decision Decision `yaml:"decision" protobuf:"6"`
	// Leader is the elected node's address, for leader and follower.
	Leader string `yaml:"leader" protobuf:"7"`
	// Reason explains the decision in one sentence for operators.
	Reason string `yaml:"reason" protobuf:"8"`
	// EtcdPeer is a peer already running etcd, for DecisionEtcdExists.
	EtcdPeer string `yaml:"etcdPeer" protobuf:"9"`
}

// DeepCopy implements typed.DeepCopyable.
func (s ElectionSpec) DeepCopy() ElectionSpec {
	s.Candidates = slices.Clone(s.Candidates)

	return s
}

// NewElection returns an empty Election.
func NewElection() *Election {
	return typed.NewResource[ElectionSpec, ElectionExtension](
		resource.NewMetadata(NamespaceName, ElectionType, ElectionID, resource.VersionUndefined),
		ElectionSpec{},
	)
}

// ElectionExtension provides the resource definition of Election.
type ElectionExtension struct{}

// ResourceDefinition implements typed.Extension.
func (ElectionExtension) ResourceDefinition() meta.ResourceDefinitionSpec {
	return meta.ResourceDefinitionSpec{
		Type:             ElectionType,
		DefaultNamespace: NamespaceName,
		PrintColumns: []meta.PrintColumn{
			{Name: "Round", JSONPath: "{.round}"},
			{Name: "Decision", JSONPath: "{.decision}"},
			{Name: "Leader", JSONPath: "{.leader}"},
			{Name: "Reason", JSONPath: "{.reason}"},
		},
	}
}

func init() {
	if err := protobuf.RegisterDynamic[ElectionSpec](ElectionType, &Election{}); err != nil {
		panic(err)
	}
}
