package talosapi_test

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	machinetype "github.com/siderolabs/talos/pkg/machinery/config/machine"

	bootstrapctrl "github.com/sovra-dev/sovra/agent/controllers/bootstrap"
	discoveryctrl "github.com/sovra-dev/sovra/agent/controllers/discovery"
	"github.com/sovra-dev/sovra/agent/runtime/talosapi"
	"github.com/sovra-dev/sovra/tests/talosfake"
)

// serve starts a fake Talos node on addr:port (port 0 picks one) and returns the port.
func serve(t *testing.T, pki *talosfake.PKI, addr netip.Addr, port int, mt machinetype.Type) (*talosfake.Node, int) {
	t.Helper()

	node, err := talosfake.New(talosfake.Options{
		Address: addr, CA: pki.CA, MachineType: mt, BootTime: time.Unix(1_800_000_000, 0), EtcdStartDelay: time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}

	lis, err := net.Listen("tcp", netip.AddrPortFrom(addr, uint16(port)).String())
	if err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)

	go node.Serve(ctx, lis) //nolint:errcheck

	return node, lis.Addr().(*net.TCPAddr).Port
}

func client(t *testing.T, pki *talosfake.PKI, port int) *talosapi.Client {
	t.Helper()

	dir := t.TempDir()
	if err := pki.Write(dir); err != nil {
		t.Fatal(err)
	}

	tlsConfig, err := talosapi.LoadTLS(filepath.Join(dir, talosfake.TalosconfigFile))
	if err != nil {
		t.Fatal(err)
	}

	return &talosapi.Client{TLS: tlsConfig, Port: port, Timeout: 5 * time.Second, Local: netip.MustParseAddr("127.0.0.1")}
}

func TestAgainstFakeNode(t *testing.T) {
	pki, err := talosfake.NewPKI("test")
	if err != nil {
		t.Fatal(err)
	}

	self := netip.MustParseAddr("127.0.0.1")
	node, port := serve(t, pki, self, 0, machinetype.TypeControlPlane)
	c := client(t, pki, port)
	ctx := context.Background()

	mt, err := c.MachineType(ctx)
	if err != nil || mt != "controlplane" {
		t.Fatalf("machine type %q, %v", mt, err)
	}

	spec, err := c.Probe(ctx, self)
	if err != nil {
		t.Fatal(err)
	}

	if !spec.ControlPlane || spec.BootTime != 1_800_000_000 || spec.HasEtcd() || spec.EtcdUnknown || !spec.TimeSynced {
		t.Fatalf("probe before bootstrap: %+v", spec)
	}

	if err := c.Bootstrap(ctx, self); err != nil {
		t.Fatal(err)
	}

	if err := c.Bootstrap(ctx, self); !errors.Is(err, bootstrapctrl.ErrAlreadyBootstrapped) {
		t.Fatalf("second bootstrap: %v", err)
	}

	for !node.EtcdRunning() {
		time.Sleep(time.Millisecond)
	}

	if n, err := c.EtcdMembers(ctx, self); err != nil || n != 1 {
		t.Fatalf("etcd members %d, %v", n, err)
	}

	spec, err = c.Probe(ctx, self)
	if err != nil || !spec.EtcdData || spec.EtcdMembers != 1 {
		t.Fatalf("probe after bootstrap: %+v %v", spec, err)
	}
}

func TestNodeFromAnotherCAIsUnverified(t *testing.T) {
	pki, err := talosfake.NewPKI("test")
	if err != nil {
		t.Fatal(err)
	}

	other, err := talosfake.NewPKI("other")
	if err != nil {
		t.Fatal(err)
	}

	_, port := serve(t, other, netip.MustParseAddr("127.0.0.1"), 0, machinetype.TypeControlPlane)

	_, err = client(t, pki, port).Probe(context.Background(), netip.MustParseAddr("127.0.0.1"))
	if !errors.Is(err, discoveryctrl.ErrUnverified) {
		t.Fatalf("probe of a node from another CA: %v, want ErrUnverified", err)
	}
}

func TestLoadTLSRefusesIncompleteTalosconfig(t *testing.T) {
	pki, err := talosfake.NewPKI("test")
	if err != nil {
		t.Fatal(err)
	}

	ctx := pki.Talosconfig.Contexts[pki.Talosconfig.Context]
	ctx.CA, ctx.Key = "", ""

	dir := t.TempDir()
	if err := pki.Write(dir); err != nil {
		t.Fatal(err)
	}

	_, err = talosapi.LoadTLS(filepath.Join(dir, talosfake.TalosconfigFile))
	if err == nil {
		t.Fatal("incomplete talosconfig accepted")
	}

	for _, secret := range []string{pki.Talosconfig.Contexts[pki.Talosconfig.Context].Crt} {
		if len(secret) > 20 && strings.Contains(err.Error(), secret[:20]) {
			t.Fatal("the error contains key material")
		}
	}
}
