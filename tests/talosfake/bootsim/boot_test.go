package bootsim_test

import (
	"context"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cosi-project/runtime/pkg/resource/meta"
	"github.com/cosi-project/runtime/pkg/safe"
	"github.com/siderolabs/talos/pkg/machinery/config/machine"
	"github.com/siderolabs/talos/pkg/machinery/resources/block"
	"github.com/siderolabs/talos/pkg/machinery/resources/hardware"
	"github.com/siderolabs/talos/pkg/machinery/resources/network"

	"github.com/sovra-dev/sovra/internal/testutil"
	"github.com/sovra-dev/sovra/tests/talosfake/bootsim"
	"github.com/sovra-dev/sovra/tests/talosfake/bootsimtest"
)

const bootTimeout = 60 * time.Second

// TestBootFromConfigURL: a machine with nothing in STATE fetches
// talos.config= with its variables substituted only in query values
// (metal/url/url.go, variable.go), retries a 503 (pkg/download), loads the
// control-plane configuration, stores it in STATE (config/persistence.go),
// serves the Talos API with machine.ca (secrets/api.go), shows its hardware
// (hardware.Processor, MemoryModule, block.Disk) and addresses, and runs
// the extension service with its ExtensionServiceConfig's environment and
// files, read-only, in a container of its own (services/extension.go).
func TestBootFromConfigURL(t *testing.T) {
	testutil.RequireRoot(t)

	c := newCluster(t)
	ca := newTestCA(t)
	srv := newConfigServer(t, ca)
	ext := probeExtension(t)
	uuid := bootsimtest.NewUUID(t)
	apiPort := testutil.FreePort(t)

	cfg := c.config(t, machine.TypeControlPlane, "https://127.0.0.1:6443", probeConfig("hello"))
	srv.set(uuid, cfg)
	srv.failNext(1)

	// ${uuid} in the path stays as it is; query values are substituted,
	// in any case; the legacy empty ?uuid= is filled.
	configURL := srv.URL + "/boot/${uuid}/config?uuid=&u=${UUID}&mac=${mac}"
	eventLog := writeFile(t, "eventlog", []byte("EVENTLOG"))

	m := bootsimtest.Start(t, bootsimtest.Options{UUID: uuid, Args: slices.Concat(
		[]string{
			"--address", "127.0.0.2/8", "--api-port", strconv.Itoa(apiPort), "--trustd-port", strconv.Itoa(testutil.FreePort(t)),
			"--talos-config", configURL, "--roots", writeFile(t, "roots.pem", ca.PEM),
			"--mac", "52:54:00:12:34:56", "--event-log", eventLog, "--secure-boot", "enabled",
			"--environment", "SOVRA_TPM=swtpm:127.0.0.1:2321", "--environment", "PROBE_GREETING=from-kernel",
			"--extension", ext, "--stop-timeout", "3s",
		},
		bootsimtest.Flag("--cpu", "4:8:2400", "2"),
		bootsimtest.Flag("--memory-module", "8192", "4096"),
		bootsimtest.Flag("--disk", "/dev/sda=107374182400:QEMU HARDDISK", "/dev/nvme0n1=500000000000"),
		bootsimtest.Flag("--device", "/dev/tpmrm0"),
	)})

	st := m.WaitPhase(1, bootsim.PhaseRunning, bootTimeout)

	reqs := srv.seen()
	if len(reqs) < 2 {
		t.Fatalf("config requests %v: want a failed attempt, then a retry", reqs)
	}

	u, err := url.Parse(reqs[len(reqs)-1])
	if err != nil {
		t.Fatal(err)
	}

	if u.Path != "/boot/${uuid}/config" || u.Query().Get("uuid") != uuid || u.Query().Get("u") != uuid || u.Query().Get("mac") != "52:54:00:12:34:56" {
		t.Fatalf("fetched %s: want the path as it is and uuid, u and mac substituted", reqs[len(reqs)-1])
	}

	if st.ConfigSource != "metal" || st.UUID != uuid {
		t.Fatalf("status %+v", st)
	}

	m.WaitLog(0, time.Second, bootsim.MsgFetchedConfig)
	m.WaitLog(0, time.Second, bootsim.MsgConfigStored)

	if stored := m.StoredConfig(); string(stored) != string(cfg) {
		t.Fatalf("STATE holds another configuration:\n%s", stored)
	}

	// The Talos API, with the configuration's PKI, on 127.0.0.1 and the
	// machine's address.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	for _, host := range []string{"127.0.0.1", "127.0.0.2"} {
		cl := c.client(t, host+":"+strconv.Itoa(apiPort))

		v, err := cl.Version(ctx)
		if err != nil {
			t.Fatalf("Version on %s: %v", host, err)
		}

		if got := v.GetMessages()[0].GetVersion().GetArch(); got != "amd64" {
			t.Fatalf("arch %q", got)
		}
	}

	cl := c.client(t, "127.0.0.1:"+strconv.Itoa(apiPort))

	cpus, err := safe.StateListAll[*hardware.Processor](ctx, cl.COSI)
	if err != nil || cpus.Len() != 2 || cpus.Get(0).TypedSpec().CoreCount != 4 || cpus.Get(0).TypedSpec().ThreadCount != 8 {
		t.Fatalf("processors: %v %v", cpus, err)
	}

	mems, err := safe.StateListAll[*hardware.MemoryModule](ctx, cl.COSI)
	if err != nil || mems.Len() != 2 || mems.Get(0).TypedSpec().Size+mems.Get(1).TypedSpec().Size != 12288 {
		t.Fatalf("memory modules: %v %v", mems, err)
	}

	disks, err := safe.StateListAll[*block.Disk](ctx, cl.COSI)
	if err != nil || disks.Len() != 2 {
		t.Fatalf("disks: %v %v", disks, err)
	}

	sda, err := safe.StateGetByID[*block.Disk](ctx, cl.COSI, "sda")
	if err != nil || sda.TypedSpec().Size != 107374182400 || sda.TypedSpec().Model != "QEMU HARDDISK" {
		t.Fatalf("sda: %v %v", sda, err)
	}

	// talosctl get cpus|memorymodules|disks resolves the aliases through
	// the resource definitions.
	rds, err := safe.StateListAll[*meta.ResourceDefinition](ctx, cl.COSI)
	if err != nil {
		t.Fatal(err)
	}

	for alias, typ := range map[string]string{"cpus": hardware.ProcessorType, "memorymodules": hardware.MemoryModuleType, "disks": block.DiskType} {
		found := false

		for rd := range rds.All() {
			found = found || (rd.TypedSpec().Type == typ && slices.Contains(rd.TypedSpec().AllAliases, alias))
		}

		if !found {
			t.Fatalf("no resource definition resolves %q to %s", alias, typ)
		}
	}

	addrs, err := safe.StateGetByID[*network.NodeAddress](ctx, cl.COSI, network.NodeAddressCurrentID)
	if err != nil || len(addrs.TypedSpec().Addresses) != 1 || addrs.TypedSpec().Addresses[0].String() != "127.0.0.2/8" {
		t.Fatalf("node addresses: %v %v", addrs, err)
	}

	// The extension service: the environment of the kernel arguments, the
	// spec and the ExtensionServiceConfig (later ones win), its files
	// read-only, the machine's boot ID and boot time, PID 1.
	r := probeReport(t, m, 1)

	if r.Pid != 1 || r.BootID != st.BootID || r.BootTime != strconv.FormatInt(st.BootTime, 10) {
		t.Fatalf("probe: pid %d boot %s/%s, machine %s/%d", r.Pid, r.BootID, r.BootTime, st.BootID, st.BootTime)
	}

	if r.env("SOVRA_TPM") != "swtpm:127.0.0.1:2321" || r.env("PROBE_FROM_SPEC") != "spec" || r.env("PROBE_GREETING") != "hello" {
		t.Fatalf("probe environment %v", r.Env)
	}

	if r.Files["/etc/probe/greeting.txt"] != "hello" || r.Files["/sys/kernel/security/tpm0/binary_bios_measurements"] != "EVENTLOG" {
		t.Fatalf("probe files %v", r.Files)
	}

	if !strings.Contains(r.Writable["/etc/probe/greeting.txt"], "read-only file system") {
		t.Fatalf("config file writable: %v", r.Writable)
	}

	// containerd masks /sys/firmware: the efivars mount is not visible.
	if len(r.Firmware) != 0 {
		t.Fatalf("/sys/firmware in the container: %v", r.Firmware)
	}

	if !slices.Contains(r.Root, "probe") || slices.Contains(r.Root, "home") {
		t.Fatalf("container root %v: want the extension's root filesystem", r.Root)
	}
}

// TestRealAgentExtension: the real bin/sovra-agent runs as ext-sovra-agent
// from its real service spec (extension/sovra-agent.yaml): its
// ExtensionServiceConfig's environment and files, its state directory on
// EPHEMERAL (/var/lib/sovra-agent), and SIGTERM as PID 1 of its container
// when the machine reboots.
func TestRealAgentExtension(t *testing.T) {
	testutil.RequireRoot(t)

	c := newCluster(t)
	apiPort := testutil.FreePort(t)
	agentCfg := `apiVersion: v1alpha1
kind: ExtensionServiceConfig
name: sovra-agent
configFiles:
  - mountPath: /etc/sovra/talosconfig
    content: |
` + indent(talosconfigYAML(t, c), "      ") + `environment:
  - SOVRA_LOG_LEVEL=debug
  - SOVRA_TALOS_API_PORT=` + strconv.Itoa(apiPort) + `
`
	spec := filepath.Join(testutil.RepoRoot(t), "extension", "sovra-agent.yaml")

	m := bootsimtest.Start(t, bootsimtest.Options{Args: []string{
		"--api-port", strconv.Itoa(apiPort), "--trustd-port", strconv.Itoa(testutil.FreePort(t)),
		"--embedded-config", writeFile(t, "cfg.yaml", c.config(t, machine.TypeControlPlane, "https://127.0.0.1:6443", agentCfg)),
		"--device", "/dev/tpmrm0", "--extension", spec + "=" + testutil.Bin(t, "sovra-agent"), "--stop-timeout", "5s",
	}})

	m.WaitPhase(1, bootsim.PhaseRunning, bootTimeout)

	status := filepath.Join(bootsim.EphemeralPartition(m.Dir), "data", "lib", "sovra-agent", "status.json")
	deadline := time.Now().Add(30 * time.Second)

	for {
		if _, err := os.Stat(status); err == nil && strings.Contains(m.ExtensionLog(1, "sovra-agent"), "sovra-agent starting") {
			break
		}

		if time.Now().After(deadline) {
			t.Fatalf("the agent did not start or write its status on EPHEMERAL:\n%s\n%s", m.ExtensionLog(1, "sovra-agent"), m.Tail(20))
		}

		time.Sleep(100 * time.Millisecond)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	if err := c.client(t, "127.0.0.1:"+strconv.Itoa(apiPort)).Reboot(ctx); err != nil {
		t.Fatal(err)
	}

	m.WaitPhase(2, bootsim.PhaseRunning, bootTimeout)

	if log := m.ExtensionLog(1, "sovra-agent"); !strings.Contains(log, "sovra-agent stopped") {
		t.Fatalf("the agent did not stop gracefully on the reboot:\n%s", log)
	}
}

// talosconfigYAML is the cluster's admin talosconfig.
func talosconfigYAML(t *testing.T, c *cluster) string {
	t.Helper()

	b, err := c.pki.Talosconfig.Bytes()
	if err != nil {
		t.Fatal(err)
	}

	return string(b)
}
