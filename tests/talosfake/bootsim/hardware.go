package bootsim

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"

	"github.com/cosi-project/runtime/pkg/resource"
	"github.com/siderolabs/talos/pkg/machinery/nethelpers"
	"github.com/siderolabs/talos/pkg/machinery/resources/block"
	"github.com/siderolabs/talos/pkg/machinery/resources/hardware"
	"github.com/siderolabs/talos/pkg/machinery/resources/network"
	"github.com/siderolabs/talos/pkg/machinery/resources/runtime"
)

// Names of the simulated machine's network links.
const (
	linkName     = "eth0"
	loopbackName = "lo"
)

// Hardware is what the machine's hardware controllers would read from
// SMBIOS and the disks: `talosctl get systeminformation|cpus|memorymodules|
// disks` shows it.
type Hardware struct {
	// Arch is the machine's architecture (Version); empty means amd64.
	Arch string
	// Manufacturer and ProductName are SMBIOS system information.
	Manufacturer, ProductName string
	// Processors are the sockets (hardware.Processor).
	Processors []hardware.ProcessorSpec
	// MemoryModules are the DIMMs (hardware.MemoryModule, sizes in MiB).
	MemoryModules []hardware.MemoryModuleSpec
	// Disks are the block devices (block.Disk); DevPath is their path.
	Disks []block.DiskSpec
}

// resources are the COSI resources of the machine's hardware, network and
// META at boot: what its controllers would have produced by then.
func (m *Machine) resources(uuid, hostname string, metaTags map[uint8]string) []resource.Resource {
	cfg := m.cfg

	si := hardware.NewSystemInformation(hardware.SystemInformationID)
	*si.TypedSpec() = hardware.SystemInformationSpec{
		Manufacturer: cfg.Hardware.Manufacturer, ProductName: cfg.Hardware.ProductName,
		SerialNumber: cfg.Serial, UUID: uuid,
	}

	res := []resource.Resource{si}

	for i, p := range cfg.Hardware.Processors {
		r := hardware.NewProcessorInfo("CPU-" + strconv.Itoa(i))
		*r.TypedSpec() = p

		if r.TypedSpec().Socket == "" {
			r.TypedSpec().Socket = "CPU " + strconv.Itoa(i)
		}

		res = append(res, r)
	}

	for i, mm := range cfg.Hardware.MemoryModules {
		r := hardware.NewMemoryModuleInfo("DIMM-" + strconv.Itoa(i))
		*r.TypedSpec() = mm

		if r.TypedSpec().DeviceLocator == "" {
			r.TypedSpec().DeviceLocator = "DIMM " + strconv.Itoa(i)
		}

		res = append(res, r)
	}

	for _, d := range cfg.Hardware.Disks {
		r := block.NewDisk(block.NamespaceName, diskID(d.DevPath))
		*r.TypedSpec() = d

		if r.TypedSpec().PrettySize == "" {
			r.TypedSpec().PrettySize = prettySize(d.Size)
		}

		res = append(res, r)
	}

	if len(cfg.MAC) > 0 {
		hw := network.NewHardwareAddr(network.NamespaceName, network.FirstHardwareAddr)
		hw.TypedSpec().Name = linkName
		hw.TypedSpec().HardwareAddr = nethelpers.HardwareAddr(cfg.MAC)
		res = append(res, hw)
	}

	hn := network.NewHostnameStatus(network.NamespaceName, network.HostnameID)
	hn.TypedSpec().Hostname = hostname
	res = append(res, hn)

	res = append(res, m.addressResources()...)

	st := network.NewStatus(network.NamespaceName, network.StatusID)
	*st.TypedSpec() = network.StatusSpec{AddressReady: true, ConnectivityReady: true, HostnameReady: true, EtcFilesReady: true}
	res = append(res, st)

	for tag, value := range metaTags {
		k := runtime.NewMetaKey(runtime.NamespaceName, runtime.MetaKeyTagToID(tag))
		k.TypedSpec().Value = value
		res = append(res, k)
	}

	return res
}

// addressResources are the addresses of the loopback and the machine's
// link, and the node addresses derived from them.
func (m *Machine) addressResources() []resource.Resource {
	lo := netip.MustParsePrefix("127.0.0.1/8")
	addr := m.cfg.Address

	var res []resource.Resource

	for _, a := range []struct {
		prefix netip.Prefix
		link   string
		scope  nethelpers.Scope
	}{{lo, loopbackName, nethelpers.ScopeHost}, {addr, linkName, nethelpers.ScopeGlobal}} {
		if !a.prefix.IsValid() || (a.link == linkName && a.prefix.Addr() == lo.Addr()) {
			continue
		}

		r := network.NewAddressStatus(network.NamespaceName, network.AddressID(a.link, a.prefix))
		*r.TypedSpec() = network.AddressStatusSpec{
			Address: a.prefix, Local: a.prefix.Addr(), LinkName: a.link,
			Family: nethelpers.FamilyInet4, Scope: a.scope, Flags: nethelpers.AddressFlags(nethelpers.AddressPermanent),
		}

		if a.prefix.Addr().Is6() {
			r.TypedSpec().Family = nethelpers.FamilyInet6
		}

		res = append(res, r)
	}

	if addr.IsValid() && addr.Addr() != lo.Addr() {
		for _, id := range []string{network.NodeAddressDefaultID, network.NodeAddressCurrentID, network.NodeAddressRoutedID, network.NodeAddressAccumulativeID} {
			r := network.NewNodeAddress(network.NamespaceName, id)
			r.TypedSpec().Addresses = []netip.Prefix{addr}
			res = append(res, r)
		}
	}

	return res
}

// diskID is a disk resource's ID: the device's name (/dev/sda: sda).
func diskID(devPath string) string { return devPath[strings.LastIndex(devPath, "/")+1:] }

// prettySize is a size as Talos shows it (humanize.Bytes: 1000-based).
func prettySize(size uint64) string {
	const unit = 1000

	units := []string{"B", "kB", "MB", "GB", "TB", "PB"}
	f := float64(size)
	i := 0

	for f >= unit && i < len(units)-1 {
		f /= unit
		i++
	}

	if i == 0 {
		return fmt.Sprintf("%d B", size)
	}

	return fmt.Sprintf("%.0f %s", f, units[i])
}

// hostnameFor is the machine's hostname when its configuration sets none:
// stable per machine, as Talos derives one.
func hostnameFor(uuid string, mac net.HardwareAddr) string {
	if len(mac) >= 3 {
		return fmt.Sprintf("talos-%02x%02x%02x", mac[len(mac)-3], mac[len(mac)-2], mac[len(mac)-1])
	}

	if len(uuid) >= 6 {
		return "talos-" + uuid[len(uuid)-6:]
	}

	return "talos"
}
