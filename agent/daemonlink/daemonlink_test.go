package daemonlink

import (
	"context"
	"net"
	"net/netip"
	"slices"
	"sync"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/sovra-dev/sovra/internal/nodeapi"
)

// stubDaemon answers the ClusterService from fixed data and records calls.
type stubDaemon struct {
	nodeapi.UnimplementedClusterServiceServer
	members []*nodeapi.Member
	grant   map[nodeapi.BootstrapPhase]bool

	mu        sync.Mutex // guards announced, phases
	announced []string
	phases    []nodeapi.BootstrapPhase
	// bootstrapAddress is where the cluster's lease is committed.
	bootstrapAddress string
}

func (d *stubDaemon) ListMembers(_ context.Context, req *nodeapi.ListMembersRequest) (*nodeapi.ListMembersResponse, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.announced = append(d.announced, req.GetAddress())
	return &nodeapi.ListMembersResponse{Cluster: "prod", Members: d.members, BootstrapAddress: d.bootstrapAddress}, nil
}

func (d *stubDaemon) BootstrapLease(_ context.Context, req *nodeapi.BootstrapLeaseRequest) (*nodeapi.BootstrapLeaseResponse, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.phases = append(d.phases, req.GetPhase())
	return &nodeapi.BootstrapLeaseResponse{Granted: d.grant[req.GetPhase()], Holder: "ek-a", HolderAddress: req.GetAddress(), Phase: req.GetPhase()}, nil
}

func start(t *testing.T, d *stubDaemon) *Link {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	nodeapi.RegisterClusterServiceServer(g, d)
	go func() { _ = g.Serve(lis) }()
	t.Cleanup(g.Stop)
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &Link{Self: netip.MustParseAddr("10.0.0.1"), Conn: conn}
}

func TestPeersOneAnnouncedAddressPerOtherMember(t *testing.T) {
	d := &stubDaemon{members: []*nodeapi.Member{
		{Node: "ek-a", Address: "10.0.0.1", Addresses: []string{"10.0.0.1", "192.168.1.1"}, Self: true},
		{Node: "ek-c", Address: "10.0.0.3", Addresses: []string{"10.0.0.3", "10.0.0.33"}},
		{Node: "ek-b", Address: "10.0.0.2", Addresses: []string{"10.0.0.2"}},
		{Node: "ek-d", Addresses: []string{"10.0.0.4"}},                      // not announced yet
		{Node: "ek-e", Address: "10.0.0.2", Addresses: []string{"10.0.0.2"}}, // duplicate address
	}}
	l := start(t, d)
	peers, err := l.Peers(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	want := []netip.Addr{netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("10.0.0.3")}
	if !slices.Equal(peers, want) {
		t.Fatalf("Peers = %v, want %v", peers, want)
	}
	if len(d.announced) != 1 || d.announced[0] != "10.0.0.1" {
		t.Fatalf("announced %v, want this node's address", d.announced)
	}
}

// TestPeersIncludeTheLeaseAddress: the address the bootstrap lease is
// committed to is probed even when no member announced it (the Talos
// control-plane provider's target), once, and never as this node.
func TestPeersIncludeTheLeaseAddress(t *testing.T) {
	d := &stubDaemon{members: []*nodeapi.Member{
		{Node: "ek-a", Address: "10.0.0.1", Self: true},
		{Node: "ek-b", Address: "10.0.0.2"},
	}}
	l := start(t, d)
	for _, tc := range []struct {
		lease string
		want  []string
	}{
		{"", []string{"10.0.0.2"}},
		{"10.0.0.0", []string{"10.0.0.0", "10.0.0.2"}},
		{"10.0.0.2", []string{"10.0.0.2"}},
		{"10.0.0.1", []string{"10.0.0.2"}},
		{"not an address", []string{"10.0.0.2"}},
	} {
		d.mu.Lock()
		d.bootstrapAddress = tc.lease
		d.mu.Unlock()
		peers, err := l.Peers(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, p := range peers {
			got = append(got, p.String())
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("lease at %q: Peers = %v, want %v", tc.lease, got, tc.want)
		}
	}
}

func TestLeasePhases(t *testing.T) {
	d := &stubDaemon{grant: map[nodeapi.BootstrapPhase]bool{
		nodeapi.BootstrapPhase_BOOTSTRAP_PHASE_HELD:         true,
		nodeapi.BootstrapPhase_BOOTSTRAP_PHASE_BOOTSTRAPPED: true,
	}}
	l := start(t, d)
	ctx := context.Background()
	if won, err := l.Acquire(ctx, "10.0.0.1"); !won || err != nil {
		t.Fatalf("Acquire = %v, %v", won, err)
	}
	if ok, err := l.Commit(ctx, "10.0.0.1"); ok || err != nil {
		t.Fatalf("Commit = %v, %v; want not granted", ok, err)
	}
	if err := l.Complete(ctx, "10.0.0.1"); err != nil {
		t.Fatal(err)
	}
	want := []nodeapi.BootstrapPhase{
		nodeapi.BootstrapPhase_BOOTSTRAP_PHASE_HELD, nodeapi.BootstrapPhase_BOOTSTRAP_PHASE_BOOTSTRAPPING, nodeapi.BootstrapPhase_BOOTSTRAP_PHASE_BOOTSTRAPPED,
	}
	if !slices.Equal(d.phases, want) {
		t.Fatalf("phases = %v, want %v", d.phases, want)
	}
}
