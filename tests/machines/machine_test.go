package machines

import (
	"net/netip"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/sovra-dev/sovra/internal/testutil"
	"github.com/sovra-dev/sovra/tests/swtpmlab"
	"github.com/sovra-dev/sovra/tests/talosfake/bootsim"
	"github.com/sovra-dev/sovra/tests/talosfake/bootsimtest"
	"github.com/sovra-dev/sovra/tests/talosfake/volume"
)

// The simulated hardware of every machine: 4 cores, 8 GiB, one 100 GiB disk.
const (
	machineCPUs      = 4
	machineMemoryMiB = 8192
	machineDiskBytes = 100 << 30
)

// machine is one simulated Talos machine in its own namespace with its own
// swtpm, booting from talos.config=.
type machine struct {
	*bootsimtest.Machine
	ns   string
	addr netip.Addr
	tpm  swtpmlab.TPM
}

// startMachine boots machine number i (address .10+i) with the kernel
// argument talos.config=url; the Talos machine's built-in roots are the
// node CA (the stand-in for a public CA that signs the boot server's
// certificate). extra are more bootsim flags (e.g. "--environment",
// "KEY=VALUE": a talos.environment= kernel argument for the agent).
func startMachine(t testing.TB, n *network, d *daemon, tpm swtpmlab.TPM, i int, url string, extra ...string) *machine {
	t.Helper()

	return startMachineUUID(t, n, d, tpm, i, url, bootsimtest.NewUUID(t), extra...)
}

// startMachineUUID is startMachine with the machine's SMBIOS UUID given
// (to select it in a policy before it boots).
func startMachineUUID(t testing.TB, n *network, d *daemon, tpm swtpmlab.TPM, i int, url, uuid string, extra ...string) *machine {
	t.Helper()

	ns := n.addNamespace(firstMachine + i)
	addr := n.addr(firstMachine + i)
	spec := filepath.Join(testutil.RepoRoot(t), "extension", "sovra-agent.yaml")

	args := []string{
		"--address", addr.String() + "/24",
		"--talos-config", url, "--roots", d.NodeCAFile,
		"--environment", "SOVRA_TPM=swtpm:" + tpm.Addr, "--environment", "SOVRA_LOG_LEVEL=info",
		"--event-log", tpm.EventLog, "--device", "/dev/tpmrm0", "--secure-boot", "enabled",
		"--extension", spec + "=" + testutil.Bin(t, "sovra-agent"),
		"--cpu", strconv.Itoa(machineCPUs), "--memory-module", strconv.Itoa(machineMemoryMiB),
		"--disk", "/dev/sda=" + strconv.Itoa(machineDiskBytes) + ":SIMDISK",
		"--volume-retry", "2s", "--stop-timeout", "5s", "--restart-interval", "2s",
		"--download-attempt-timeout", "20s",
	}

	// The agent reads the SMBIOS UUID from /sys/class/dmi/id/product_uuid;
	// the machine running the tests may have no DMI table, and a
	// container's sysfs cannot be given one: the UUID is passed as a
	// talos.environment= kernel argument instead.
	args = append(args, "--environment", "SOVRA_NODE_UUID="+uuid)
	args = append(args, extra...)

	m := bootsimtest.Start(t, bootsimtest.Options{Netns: ns, UUID: uuid, Args: args})

	return &machine{Machine: m, ns: ns, addr: addr, tpm: tpm}
}

// agentLog is what the agent wrote in boot n.
func (m *machine) agentLog(boot int) string { return m.ExtensionLog(boot, "sovra-agent") }

// stateBlob is the KMS-sealed blob of the machine's STATE now.
func (m *machine) stateBlob(t testing.TB) []byte {
	t.Helper()

	blobs, err := volume.SealedBlobs(bootsim.StatePartition(m.Dir))
	if err != nil || len(blobs[0]) == 0 {
		t.Fatalf("the sealed blob of STATE of %s: %v %v", m.UUID, blobs, err)
	}

	return blobs[0]
}
