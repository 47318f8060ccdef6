package talosadmin_test

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/cosi-project/runtime/pkg/resource"
	machinetype "github.com/siderolabs/talos/pkg/machinery/config/machine"
	"github.com/siderolabs/talos/pkg/machinery/resources/hardware"

	"github.com/sovra-dev/sovra/daemon/hosts/talosadmin"
	"github.com/sovra-dev/sovra/tests/talosfake"
)

// TestCallsOnlyTheHost: sovrad resets the host at its addresses only where
// the node there publishes the host's SMBIOS UUID. A host that reports
// another worker's address gets that worker neither reset nor configured.
func TestCallsOnlyTheHost(t *testing.T) {
	pki, err := talosfake.NewPKI("prod")
	if err != nil {
		t.Fatal(err)
	}
	talosconfig, err := pki.Talosconfig.Bytes()
	if err != nil {
		t.Fatal(err)
	}
	// Two workers of the cluster on one port, as on two machines.
	mine, other := netip.MustParseAddr("127.0.0.2"), netip.MustParseAddr("127.0.0.3")
	port := freePort(t, mine)
	self := serve(t, pki, mine, port, "4c4c4544-0001-0001-0001-000000000001")
	victim := serve(t, pki, other, port, "4c4c4544-0002-0002-0002-000000000002")
	c := talosadmin.Client{Port: port, Timeout: 10 * time.Second}
	ctx := context.Background()

	lying := talosadmin.Node{UUID: "4c4c4544-0001-0001-0001-000000000001", Addresses: []string{other.String()}}
	err = c.Reset(ctx, talosconfig, lying)
	if err == nil || !strings.Contains(err.Error(), "not this host") {
		t.Fatalf("reset at another worker's address: %v, want refused", err)
	}
	if err := c.ApplyConfiguration(ctx, talosconfig, lying, []byte("version: v1alpha1\n")); err == nil {
		t.Fatal("apply at another worker's address: no error")
	}
	if n := len(victim.ResetCalls()) + len(victim.ApplyCalls()); n != 0 {
		t.Fatalf("the other worker got %d calls", n)
	}

	// Its own address among others: the node that is the host is reset.
	honest := talosadmin.Node{UUID: "4C4C4544-0001-0001-0001-000000000001", Addresses: []string{other.String(), mine.String()}}
	if err := c.Reset(ctx, talosconfig, honest); err != nil {
		t.Fatal(err)
	}
	if len(self.ResetCalls()) != 1 || len(victim.ResetCalls()) != 0 {
		t.Fatalf("resets: host %d, other worker %d; want 1 and 0", len(self.ResetCalls()), len(victim.ResetCalls()))
	}
}

func freePort(t *testing.T, addr netip.Addr) int {
	t.Helper()
	lis, err := net.Listen("tcp", netip.AddrPortFrom(addr, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close() //nolint:errcheck
	return lis.Addr().(*net.TCPAddr).Port
}

// serve starts a fake worker at addr:port whose SMBIOS UUID is uuid.
func serve(t *testing.T, pki *talosfake.PKI, addr netip.Addr, port int, uuid string) *talosfake.Node {
	t.Helper()
	si := hardware.NewSystemInformation(hardware.SystemInformationID)
	si.TypedSpec().UUID = uuid
	node, err := talosfake.New(talosfake.Options{
		Address: addr, CA: pki.CA, MachineType: machinetype.TypeWorker, BootTime: time.Now(),
		Resources: []resource.Resource{si},
	})
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", netip.AddrPortFrom(addr, uint16(port)).String()) //nolint:gosec
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go node.Serve(ctx, lis) //nolint:errcheck
	return node
}
