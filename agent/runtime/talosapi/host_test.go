package talosapi_test

import (
	"context"
	"net"
	"net/netip"
	"runtime"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	machinetype "github.com/siderolabs/talos/pkg/machinery/config/machine"

	"github.com/sovra-dev/sovra/tests/talosfake"
)

// TestHostModeCalls reads the hardware, applies a configuration and resets
// through a fake node built from the Talos protobufs and resources.
func TestHostModeCalls(t *testing.T) {
	pki, err := talosfake.NewPKI("test")
	if err != nil {
		t.Fatal(err)
	}

	self := netip.MustParseAddr("127.0.0.1")
	node, err := talosfake.New(talosfake.Options{
		Address: self, CA: pki.CA, MachineType: machinetype.TypeWorker, BootTime: time.Unix(1_800_000_000, 0),
		Hardware: &talosfake.Hardware{Sockets: 2, ThreadsPerSocket: 4, MemoryMiB: 16384, Disks: []talosfake.Disk{
			{Name: "vdb", SizeBytes: 200 << 30, Model: "data"},
			{Name: "sr0", SizeBytes: 1 << 30, CDROM: true},
			{Name: "vda", SizeBytes: 100 << 30, Model: "QEMU HARDDISK"},
		}},
	})
	if err != nil {
		t.Fatal(err)
	}

	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)

	go node.Serve(ctx, lis) //nolint:errcheck

	c := client(t, pki, lis.Addr().(*net.TCPAddr).Port)

	hw, err := c.Hardware(ctx)
	if err != nil {
		t.Fatal(err)
	}

	if hw.GetArchitecture() != runtime.GOARCH || hw.GetCpus() != 8 || hw.GetMemoryBytes() != 16<<30 {
		t.Fatalf("hardware: %v", hw)
	}

	// Talos's loop device and the CD-ROM are not the machine's disks.
	if d := hw.GetDisks(); len(d) != 2 || d[0].GetName() != "vda" || d[0].GetSizeBytes() != 100<<30 || d[0].GetModel() != "QEMU HARDDISK" || d[1].GetName() != "vdb" {
		t.Fatalf("disks: %v", d)
	}

	config := []byte("version: v1alpha1\n")
	if err := c.ApplyConfiguration(ctx, config); err != nil {
		t.Fatal(err)
	}

	applies := node.ApplyCalls()
	if len(applies) != 1 || string(applies[0].Data) != string(config) || applies[0].Mode != machine.ApplyConfigurationRequest_REBOOT {
		t.Fatalf("applies: %+v", applies)
	}

	if err := c.Reset(ctx); err != nil {
		t.Fatal(err)
	}

	resets := node.ResetCalls()
	if len(resets) != 1 {
		t.Fatalf("%d resets", len(resets))
	}

	req := resets[0].Request
	if req.GetGraceful() || !req.GetReboot() || req.GetMode() != machine.ResetRequest_SYSTEM_DISK || len(req.GetUserDisksToWipe()) != 0 {
		t.Fatalf("reset request: %v", req)
	}

	wiped := map[string]bool{}
	for _, p := range req.GetSystemPartitionsToWipe() {
		wiped[p.GetLabel()] = p.GetWipe()
	}

	if len(wiped) != 2 || !wiped["STATE"] || !wiped["EPHEMERAL"] {
		t.Fatalf("partitions wiped: %v, want STATE and EPHEMERAL", wiped)
	}
}
