package node_test

import (
	"testing"

	"github.com/sovra-dev/sovra/agent/resources/node"
	"github.com/sovra-dev/sovra/agent/resources/rtest"
)

func TestRole(t *testing.T) {
	r := node.NewRole()
	*r.TypedSpec() = node.RoleSpec{MachineType: "controlplane", ControlPlane: true, Source: "talos"}
	rtest.RoundTrip(t, r)
}
