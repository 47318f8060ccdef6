package talosapi

import (
	"context"
	"fmt"
	"runtime"
	"sort"
	"strings"

	"github.com/cosi-project/runtime/pkg/resource"
	"github.com/cosi-project/runtime/pkg/resource/protobuf"
	"github.com/cosi-project/runtime/pkg/state"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	blockpb "github.com/siderolabs/talos/pkg/machinery/api/resource/definitions/block"
	hardwarepb "github.com/siderolabs/talos/pkg/machinery/api/resource/definitions/hardware"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/emptypb"

	hostctrl "github.com/sovra-dev/sovra/agent/controllers/host"
	"github.com/sovra-dev/sovra/internal/hostapi"
)

// The Talos resources host mode reads, as machinery's resources/hardware
// (Processor, MemoryModule: SMBIOS) and resources/block (Disk) define them.
const (
	hardwareNamespace  = "hardware"
	processorType      = "Processors.hardware.talos.dev"
	memoryModuleType   = "MemoryModules.hardware.talos.dev"
	blockNamespace     = "runtime"
	diskType           = "Disks.block.talos.dev"
	bytesPerMiB        = 1 << 20
	bytesPerKiB        = 1 << 10
	loopDevicePrefix   = "loop"
	hostPartitionState = "STATE"
	hostPartitionEphem = "EPHEMERAL"
)

// listSpecs lists the resources of one type and decodes each protobuf spec
// into a fresh message from newSpec; it returns their IDs and specs.
func listSpecs[M proto.Message](ctx context.Context, n *node, ns resource.Namespace, typ resource.Type, newSpec func() M) ([]resource.ID, []M, error) {
	list, err := n.cosi.List(ctx, resource.NewMetadata(ns, typ, "", resource.VersionUndefined),
		state.WithListUnmarshalOptions(state.WithSkipProtobufUnmarshal()))
	if err != nil {
		return nil, nil, fmt.Errorf("listing %s: %w", typ, err)
	}

	ids := make([]resource.ID, 0, len(list.Items))
	specs := make([]M, 0, len(list.Items))

	for _, r := range list.Items {
		raw, ok := r.(*protobuf.Resource)
		if !ok {
			return nil, nil, fmt.Errorf("listing %s: unexpected resource %T", typ, r)
		}

		spec := newSpec()
		if err := raw.Unmarshal(protoSpec{spec}); err != nil {
			return nil, nil, fmt.Errorf("decoding %s %s: %w", typ, r.Metadata().ID(), err)
		}

		ids, specs = append(ids, r.Metadata().ID()), append(specs, spec)
	}

	return ids, specs, nil
}

// Hardware implements host.Talos for the Local node: the architecture of
// the agent (the machine's, as Talos runs the extension natively), the
// logical processors (the SMBIOS processors' threads, else the kernel's
// CPUs), the memory (the SMBIOS modules, else the kernel's total) and the
// disks Talos found, without loop devices, CD-ROMs and read-only disks.
func (c *Client) Hardware(ctx context.Context) (*hostapi.Hardware, error) {
	ctx, cancel := context.WithTimeout(ctx, c.Timeout)
	defer cancel()

	cl, err := c.connect(c.Local)
	if err != nil {
		return nil, err
	}
	defer cl.Close() //nolint:errcheck

	hw := &hostapi.Hardware{Architecture: runtime.GOARCH}

	if hw.Cpus, err = cpus(ctx, cl); err != nil {
		return nil, fmt.Errorf("reading the processors of %s: %w", c.Local, err)
	}

	if hw.MemoryBytes, err = memory(ctx, cl); err != nil {
		return nil, fmt.Errorf("reading the memory of %s: %w", c.Local, err)
	}

	if hw.Disks, err = disks(ctx, cl); err != nil {
		return nil, fmt.Errorf("reading the disks of %s: %w", c.Local, err)
	}

	return hw, nil
}

func cpus(ctx context.Context, cl *node) (uint32, error) {
	_, procs, err := listSpecs(ctx, cl, hardwareNamespace, processorType, func() *hardwarepb.ProcessorSpec { return &hardwarepb.ProcessorSpec{} })
	if err != nil {
		return 0, err
	}

	var n uint32
	for _, p := range procs {
		n += p.GetThreadCount()
	}

	if n > 0 {
		return n, nil
	}

	// No SMBIOS processor table (some VMs): the kernel's CPUs.
	stat, err := cl.machine.SystemStat(ctx, &emptypb.Empty{})
	if err != nil {
		return 0, fmt.Errorf("reading SystemStat: %w", err)
	}

	for _, m := range stat.GetMessages() {
		n += uint32(len(m.GetCpu())) //nolint:gosec // a CPU count
	}

	return n, nil
}

func memory(ctx context.Context, cl *node) (uint64, error) {
	_, modules, err := listSpecs(ctx, cl, hardwareNamespace, memoryModuleType, func() *hardwarepb.MemoryModuleSpec { return &hardwarepb.MemoryModuleSpec{} })
	if err != nil {
		return 0, err
	}

	var b uint64
	for _, m := range modules {
		b += uint64(m.GetSize()) * bytesPerMiB
	}

	if b > 0 {
		return b, nil
	}

	// No SMBIOS memory devices: the kernel's total.
	mem, err := cl.machine.Memory(ctx, &emptypb.Empty{})
	if err != nil {
		return 0, fmt.Errorf("reading Memory: %w", err)
	}

	for _, m := range mem.GetMessages() {
		b += m.GetMeminfo().GetMemtotal() * bytesPerKiB
	}

	return b, nil
}

func disks(ctx context.Context, cl *node) ([]*hostapi.Disk, error) {
	ids, specs, err := listSpecs(ctx, cl, blockNamespace, diskType, func() *blockpb.DiskSpec { return &blockpb.DiskSpec{} })
	if err != nil {
		return nil, err
	}

	var out []*hostapi.Disk

	for i, d := range specs {
		if strings.HasPrefix(ids[i], loopDevicePrefix) || d.GetCdrom() || d.GetReadonly() || d.GetSize() == 0 {
			continue
		}

		out = append(out, &hostapi.Disk{Name: ids[i], SizeBytes: d.GetSize(), Model: d.GetModel()})
	}

	sort.Slice(out, func(i, j int) bool { return out[i].GetName() < out[j].GetName() })

	return out, nil
}

// ApplyConfiguration implements host.Talos: it hands the machine
// configuration to the Local node's Talos, which validates it, stores it
// and reboots into it. Its errors never contain the configuration.
func (c *Client) ApplyConfiguration(ctx context.Context, config []byte) error {
	ctx, cancel := context.WithTimeout(ctx, c.Timeout)
	defer cancel()

	cl, err := c.connect(c.Local)
	if err != nil {
		return err
	}
	defer cl.Close() //nolint:errcheck

	if _, err := cl.machine.ApplyConfiguration(ctx, &machine.ApplyConfigurationRequest{
		Data: config, Mode: machine.ApplyConfigurationRequest_REBOOT,
	}); err != nil {
		return fmt.Errorf("calling Talos ApplyConfiguration on %s: %w", c.Local, err)
	}

	return nil
}

// Reset implements host.Talos: the Local node's Talos wipes STATE (its
// configuration) and EPHEMERAL on the system disk and reboots, without
// leaving etcd first (the cluster that owned the machine has let it go).
func (c *Client) Reset(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, c.Timeout)
	defer cancel()

	cl, err := c.connect(c.Local)
	if err != nil {
		return err
	}
	defer cl.Close() //nolint:errcheck

	if _, err := cl.machine.Reset(ctx, &machine.ResetRequest{
		Graceful: false,
		Reboot:   true,
		Mode:     machine.ResetRequest_SYSTEM_DISK,
		SystemPartitionsToWipe: []*machine.ResetPartitionSpec{
			{Label: hostPartitionState, Wipe: true},
			{Label: hostPartitionEphem, Wipe: true},
		},
	}); err != nil {
		return fmt.Errorf("calling Talos Reset on %s: %w", c.Local, err)
	}

	return nil
}

var _ hostctrl.Talos = (*Client)(nil)
