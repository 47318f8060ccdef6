package discovery_test

import (
	"testing"

	"github.com/sovra-dev/sovra/agent/resources/discovery"
	"github.com/sovra-dev/sovra/agent/resources/rtest"
)

func TestPeerAndRound(t *testing.T) {
	peer := discovery.PeerSpec{Address: "10.0.0.1", Self: true, MachineType: "controlplane", ControlPlane: true, BootTime: 1_800_000_000, EtcdMembers: 1, EtcdData: true}

	p := discovery.NewPeer("10.0.0.1")
	*p.TypedSpec() = peer
	rtest.RoundTrip(t, p)

	r := discovery.NewRound()
	*r.TypedSpec() = discovery.RoundSpec{Number: 4, Self: "10.0.0.1", Candidates: 3, Unverified: 1, DurationMillis: 12, Peers: []discovery.PeerSpec{peer}}
	rtest.RoundTrip(t, r)

	if !peer.HasEtcd() {
		t.Fatal("HasEtcd")
	}
}
