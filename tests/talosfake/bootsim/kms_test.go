package bootsim_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	machineapi "github.com/siderolabs/talos/pkg/machinery/api/machine"
	"github.com/siderolabs/talos/pkg/machinery/config/machine"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"
	crlog "sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/attestation"
	"github.com/sovra-dev/sovra/internal/testutil"
	"github.com/sovra-dev/sovra/tests/sovradtest"
	"github.com/sovra-dev/sovra/tests/talosfake/bootsim"
	"github.com/sovra-dev/sovra/tests/talosfake/bootsimtest"
	"github.com/sovra-dev/sovra/tests/talosfake/volume"
)

// kms is a running bin/sovrad with its KMS on the node API's port.
type kms struct {
	*sovradtest.Daemon
	Addr   string
	NodeCA []byte
	kube   client.Client
}

// startKMS starts the built sovrad in lab mode (any node may Seal; only an
// enrolled, attested record's blobs are released).
func startKMS(t *testing.T) *kms {
	t.Helper()

	addr := "127.0.0.1:" + strconv.Itoa(testutil.FreePort(t))
	keyFile := filepath.Join(t.TempDir(), "secrets", "master.key")
	d := sovradtest.Start(t, filepath.Join(t.TempDir(), "data"),
		"--master-key-file", keyFile, "--node-listen", addr, "--controllers", "none", "--kms-lab-mode")

	ca, err := os.ReadFile(filepath.Join(d.DataDir, "node-ca.crt"))
	if err != nil {
		t.Fatal(err)
	}

	cfg, err := clientcmd.BuildConfigFromFlags("", d.Kubeconfig())
	if err != nil {
		t.Fatal(err)
	}

	cfg.ContentType = runtime.ContentTypeJSON

	crlog.SetLogger(logr.Discard())

	scheme, err := attestation.Scheme()
	if err != nil {
		t.Fatal(err)
	}

	kube, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}

	return &kms{Daemon: d, Addr: addr, NodeCA: ca, kube: kube}
}

// enroll creates the record of uuid as enrollment and a passing
// attestation would, so that the KMS releases the node's keys.
func (k *kms) enroll(t *testing.T, uuid string) {
	t.Helper()

	ek := sha256.Sum256([]byte(uuid))
	rec := &v1alpha1.SovraNode{
		ObjectMeta: metav1.ObjectMeta{Name: attestation.NodeName(hex.EncodeToString(ek[:]))},
		Spec: v1alpha1.SovraNodeSpec{
			EKHash: hex.EncodeToString(ek[:]), EKPublic: []byte("ek"), AKPublic: []byte("ak"),
			UUID: uuid, Hostname: "sim-" + uuid[:8], Addresses: []string{"127.0.0.1"},
		},
	}

	ctx := context.Background()
	if err := k.kube.Create(ctx, rec); err != nil {
		t.Fatal(err)
	}

	now := metav1.Now()
	for _, c := range []metav1.Condition{
		{Type: v1alpha1.ConditionEnrolled, Status: metav1.ConditionTrue, Reason: v1alpha1.ReasonActivated, LastTransitionTime: now},
		{Type: v1alpha1.ConditionAttested, Status: metav1.ConditionTrue, Reason: v1alpha1.ReasonAttestationPassed, LastTransitionTime: now},
	} {
		meta.SetStatusCondition(&rec.Status.Conditions, c)
	}

	rec.Status.LastAttestationResult = v1alpha1.ResultPassed
	rec.Status.LastAttestationTime = &now
	rec.Status.Reason = v1alpha1.ReasonAttestationPassed

	if err := k.kube.Status().Update(ctx, rec); err != nil {
		t.Fatal(err)
	}
}

// decisions counts the KMS's allowed decisions of op (Seal, Unseal) for
// uuid in its log after offset.
func (k *kms) decisions(offset int64, op, uuid string) int {
	n := 0

	sc := bufio.NewScanner(strings.NewReader(k.LogSince(offset)))
	sc.Buffer(make([]byte, 0, 1<<20), 1<<20)

	for sc.Scan() {
		var e map[string]any
		if json.Unmarshal(sc.Bytes(), &e) != nil || e["msg"] != "kms decision" {
			continue
		}

		if e["op"] == op && e["node_uuid"] == uuid && e["decision"] == "allowed" {
			n++
		}
	}

	return n
}

// kmsVolumes are VolumeConfig documents encrypting STATE and EPHEMERAL with
// the KMS at endpoint (EPHEMERAL's key locked to STATE), and the KMS's CA
// as a trusted root.
func kmsVolumes(endpoint string, nodeCA []byte) []string {
	var docs []string

	// EPHEMERAL is locked to STATE, as in sovrad's configurations.
	for label, lock := range map[string]string{"STATE": "false", "EPHEMERAL": "true"} {
		docs = append(docs, `apiVersion: v1alpha1
kind: VolumeConfig
name: `+label+`
encryption:
  provider: luks2
  keys:
    - slot: 0
      kms:
        endpoint: https://`+endpoint+`
      lockToState: `+lock+`
`)
	}

	return append(docs, `apiVersion: v1alpha1
kind: TrustedRootsConfig
name: kms
certificates: |
`+indent(string(nodeCA), "  "))
}

func indent(s, prefix string) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	for i, l := range lines {
		lines[i] = prefix + l
	}

	return strings.Join(lines, "\n") + "\n"
}

func stateBlob(t *testing.T, m *bootsimtest.Machine, dir string) []byte {
	t.Helper()

	blobs, err := volume.SealedBlobs(dir)
	if err != nil || len(blobs[0]) == 0 {
		t.Fatalf("sealed blob of %s: %v %v", dir, blobs, err)
	}

	return blobs[0]
}

// TestMachineLifeWithKMS: the life of a machine whose STATE and EPHEMERAL
// are encrypted with the KMS of the built sovrad, through the upstream KMS
// client. First boot: the configuration is fetched, STATE is created
// (Seal) and opened (Unseal), the configuration is stored in it, EPHEMERAL
// likewise (volumes/encrypt.go, encryption/encryption.go, keys/kms.go,
// config/persistence.go). ApplyConfiguration (reboot) stores the new
// configuration and reboots (v1alpha1_server.go): a new boot ID and time,
// STATE opened before any configuration with the settings of META 0x09
// (volume_config.go, volumeconfig/system_volumes.go), only Unseals, the
// extension service runs with the new ExtensionServiceConfig. Reset with
// STATE and EPHEMERAL wiped (ResetSystemDiskSpec) reboots into a machine
// that fetches talos.config= again and seals new volumes.
func TestMachineLifeWithKMS(t *testing.T) {
	testutil.RequireRoot(t)

	k := startKMS(t)
	c := newCluster(t)
	ca := newTestCA(t)
	srv := newConfigServer(t, ca)
	ext := probeExtension(t)
	uuid := bootsimtest.NewUUID(t)
	apiPort := testutil.FreePort(t)

	k.enroll(t, uuid)

	cfg1 := c.config(t, machine.TypeControlPlane, "https://127.0.0.1:6443", append(kmsVolumes(k.Addr, k.NodeCA), probeConfig("one"))...)
	cfg2 := c.config(t, machine.TypeControlPlane, "https://127.0.0.1:6443", append(kmsVolumes(k.Addr, k.NodeCA), probeConfig("two"))...)
	srv.set(uuid, cfg1)

	// The built-in roots hold the KMS's CA: STATE is opened before any
	// configuration, so its TrustedRootsConfig cannot help there.
	roots := writeFile(t, "roots.pem", append(append([]byte{}, ca.PEM...), k.NodeCA...))

	kmsOff := k.LogSize()
	m := bootsimtest.Start(t, bootsimtest.Options{UUID: uuid, Args: []string{
		"--api-port", strconv.Itoa(apiPort), "--trustd-port", strconv.Itoa(testutil.FreePort(t)),
		"--talos-config", srv.URL + "/config?uuid=${uuid}", "--roots", roots,
		"--device", "/dev/tpmrm0", "--extension", ext, "--volume-retry", "1s", "--stop-timeout", "5s",
	}})

	boot1 := m.WaitPhase(1, bootsim.PhaseRunning, bootTimeout)

	for _, label := range []string{"STATE", "EPHEMERAL"} {
		m.WaitLog(0, time.Second, bootsim.MsgSealed, "volume="+label, "boot=1")
		m.WaitLog(0, time.Second, bootsim.MsgUnsealed, "volume="+label, "boot=1")
	}

	if seals, unseals := k.decisions(kmsOff, "Seal", uuid), k.decisions(kmsOff, "Unseal", uuid); seals != 2 || unseals != 2 {
		t.Fatalf("first boot: %d Seals and %d Unseals, want 2 and 2 (STATE, EPHEMERAL)\n%s", seals, unseals, k.Tail(20))
	}

	if !bytes.Equal(m.StoredConfig(), cfg1) {
		t.Fatal("STATE does not hold the fetched configuration")
	}

	state1 := stateBlob(t, m, bootsim.StatePartition(m.Dir))
	stateBlob(t, m, bootsim.EphemeralPartition(m.Dir))

	metaTag, err := os.ReadFile(filepath.Join(bootsim.MetaDir(m.Dir), "0x09"))
	if err != nil || !strings.Contains(string(metaTag), k.Addr) {
		t.Fatalf("META 0x09 = %q %v: want STATE's KMS endpoint", metaTag, err)
	}

	if r := probeReport(t, m, 1); r.env("PROBE_GREETING") != "one" || r.BootID != boot1.BootID {
		t.Fatalf("boot 1 probe: %+v", r)
	}

	// ApplyConfiguration, mode reboot.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	cl := c.client(t, "127.0.0.1:"+strconv.Itoa(apiPort))

	off, kmsOff := m.LogSize(), k.LogSize()

	resp, err := cl.ApplyConfiguration(ctx, &machineapi.ApplyConfigurationRequest{Data: cfg2, Mode: machineapi.ApplyConfigurationRequest_REBOOT})
	if err != nil || resp.GetMessages()[0].GetMode() != machineapi.ApplyConfigurationRequest_REBOOT {
		t.Fatalf("apply: %v %v", resp, err)
	}

	boot2 := m.WaitPhase(2, bootsim.PhaseRunning, bootTimeout)

	if boot2.BootID == boot1.BootID || boot2.BootTime <= boot1.BootTime || boot2.ConfigSource != "state" {
		t.Fatalf("boot 2 %+v after boot 1 %+v", boot2, boot1)
	}

	if len(m.Find(off, bootsim.MsgSealed)) != 0 || len(m.Find(off, bootsim.MsgUnsealed, "volume=STATE", "boot=2")) != 1 {
		t.Fatalf("boot 2 sealed, or did not unseal STATE:\n%s", m.LogSince(off))
	}

	if seals, unseals := k.decisions(kmsOff, "Seal", uuid), k.decisions(kmsOff, "Unseal", uuid); seals != 0 || unseals != 2 {
		t.Fatalf("reboot: %d Seals and %d Unseals, want 0 and 2", seals, unseals)
	}

	if !strings.Contains(m.ExtensionLog(1, "probe"), "probe: terminated") {
		t.Fatalf("the boot 1 service was not stopped with SIGTERM:\n%s", m.ExtensionLog(1, "probe"))
	}

	if r := probeReport(t, m, 2); r.env("PROBE_GREETING") != "two" || r.BootID != boot2.BootID || r.Files["/etc/probe/greeting.txt"] != "two" {
		t.Fatalf("boot 2 probe: %+v", r)
	}

	if !bytes.Equal(m.StoredConfig(), cfg2) || !bytes.Equal(stateBlob(t, m, bootsim.StatePartition(m.Dir)), state1) {
		t.Fatal("after the reboot STATE should hold the applied configuration under the same sealed key")
	}

	// Reset, wiping STATE and EPHEMERAL: the machine starts over from
	// talos.config=.
	off, kmsOff = m.LogSize(), k.LogSize()
	fetches := len(srv.seen())
	cl = c.client(t, "127.0.0.1:"+strconv.Itoa(apiPort))

	err = cl.ResetGeneric(ctx, &machineapi.ResetRequest{Reboot: true, SystemPartitionsToWipe: []*machineapi.ResetPartitionSpec{
		{Label: "STATE", Wipe: true}, {Label: "EPHEMERAL", Wipe: true},
	}})
	if err != nil {
		t.Fatalf("reset: %v", err)
	}

	boot3 := m.WaitPhase(3, bootsim.PhaseRunning, bootTimeout)

	for _, msg := range []string{bootsim.MsgReset, bootsim.MsgStateMissing, bootsim.MsgFetchedConfig} {
		if len(m.Find(off, msg)) == 0 {
			t.Fatalf("no %q after the reset:\n%s", msg, m.LogSince(off))
		}
	}

	if len(srv.seen()) <= fetches || boot3.ConfigSource != "metal" {
		t.Fatalf("after the reset the machine did not fetch talos.config= again: %+v", boot3)
	}

	if seals := k.decisions(kmsOff, "Seal", uuid); seals != 2 {
		t.Fatalf("after the reset: %d Seals, want 2", seals)
	}

	if bytes.Equal(stateBlob(t, m, bootsim.StatePartition(m.Dir)), state1) || !bytes.Equal(m.StoredConfig(), cfg1) {
		t.Fatal("after the reset STATE should be new, with the fetched configuration")
	}

	// EPHEMERAL (/var) started empty: the service's state is gone.
	probeReport(t, m, 3)

	starts, err := os.ReadFile(filepath.Join(bootsim.EphemeralPartition(m.Dir), "data", "lib", "probe", "starts"))
	if err != nil || string(starts) != "1" {
		t.Fatalf("service state after the reset: %q %v", starts, err)
	}
}

// TestStateOpensWithBuiltInRootsOnly: on a reboot STATE is opened before
// any configuration is read, so its KMS call trusts only the built-in
// roots (trusted_roots.go writes the TrustedRootsConfig roots only once a
// configuration is loaded): a KMS whose CA is only in TrustedRootsConfig
// seals STATE on the first boot and never opens it again.
func TestStateOpensWithBuiltInRootsOnly(t *testing.T) {
	testutil.RequireRoot(t)

	k := startKMS(t)
	c := newCluster(t)
	ca := newTestCA(t)
	srv := newConfigServer(t, ca)
	uuid := bootsimtest.NewUUID(t)
	apiPort := testutil.FreePort(t)

	k.enroll(t, uuid)
	srv.set(uuid, c.config(t, machine.TypeControlPlane, "https://127.0.0.1:6443", kmsVolumes(k.Addr, k.NodeCA)...))

	m := bootsimtest.Start(t, bootsimtest.Options{UUID: uuid, Args: []string{
		"--api-port", strconv.Itoa(apiPort), "--trustd-port", strconv.Itoa(testutil.FreePort(t)),
		"--talos-config", srv.URL + "/config?uuid=${uuid}", "--roots", writeFile(t, "roots.pem", ca.PEM),
		"--volume-retry", "1s",
	}})

	m.WaitPhase(1, bootsim.PhaseRunning, bootTimeout)

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	if err := c.client(t, "127.0.0.1:"+strconv.Itoa(apiPort)).Reboot(ctx); err != nil {
		t.Fatal(err)
	}

	st := m.WaitPhase(2, bootsim.PhaseUnlockingState, bootTimeout)
	if !strings.Contains(st.Error, "certificate signed by unknown authority") {
		t.Fatalf("STATE waits for %q, want an unknown authority", st.Error)
	}

	// It keeps retrying (every --volume-retry) and stays locked.
	off := m.LogSize()
	m.WaitLog(off, 10*time.Second, bootsim.MsgVolumeFailed, "volume=STATE", "boot=2")

	if got := m.Status(); got.Phase != bootsim.PhaseUnlockingState {
		t.Fatalf("boot 2 went on without STATE: %+v", got)
	}
}
