package talosfake_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/common"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"github.com/siderolabs/talos/pkg/machinery/client"
	clientconfig "github.com/siderolabs/talos/pkg/machinery/client/config"
	"github.com/siderolabs/talos/pkg/machinery/config/generate/secrets"
	machinetype "github.com/siderolabs/talos/pkg/machinery/config/machine"
	"github.com/siderolabs/talos/pkg/machinery/role"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/sovra-dev/sovra/tests/talosfake"
)

// etcdDataDir is the directory CACPPT lists to learn whether a cluster was
// bootstrapped.
const etcdDataDir = "/var/lib/etcd/member"

// cluster is fake nodes on 127.0.0.2, 127.0.0.3, … (all of 127/8 is on lo)
// sharing one port, as Talos nodes share apid's.
type cluster struct {
	nodes []*talosfake.Node
	// addrs are the node addresses, as machine addresses name them.
	addrs []string
	// endpoints are addr:port, for client.WithEndpoints.
	endpoints []string
}

func startCluster(t *testing.T, pki *talosfake.PKI, size int) *cluster {
	t.Helper()

	first, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}

	port := first.Addr().(*net.TCPAddr).Port
	c := &cluster{}

	for i := range size {
		addr := netip.AddrFrom4([4]byte{127, 0, 0, byte(2 + i)})

		lis := first
		if i > 0 {
			if lis, err = net.Listen("tcp", net.JoinHostPort(addr.String(), strconv.Itoa(port))); err != nil {
				t.Fatal(err)
			}
		}

		c.nodes = append(c.nodes, serveNode(t, talosfake.Options{
			Address: addr, APIPort: port, CA: pki.CA, MachineType: machinetype.TypeControlPlane,
			BootTime: time.Unix(1_700_000_000, 0), Hostname: "cp-" + addr.String(), EtcdStartDelay: time.Millisecond,
		}, lis))
		c.addrs = append(c.addrs, addr.String())
		c.endpoints = append(c.endpoints, lis.Addr().String())
	}

	return c
}

func newClusterClient(t *testing.T, cfg *clientconfig.Config, endpoints ...string) *client.Client {
	t.Helper()

	c, err := client.New(context.Background(), client.WithConfig(cfg), client.WithEndpoints(endpoints...))
	if err != nil {
		t.Fatal(err)
	}

	t.Cleanup(func() { c.Close() })

	return c
}

// listEtcdData lists the etcd data directory and reads the stream to its
// end, like CACPPT's bootstrapCluster.
func listEtcdData(ctx context.Context, t *testing.T, c *client.Client) []*machine.FileInfo {
	t.Helper()

	stream, err := c.LS(ctx, &machine.ListRequest{Root: etcdDataDir})
	if err != nil {
		t.Fatal(err)
	}

	var infos []*machine.FileInfo

	for {
		info, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return infos
		}

		if err != nil {
			t.Fatalf("listing %s: %v", etcdDataDir, err)
		}

		infos = append(infos, info)
	}
}

// hostnames returns the Metadata.Hostname of each message, sorted.
func hostnames[M interface{ GetMetadata() *common.Metadata }](msgs []M) []string {
	var out []string
	for _, m := range msgs {
		out = append(out, m.GetMetadata().GetHostname())
	}

	slices.Sort(out)

	return out
}

// host returns the IP of an address:port.
func host(t *testing.T, addrPort string) string {
	t.Helper()

	ap, err := netip.ParseAddrPort(addrPort)
	if err != nil {
		t.Fatal(err)
	}

	return ap.Addr().String()
}

// TestNodesRoutingAsCACPPTUsesIt walks CACPPT's bootstrapCluster against three
// fakes: LS with every node in "nodes", then Bootstrap on the lowest address.
func TestNodesRoutingAsCACPPTUsesIt(t *testing.T) {
	pki, err := talosfake.NewPKI("fake")
	if err != nil {
		t.Fatal(err)
	}

	cl := startCluster(t, pki, 3)
	c := newClusterClient(t, pki.Talosconfig, cl.endpoints...)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	ctx = client.WithNodes(ctx, cl.addrs...)

	// Before any bootstrap every node answers, once, with its failure in the
	// message metadata; the stream itself ends cleanly.
	infos := listEtcdData(ctx, t, c)
	if got := hostnames(infos); !slices.Equal(got, cl.addrs) {
		t.Fatalf("LS answered for %v, want one message per node %v", got, cl.addrs)
	}

	for _, info := range infos {
		if info.GetMetadata().GetError() == "" || info.GetMetadata().GetStatus() == nil || info.GetIsDir() {
			t.Fatalf("LS before bootstrap: %v, want the node's error in the metadata", info)
		}
	}

	// CACPPT bootstraps the lowest address.
	lowest := slices.Min(cl.addrs)
	if err := c.Bootstrap(client.WithNodes(ctx, lowest), &machine.BootstrapRequest{}); err != nil {
		t.Fatalf("bootstrap %s: %v", lowest, err)
	}

	calls := cl.nodes[0].BootstrapCalls()
	if len(calls) != 1 || !calls[0].Accepted {
		t.Fatalf("bootstrap calls on %s: %+v, want one accepted", lowest, calls)
	}

	// The client reached one of the fakes: either node 0 itself, or another
	// that forwarded the call from its own address on behalf of the client.
	if calls[0].Origin != "" && !slices.Contains(cl.addrs[1:], host(t, calls[0].Client)) {
		t.Fatalf("forwarded bootstrap recorded from %s, want another node's address", calls[0].Client)
	}

	for i, n := range cl.nodes[1:] {
		if calls := n.BootstrapCalls(); len(calls) != 0 {
			t.Fatalf("bootstrap calls on %s: %+v, want none", cl.addrs[i+1], calls)
		}
	}

	// Now exactly one node has the etcd data directory.
	infos = listEtcdData(ctx, t, c)
	if got := hostnames(infos); !slices.Equal(got, cl.addrs) {
		t.Fatalf("LS answered for %v, want one message per node %v", got, cl.addrs)
	}

	found := slices.DeleteFunc(infos, func(info *machine.FileInfo) bool { return info.GetMetadata().GetError() != "" })
	if len(found) != 1 || found[0].GetMetadata().GetHostname() != lowest || !found[0].GetIsDir() {
		t.Fatalf("LS after bootstrap found %v, want only %s", found, lowest)
	}

	// A second Bootstrap. apid answers it with status OK and one message
	// whose metadata carries the node's error (Error: "rpc error: code =
	// AlreadyExists desc = etcd data directory is not empty", Status: that
	// status). client.Bootstrap's FilterMessages turns the message into a
	// multierror of *client.NodeError{Node: lowest, Err: <the status>}, and
	// status.Code, CACPPT's check, finds the status through the chain with
	// errors.As: the caller sees codes.AlreadyExists.
	err = c.Bootstrap(client.WithNodes(ctx, lowest), &machine.BootstrapRequest{})
	if status.Code(err) != codes.AlreadyExists {
		t.Fatalf("second bootstrap: %v (code %v), want AlreadyExists", err, status.Code(err))
	}

	var nodeErr *client.NodeError
	if !errors.As(err, &nodeErr) || nodeErr.Node != lowest {
		t.Fatalf("second bootstrap: %#v, want a NodeError from %s", err, lowest)
	}

	// The wire answer itself: no gRPC error, the failure in the message.
	resp, err := c.MachineClient.Bootstrap(client.WithNodes(ctx, lowest), &machine.BootstrapRequest{})
	if err != nil || len(resp.GetMessages()) != 1 {
		t.Fatalf("third bootstrap on the wire: %v %v, want one message", resp, err)
	}

	md := resp.GetMessages()[0].GetMetadata()
	if md.GetHostname() != lowest || codes.Code(md.GetStatus().GetCode()) != codes.AlreadyExists || md.GetError() == "" {
		t.Fatalf("third bootstrap metadata %v, want AlreadyExists from %s", md, lowest)
	}

	if calls := cl.nodes[0].BootstrapCalls(); len(calls) != 3 || calls[1].Accepted || calls[2].Accepted {
		t.Fatalf("bootstrap calls on %s: %+v, want one accepted then two refused", lowest, calls)
	}
}

func TestNodesRoutingOfUnaryCalls(t *testing.T) {
	pki, err := talosfake.NewPKI("fake")
	if err != nil {
		t.Fatal(err)
	}

	cl := startCluster(t, pki, 3)
	c := newClusterClient(t, pki.Talosconfig, cl.endpoints[1])

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	// A node nobody serves fails alone, in its message.
	const absent = "127.0.0.99"

	v, err := c.Version(client.WithNodes(ctx, append(slices.Clone(cl.addrs), absent)...))
	if got := hostnames(v.GetMessages()); !slices.Equal(got, cl.addrs) {
		t.Fatalf("version answered for %v, want %v", got, cl.addrs)
	}

	var nodeErr *client.NodeError
	if !errors.As(err, &nodeErr) || nodeErr.Node != absent || status.Code(nodeErr.Err) != codes.Unavailable {
		t.Fatalf("version error %v, want Unavailable from %s", err, absent)
	}

	stat, err := c.MachineClient.SystemStat(client.WithNodes(ctx, cl.addrs...), &emptypb.Empty{})
	if err != nil || !slices.Equal(hostnames(stat.GetMessages()), cl.addrs) {
		t.Fatalf("system stat: %v %v", stat, err)
	}

	for _, m := range stat.GetMessages() {
		if m.GetBootTime() != 1_700_000_000 || m.GetMetadata().GetError() != "" {
			t.Fatalf("system stat of %s: %v", m.GetMetadata().GetHostname(), m)
		}
	}

	// Before a bootstrap no etcd answers: every node fails, and the client
	// gets no response, only the errors.
	members, err := c.EtcdMemberList(client.WithNodes(ctx, cl.addrs...), &machine.EtcdMemberListRequest{})
	if members != nil || status.Code(err) != codes.Unavailable {
		t.Fatalf("etcd members before bootstrap: %v %v, want Unavailable", members, err)
	}

	if err := c.Bootstrap(client.WithNodes(ctx, cl.addrs[0]), &machine.BootstrapRequest{}); err != nil {
		t.Fatal(err)
	}

	deadline := time.Now().Add(5 * time.Second)
	for !cl.nodes[0].EtcdRunning() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}

	members, err = c.EtcdMemberList(client.WithNodes(ctx, cl.addrs...), &machine.EtcdMemberListRequest{})
	if len(members.GetMessages()) != 1 || members.GetMessages()[0].GetMetadata().GetHostname() != cl.addrs[0] {
		t.Fatalf("etcd members after bootstrap: %v, want %s's only", members, cl.addrs[0])
	}

	if status.Code(err) != codes.Unavailable {
		t.Fatalf("etcd members after bootstrap: error %v, want Unavailable from the others", err)
	}
}

// TestNodeRoutingIsOneToOne covers "node" (client.WithNode): the call is
// forwarded and answered unchanged, errors as gRPC errors.
func TestNodeRoutingIsOneToOne(t *testing.T) {
	pki, err := talosfake.NewPKI("fake")
	if err != nil {
		t.Fatal(err)
	}

	cl := startCluster(t, pki, 3)
	c := newClusterClient(t, pki.Talosconfig, cl.endpoints[2])

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	ctx = client.WithNode(ctx, cl.addrs[0])

	v, err := c.Version(ctx)
	if err != nil || len(v.GetMessages()) != 1 || v.GetMessages()[0].GetMetadata().GetHostname() != "cp-"+cl.addrs[0] {
		t.Fatalf("version through node %s: %v %v, want its own answer", cl.addrs[2], v, err)
	}

	if err := c.Bootstrap(ctx, &machine.BootstrapRequest{}); err != nil {
		t.Fatal(err)
	}

	calls := cl.nodes[0].BootstrapCalls()
	if len(calls) != 1 || host(t, calls[0].Client) != cl.addrs[2] || host(t, calls[0].Origin) != "127.0.0.1" {
		t.Fatalf("bootstrap calls %+v, want one from %s on behalf of 127.0.0.1", calls, cl.addrs[2])
	}

	if _, err := c.MachineClient.Bootstrap(ctx, &machine.BootstrapRequest{}); status.Code(err) != codes.AlreadyExists {
		t.Fatalf("second bootstrap: %v, want the AlreadyExists gRPC error", err)
	}

	stream, err := c.LS(client.WithNode(ctx, cl.addrs[1]), &machine.ListRequest{Root: etcdDataDir})
	if err != nil {
		t.Fatal(err)
	}

	if info, err := stream.Recv(); status.Code(err) != codes.Unknown {
		t.Fatalf("LS on a node without etcd data: %v %v, want the node's error", info, err)
	}

	if _, err := c.Version(client.WithNode(ctx, "127.0.0.99")); status.Code(err) != codes.Unavailable {
		t.Fatalf("version from an absent node: %v, want Unavailable", err)
	}
}

// TestForwardedCallsKeepTheCallersRoles: a forwarded call is authorized
// with the caller's roles, not the forwarding node's.
func TestForwardedCallsKeepTheCallersRoles(t *testing.T) {
	pki, err := talosfake.NewPKI("fake")
	if err != nil {
		t.Fatal(err)
	}

	cl := startCluster(t, pki, 2)

	reader, err := secrets.NewAdminCertificateAndKey(time.Now(), pki.CA, role.MakeSet(role.Reader), time.Hour)
	if err != nil {
		t.Fatal(err)
	}

	c := newClusterClient(t, clientconfig.NewConfig("fake", nil, pki.CA.Crt, reader), cl.endpoints[1])

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	err = c.Bootstrap(client.WithNodes(ctx, cl.addrs[0]), &machine.BootstrapRequest{})
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("bootstrap by a reader: %v, want PermissionDenied", err)
	}

	if calls := cl.nodes[0].BootstrapCalls(); len(calls) != 0 {
		t.Fatalf("bootstrap calls %+v, want none", calls)
	}

	if _, err := c.Version(client.WithNodes(ctx, cl.addrs[0])); err != nil {
		t.Fatalf("version by a reader: %v", err)
	}
}
