package talosfake

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"github.com/siderolabs/talos/pkg/machinery/resources/block"
	"github.com/siderolabs/talos/pkg/machinery/resources/hardware"
	"github.com/siderolabs/talos/pkg/machinery/role"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/emptypb"
)

// bytesPerMiB converts the SMBIOS memory module size.
const (
	bytesPerMiB = 1 << 20
	bytesPerKiB = 1 << 10
	// squashfsLoop is the loop device Talos mounts its root filesystem
	// from; Talos lists it among its Disks.
	squashfsLoop = "loop0"
)

// Hardware describes a fake node's machine, as Talos publishes it:
// hardware.Processor and hardware.MemoryModule (from SMBIOS) and
// block.Disk, as pkg/machinery/resources/{hardware,block} of Talos v1.13
// define them.
type Hardware struct {
	// Sockets are the processors; each has ThreadsPerSocket threads.
	Sockets, ThreadsPerSocket int
	// MemoryMiB is the memory, in one module.
	MemoryMiB int
	// Disks are the machine's disks; the fake adds Talos's loop0.
	Disks []Disk
}

// Disk is one block.Disk.
type Disk struct {
	// Name is the device name (the resource ID), e.g. vda.
	Name      string
	SizeBytes uint64
	Model     string
	CDROM     bool
}

// ApplyCall is one accepted ApplyConfiguration.
type ApplyCall struct {
	Time time.Time
	// Data is the machine configuration.
	Data []byte
	Mode machine.ApplyConfigurationRequest_Mode
}

// ResetCall is one accepted Reset.
type ResetCall struct {
	Time    time.Time
	Request *machine.ResetRequest
}

// publishHardware creates the hardware and block resources of hw.
func (n *Node) publishHardware(hw *Hardware) error {
	if hw == nil {
		return nil
	}

	ctx := context.Background()

	for i := range hw.Sockets {
		p := hardware.NewProcessorInfo("CPU-" + strconv.Itoa(i))
		p.TypedSpec().Socket = "CPU " + strconv.Itoa(i)
		p.TypedSpec().ThreadCount = uint32(hw.ThreadsPerSocket) //nolint:gosec
		p.TypedSpec().CoreCount = uint32(hw.ThreadsPerSocket)   //nolint:gosec

		if err := n.state.Create(ctx, p); err != nil {
			return fmt.Errorf("creating the processor resource: %w", err)
		}
	}

	if hw.MemoryMiB > 0 {
		m := hardware.NewMemoryModuleInfo("DIMM-0")
		m.TypedSpec().Size = uint32(hw.MemoryMiB) //nolint:gosec

		if err := n.state.Create(ctx, m); err != nil {
			return fmt.Errorf("creating the memory module resource: %w", err)
		}
	}

	disks := append([]Disk{{Name: squashfsLoop, SizeBytes: 64 * bytesPerMiB}}, hw.Disks...)
	for _, d := range disks {
		r := block.NewDisk(block.NamespaceName, d.Name)
		r.TypedSpec().DevPath = "/dev/" + d.Name
		r.TypedSpec().SetSize(d.SizeBytes)
		r.TypedSpec().Model, r.TypedSpec().CDROM = d.Model, d.CDROM
		r.TypedSpec().Readonly = d.Name == squashfsLoop || d.CDROM

		if err := n.state.Create(ctx, r); err != nil {
			return fmt.Errorf("creating the disk resource %s: %w", d.Name, err)
		}
	}

	return nil
}

// Memory implements machine.MachineServiceServer: the total of Hardware.
func (n *Node) Memory(context.Context, *emptypb.Empty) (*machine.MemoryResponse, error) {
	var total uint64
	if n.opts.Hardware != nil {
		total = uint64(n.opts.Hardware.MemoryMiB) * bytesPerMiB / bytesPerKiB //nolint:gosec
	}

	return &machine.MemoryResponse{Messages: []*machine.Memory{{Metadata: n.metadata(), Meminfo: &machine.MemInfo{Memtotal: total}}}}, nil
}

// recordApply is ApplyConfiguration without a Lifecycle: it needs
// os:admin, records the call and hands it to OnApply.
func (n *Node) recordApply(ctx context.Context, req *machine.ApplyConfigurationRequest) (*machine.ApplyConfigurationResponse, error) {
	if !hasRole(ctx, role.Admin) {
		return nil, status.Error(codes.PermissionDenied, "not authorized")
	}

	if len(req.GetData()) == 0 {
		return nil, status.Error(codes.InvalidArgument, "failed to parse config: empty configuration")
	}

	call := ApplyCall{Time: time.Now(), Data: slices.Clone(req.GetData()), Mode: req.GetMode()}

	n.mu.Lock()
	n.applies = append(n.applies, call)
	n.mu.Unlock()

	n.opts.Logger.Info("ApplyConfiguration", zap.Stringer("mode", call.Mode), zap.Int("bytes", len(call.Data)))

	if n.opts.OnApply != nil {
		if err := n.opts.OnApply(call); err != nil {
			return nil, status.Error(codes.InvalidArgument, err.Error())
		}
	}

	return &machine.ApplyConfigurationResponse{Messages: []*machine.ApplyConfiguration{{
		Metadata: n.metadata(), Mode: call.Mode, ModeDetails: "Applied configuration with a reboot",
	}}}, nil
}

// recordReset is Reset without a Lifecycle: it needs os:admin, refuses the
// combinations machined refuses (system partitions with USER_DISKS, user
// disks with SYSTEM_DISK), records the call and hands it to OnReset.
func (n *Node) recordReset(ctx context.Context, req *machine.ResetRequest) (*machine.ResetResponse, error) {
	if !hasRole(ctx, role.Admin) {
		return nil, status.Error(codes.PermissionDenied, "not authorized")
	}

	if len(req.GetSystemPartitionsToWipe()) > 0 && req.GetMode() == machine.ResetRequest_USER_DISKS {
		return nil, status.Error(codes.InvalidArgument, "reset failed: invalid input, wipe mode USER_DISKS doesn't support SystemPartitionsToWipe parameter")
	}

	if len(req.GetUserDisksToWipe()) > 0 && req.GetMode() == machine.ResetRequest_SYSTEM_DISK {
		return nil, status.Error(codes.InvalidArgument, "reset failed: invalid input, wipe mode SYSTEM_DISK doesn't support UserDisksToWipe parameter")
	}

	call := ResetCall{Time: time.Now(), Request: proto.CloneOf(req)}

	n.mu.Lock()
	n.resets = append(n.resets, call)
	n.mu.Unlock()

	n.opts.Logger.Info("Reset", zap.Bool("graceful", req.GetGraceful()), zap.Bool("reboot", req.GetReboot()))

	if n.opts.OnReset != nil {
		n.opts.OnReset(call)
	}

	return &machine.ResetResponse{Messages: []*machine.Reset{{Metadata: n.metadata(), ActorId: "talosfake"}}}, nil
}

// ApplyCalls returns the accepted ApplyConfiguration calls.
func (n *Node) ApplyCalls() []ApplyCall {
	n.mu.Lock()
	defer n.mu.Unlock()

	return slices.Clone(n.applies)
}

// ResetCalls returns the accepted Reset calls.
func (n *Node) ResetCalls() []ResetCall {
	n.mu.Lock()
	defer n.mu.Unlock()

	return slices.Clone(n.resets)
}
