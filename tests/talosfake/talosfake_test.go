package talosfake_test

import (
	"context"
	"crypto/tls"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/cosi-project/runtime/pkg/safe"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"github.com/siderolabs/talos/pkg/machinery/client"
	machinetype "github.com/siderolabs/talos/pkg/machinery/config/machine"
	talosconfig "github.com/siderolabs/talos/pkg/machinery/resources/config"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/sovra-dev/sovra/tests/talosfake"
)

func startNode(t *testing.T, pki *talosfake.PKI, bootTime time.Time) (*talosfake.Node, string) {
	t.Helper()

	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}

	node := serveNode(t, talosfake.Options{
		Address: netip.MustParseAddr("127.0.0.1"), CA: pki.CA, MachineType: machinetype.TypeControlPlane,
		BootTime: bootTime, Hostname: "cp-1", EtcdStartDelay: time.Millisecond,
	}, lis)

	return node, lis.Addr().String()
}

// serveNode serves a fake node on lis until the test ends.
func serveNode(t *testing.T, opts talosfake.Options, lis net.Listener) *talosfake.Node {
	t.Helper()

	node, err := talosfake.New(opts)
	if err != nil {
		lis.Close()
		t.Fatal(err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})

	t.Cleanup(func() {
		cancel()
		<-done
	})

	go func() {
		defer close(done)

		if err := node.Serve(ctx, lis); err != nil {
			t.Errorf("serving %s: %v", opts.Address, err)
		}
	}()

	return node
}

func newClient(t *testing.T, pki *talosfake.PKI, endpoint string) *client.Client {
	t.Helper()

	c, err := client.New(context.Background(), client.WithConfig(pki.Talosconfig), client.WithEndpoints(endpoint))
	if err != nil {
		t.Fatal(err)
	}

	t.Cleanup(func() { c.Close() })

	return c
}

func TestMachineryClientAgainstFake(t *testing.T) {
	pki, err := talosfake.NewPKI("fake")
	if err != nil {
		t.Fatal(err)
	}

	boot := time.Unix(1_700_000_000, 0)
	node, endpoint := startNode(t, pki, boot)
	c := newClient(t, pki, endpoint)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	v, err := c.Version(ctx)
	if err != nil || v.GetMessages()[0].GetVersion().GetTag() == "" {
		t.Fatalf("version: %v %v", v, err)
	}

	stat, err := c.MachineClient.SystemStat(ctx, &emptypb.Empty{})
	if err != nil || stat.GetMessages()[0].GetBootTime() != uint64(boot.Unix()) {
		t.Fatalf("system stat: %v %v", stat, err)
	}

	mt, err := safe.StateGetByID[*talosconfig.MachineType](ctx, c.COSI, talosconfig.MachineTypeID)
	if err != nil || mt.MachineType() != machinetype.TypeControlPlane {
		t.Fatalf("machine type over COSI: %v %v", mt, err)
	}

	if _, err := c.EtcdMemberList(ctx, &machine.EtcdMemberListRequest{}); status.Code(err) != codes.Unavailable {
		t.Fatalf("etcd member list before bootstrap: %v", err)
	}

	if err := c.Bootstrap(ctx, &machine.BootstrapRequest{}); err != nil {
		t.Fatalf("bootstrap: %v", err)
	}

	if err := c.Bootstrap(ctx, &machine.BootstrapRequest{}); status.Code(err) != codes.AlreadyExists {
		t.Fatalf("second bootstrap: %v, want AlreadyExists", err)
	}

	calls := node.BootstrapCalls()
	if len(calls) != 2 || !calls[0].Accepted || calls[1].Accepted {
		t.Fatalf("recorded calls %+v", calls)
	}

	deadline := time.Now().Add(5 * time.Second)
	for !node.EtcdRunning() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}

	members, err := c.EtcdMemberList(ctx, &machine.EtcdMemberListRequest{})
	if err != nil || len(members.GetMessages()[0].GetMembers()) != 1 {
		t.Fatalf("etcd member list after bootstrap: %v %v", members, err)
	}

	stream, err := c.LS(ctx, &machine.ListRequest{Root: "/var/lib/etcd/member"})
	if err != nil {
		t.Fatal(err)
	}

	if info, err := stream.Recv(); err != nil || !info.GetIsDir() {
		t.Fatalf("list etcd data: %v %v", info, err)
	}
}

func TestClientFromAnotherCAIsRefused(t *testing.T) {
	pki, err := talosfake.NewPKI("fake")
	if err != nil {
		t.Fatal(err)
	}

	other, err := talosfake.NewPKI("other")
	if err != nil {
		t.Fatal(err)
	}

	_, endpoint := startNode(t, pki, time.Now())

	// Trust the node's CA, but present a certificate from another one.
	cfg := other.Talosconfig
	cfg.Contexts[cfg.Context].CA = pki.Talosconfig.Contexts[pki.Talosconfig.Context].CA
	c := newClient(t, &talosfake.PKI{Talosconfig: cfg}, endpoint)

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	if _, err := c.Version(ctx); err == nil {
		t.Fatal("a client certificate from another CA was accepted")
	}

	// And a client that trusts only another CA refuses the node.
	tlsCfg := &tls.Config{MinVersion: tls.VersionTLS12}
	conn, err := tls.Dial("tcp", endpoint, tlsCfg)

	if err == nil {
		conn.Close()
		t.Fatal("the node's certificate verified against the system roots")
	}
}
