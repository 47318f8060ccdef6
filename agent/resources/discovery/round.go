package discovery

import (
	"slices"

	"github.com/cosi-project/runtime/pkg/resource"
	"github.com/cosi-project/runtime/pkg/resource/meta"
	"github.com/cosi-project/runtime/pkg/resource/protobuf"
	"github.com/cosi-project/runtime/pkg/resource/typed"
)

// RoundType is the type of the Round resource.
const RoundType = resource.Type("Rounds.discovery.sovra.dev")

// RoundID is the ID of the singleton Round resource: the latest round.
const RoundID = resource.ID("latest")

// Round is the result of the latest complete discovery round. The election
// compares consecutive rounds, so a round is replaced whole, never patched.
type Round = typed.Resource[RoundSpec, RoundExtension]

// RoundSpec is one complete discovery round.
type RoundSpec struct {
	// Number counts rounds from 1 since the agent started.
	Number int `yaml:"number" protobuf:"1"`
	// Self is this node's address; empty when it is not known.
	Self string `yaml:"self" protobuf:"2"`
	// Candidates is the number of addresses the peer source returned.
	Candidates int `yaml:"candidates" protobuf:"3"`
	// Unverified is the number of hosts that answered without a valid
	// certificate from the cluster's Talos CA; they are ignored.
	Unverified int `yaml:"unverified" protobuf:"4"`
	// Failed is the number of verified hosts whose API calls failed.
	Failed int `yaml:"failed" protobuf:"5"`
	// DurationMillis is how long the round took.
	DurationMillis int64 `yaml:"durationMillis" protobuf:"6"`
	// Peers are the verified peers, self included, sorted by address.
	Peers []PeerSpec `yaml:"peers" protobuf:"7"`
}

// DeepCopy implements typed.DeepCopyable.
func (s RoundSpec) DeepCopy() RoundSpec {
	s.Peers = slices.Clone(s.Peers)

	return s
}

// NewRound returns an empty Round.
func NewRound() *Round {
	return typed.NewResource[RoundSpec, RoundExtension](
		resource.NewMetadata(NamespaceName, RoundType, RoundID, resource.VersionUndefined),
		RoundSpec{},
	)
}

// RoundExtension provides the resource definition of Round.
type RoundExtension struct{}

// ResourceDefinition implements typed.Extension.
func (RoundExtension) ResourceDefinition() meta.ResourceDefinitionSpec {
	return meta.ResourceDefinitionSpec{
		Type:             RoundType,
		DefaultNamespace: NamespaceName,
		PrintColumns: []meta.PrintColumn{
			{Name: "Number", JSONPath: "{.number}"},
			{Name: "Self", JSONPath: "{.self}"},
			{Name: "Unverified", JSONPath: "{.unverified}"},
			{Name: "Duration (ms)", JSONPath: "{.durationMillis}"},
		},
	}
}

func init() {
	if err := protobuf.RegisterDynamic[RoundSpec](RoundType, &Round{}); err != nil {
		panic(err)
	}
}
