// Package rtest checks the agent's resources the way the COSI state server
// will use them: a valid resource definition, and a protobuf round trip.
package rtest

import (
	"reflect"
	"testing"

	"github.com/cosi-project/runtime/pkg/resource"
	"github.com/cosi-project/runtime/pkg/resource/meta"
	"github.com/cosi-project/runtime/pkg/resource/protobuf"
)

// RoundTrip checks r's definition and that it survives protobuf encoding.
func RoundTrip(t *testing.T, r resource.Resource) {
	t.Helper()

	provider, ok := r.(meta.ResourceDefinitionProvider)
	if !ok {
		t.Fatalf("%s has no resource definition", r.Metadata().Type())
	}

	if _, err := meta.NewResourceDefinition(provider.ResourceDefinition()); err != nil {
		t.Fatalf("definition of %s: %v", r.Metadata().Type(), err)
	}

	p, err := protobuf.FromResource(r)
	if err != nil {
		t.Fatalf("encoding %s: %v", r.Metadata().Type(), err)
	}

	wire, err := p.Marshal()
	if err != nil {
		t.Fatal(err)
	}

	back, err := protobuf.Unmarshal(wire)
	if err != nil {
		t.Fatal(err)
	}

	got, err := protobuf.UnmarshalResource(back)
	if err != nil {
		t.Fatalf("decoding %s: %v", r.Metadata().Type(), err)
	}

	if !reflect.DeepEqual(got.Spec(), r.Spec()) {
		t.Fatalf("round trip of %s:\n got %+v\nwant %+v", r.Metadata().Type(), got.Spec(), r.Spec())
	}
}
