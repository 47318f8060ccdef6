package bootsim_test

import (
	"context"
	"crypto/tls"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/siderolabs/crypto/x509"
	machineapi "github.com/siderolabs/talos/pkg/machinery/api/machine"
	"github.com/siderolabs/talos/pkg/machinery/client"
	"github.com/siderolabs/talos/pkg/machinery/config/configloader"
	"github.com/siderolabs/talos/pkg/machinery/config/generate/secrets"
	"github.com/siderolabs/talos/pkg/machinery/config/machine"
	"github.com/siderolabs/talos/pkg/machinery/config/types/v1alpha1"
	"github.com/siderolabs/talos/pkg/machinery/role"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sovra-dev/sovra/internal/testutil"
	"github.com/sovra-dev/sovra/tests/talosfake/bootsim"
	"github.com/sovra-dev/sovra/tests/talosfake/bootsimtest"
)

type v1alpha1Config = v1alpha1.Config

// metalMode is the metal platform's validation mode.
type metalMode struct{}

func (metalMode) String() string        { return "metal" }
func (metalMode) RequiresInstall() bool { return true }
func (metalMode) InContainer() bool     { return false }

// TestInvalidConfigRefused: a configuration the machinery loader refuses
// (here: the metal platform requires install instructions) stops the boot
// with the loader's error, and the acquisition starts over after the
// controller's backoff (config/acquire.go): the machine never stores it,
// never serves the API.
func TestInvalidConfigRefused(t *testing.T) {
	testutil.RequireRoot(t)

	c := newCluster(t)
	ca := newTestCA(t)
	srv := newConfigServer(t, ca)
	uuid := bootsimtest.NewUUID(t)

	cfg := c.config(t, machine.TypeControlPlane, "https://127.0.0.1:6443")

	// Without machine.install: fine for the loader, refused in metal mode.
	provider, err := configloader.NewFromBytes(cfg)
	if err != nil {
		t.Fatal(err)
	}

	bad, err := provider.PatchV1Alpha1(func(c *v1alpha1Config) error { c.MachineConfig.MachineInstall = nil; return nil })
	if err != nil {
		t.Fatal(err)
	}

	badBytes, err := bad.Bytes()
	if err != nil {
		t.Fatal(err)
	}

	reloaded, err := configloader.NewFromBytes(badBytes)
	if err != nil {
		t.Fatal(err)
	}

	_, want := reloaded.Validate(metalMode{})
	if want == nil {
		t.Fatal("the test's configuration is valid")
	}

	srv.set(uuid, badBytes)

	m := bootsimtest.Start(t, bootsimtest.Options{UUID: uuid, Args: []string{
		"--api-port", strconv.Itoa(testutil.FreePort(t)), "--talos-config", srv.URL + "/config?uuid=${uuid}",
		"--roots", writeFile(t, "roots.pem", ca.PEM),
	}})

	st := m.WaitPhase(1, bootsim.PhaseConfigRefused, bootTimeout)
	if !strings.Contains(st.Error, want.Error()) || !strings.HasPrefix(st.Error, "failed to validate config acquired via platform metal: ") {
		t.Fatalf("refused with %q, want the loader's %q", st.Error, want)
	}

	// It tries again, and stays refused.
	fetches := len(srv.seen())
	deadline := time.Now().Add(10 * time.Second)

	for len(srv.seen()) <= fetches+1 {
		if time.Now().After(deadline) {
			t.Fatalf("no new attempt after the refusal: %v", srv.seen())
		}

		time.Sleep(100 * time.Millisecond)
	}

	if m.StoredConfig() != nil || len(m.Find(0, bootsim.MsgAPIServing)) != 0 {
		t.Fatal("a refused configuration was stored or served")
	}
}

// TestEmbeddedConfigFirst: an embedded configuration that is complete for
// boot comes before talos.config= (acquire.go's order), which is then
// never fetched.
func TestEmbeddedConfigFirst(t *testing.T) {
	testutil.RequireRoot(t)

	c := newCluster(t)
	ca := newTestCA(t)
	srv := newConfigServer(t, ca)
	uuid := bootsimtest.NewUUID(t)
	cfg := c.config(t, machine.TypeControlPlane, "https://127.0.0.1:6443")

	m := bootsimtest.Start(t, bootsimtest.Options{UUID: uuid, Args: []string{
		"--api-port", strconv.Itoa(testutil.FreePort(t)), "--trustd-port", strconv.Itoa(testutil.FreePort(t)),
		"--talos-config", srv.URL + "/config?uuid=${uuid}", "--roots", writeFile(t, "roots.pem", ca.PEM),
		"--embedded-config", writeFile(t, "embedded.yaml", cfg),
	}})

	if st := m.WaitPhase(1, bootsim.PhaseRunning, bootTimeout); st.ConfigSource != "embedded" {
		t.Fatalf("status %+v", st)
	}

	if got := srv.seen(); len(got) != 0 {
		t.Fatalf("talos.config= fetched despite the embedded configuration: %v", got)
	}

	if string(m.StoredConfig()) != string(cfg) {
		t.Fatal("the embedded configuration was not stored in STATE")
	}
}

// firewallDocs close the Talos API to the network (NetworkDefaultActionConfig
// ingress block), allowing it only from allow when it is set
// (NetworkRuleConfig).
func firewallDocs(port int, allow string) []string {
	docs := []string{"apiVersion: v1alpha1\nkind: NetworkDefaultActionConfig\ningress: block\n"}

	if allow != "" {
		docs = append(docs, `apiVersion: v1alpha1
kind: NetworkRuleConfig
name: talos-api
portSelector:
  ports: [`+strconv.Itoa(port)+`]
  protocol: tcp
ingress:
  - subnet: `+allow+`
`)
	}

	return docs
}

// clientFrom is an admin client whose connections come from source.
func (c *cluster) clientFrom(t *testing.T, endpoint, source string) *client.Client {
	t.Helper()

	dialer := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(source)}}

	cl, err := client.New(context.Background(), client.WithConfig(c.pki.Talosconfig), client.WithEndpoints(endpoint),
		client.WithGRPCDialOptions(grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return dialer.DialContext(ctx, "tcp", addr)
		})))
	if err != nil {
		t.Fatal(err)
	}

	t.Cleanup(func() { cl.Close() })

	return cl
}

// reachable reports whether a Version call from source gets an answer
// within a few seconds (a dropped connection gets none).
func (c *cluster) reachable(t *testing.T, endpoint, source string) bool {
	t.Helper()

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()

	_, err := c.clientFrom(t, endpoint, source).Version(ctx)

	return err == nil
}

// TestFirewall: with ingress blocked and no rule for the API's port, the
// Talos API answers the machine itself only (loopback and its own address
// go through lo); a NetworkRuleConfig for the port lets its subnet in; the
// default action accept opens it to all (nftables_chain_config.go). Rules
// apply without a reboot; v1alpha1 changes other than the allowed ones do
// not (CanApplyImmediate).
func TestFirewall(t *testing.T) {
	testutil.RequireRoot(t)

	c := newCluster(t)
	port := testutil.FreePort(t)
	uuid := bootsimtest.NewUUID(t)
	endpoint := "127.0.0.2:" + strconv.Itoa(port)
	closed := c.config(t, machine.TypeControlPlane, "https://127.0.0.1:6443", firewallDocs(port, "")...)

	m := bootsimtest.Start(t, bootsimtest.Options{UUID: uuid, Args: []string{
		"--address", "127.0.0.2/8", "--api-port", strconv.Itoa(port), "--trustd-port", strconv.Itoa(testutil.FreePort(t)),
		"--embedded-config", writeFile(t, "closed.yaml", closed),
	}})

	m.WaitPhase(1, bootsim.PhaseRunning, bootTimeout)

	if !c.reachable(t, "127.0.0.1:"+strconv.Itoa(port), "127.0.0.1") || !c.reachable(t, endpoint, "127.0.0.2") {
		t.Fatal("the machine cannot reach its own Talos API")
	}

	if c.reachable(t, endpoint, "127.0.0.3") {
		t.Fatal("the Talos API answered the network with ingress blocked")
	}

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	local := c.client(t, "127.0.0.1:"+strconv.Itoa(port))

	apply := func(cfg []byte, mode machineapi.ApplyConfigurationRequest_Mode) error {
		_, err := local.ApplyConfiguration(ctx, &machineapi.ApplyConfigurationRequest{Data: cfg, Mode: mode})

		return err
	}

	if err := apply(c.config(t, machine.TypeControlPlane, "https://127.0.0.1:6443", firewallDocs(port, "127.0.0.3/32")...), machineapi.ApplyConfigurationRequest_NO_REBOOT); err != nil {
		t.Fatal(err)
	}

	if !c.reachable(t, endpoint, "127.0.0.3") || c.reachable(t, endpoint, "127.0.0.4") {
		t.Fatal("the rule should let 127.0.0.3 in, and only it")
	}

	if err := apply(c.config(t, machine.TypeControlPlane, "https://127.0.0.1:6443"), machineapi.ApplyConfigurationRequest_AUTO); err != nil {
		t.Fatal(err)
	}

	if !c.reachable(t, endpoint, "127.0.0.4") {
		t.Fatal("ingress accept should open the API")
	}

	// A worker's configuration changes machine.type: not in immediate mode.
	err := apply(c.config(t, machine.TypeWorker, "https://127.0.0.1:6443"), machineapi.ApplyConfigurationRequest_NO_REBOOT)
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "can't be applied in immediate mode") {
		t.Fatalf("machine.type change without a reboot: %v", err)
	}

	if got := m.Status(); got.Boot != 1 || got.Phase != bootsim.PhaseRunning {
		t.Fatalf("no-reboot applies rebooted: %+v", got)
	}
}

// TestWorkerCertificateFromTrustd: a worker's Talos API certificate comes
// from the trustd of its control-plane endpoint (secrets/api.go
// generateWorker, trustd/internal/reg): until a control plane answers, the
// worker does not serve; then it does, and it accepts the client CAs
// trustd returned, not its own machine.acceptedCAs.
func TestWorkerCertificateFromTrustd(t *testing.T) {
	testutil.RequireRoot(t)

	c := newCluster(t)

	// A CA only the worker lists in machine.acceptedCAs.
	extra, err := x509.NewSelfSignedCertificateAuthority(x509.Organization("extra"))
	if err != nil {
		t.Fatal(err)
	}

	workerCfg, err := configloader.NewFromBytes(c.config(t, machine.TypeWorker, "https://127.0.0.2:6443"))
	if err != nil {
		t.Fatal(err)
	}

	workerCfg, err = workerCfg.PatchV1Alpha1(func(cfg *v1alpha1Config) error {
		cfg.MachineConfig.MachineAcceptedCAs = append(cfg.MachineConfig.MachineAcceptedCAs, &x509.PEMEncodedCertificate{Crt: extra.CrtPEM})

		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	workerBytes, err := workerCfg.Bytes()
	if err != nil {
		t.Fatal(err)
	}

	workerPort := testutil.FreePort(t)
	worker := bootsimtest.Start(t, bootsimtest.Options{Args: []string{
		"--address", "127.0.0.3/8", "--api-port", strconv.Itoa(workerPort), "--trustd-port", strconv.Itoa(testutil.FreePort(t)),
		"--embedded-config", writeFile(t, "worker.yaml", workerBytes),
	}})

	worker.WaitLog(0, bootTimeout, bootsim.MsgTrustdAsking)
	time.Sleep(2 * time.Second)

	if len(worker.Find(0, bootsim.MsgAPIServing)) != 0 {
		t.Fatal("the worker serves without a certificate")
	}

	// The control plane at the cluster endpoint, trustd on 50001.
	cp := bootsimtest.Start(t, bootsimtest.Options{Args: []string{
		"--address", "127.0.0.2/8", "--api-port", strconv.Itoa(testutil.FreePort(t)),
		"--embedded-config", writeFile(t, "cp.yaml", c.config(t, machine.TypeControlPlane, "https://127.0.0.2:6443")),
	}})

	cp.WaitPhase(1, bootsim.PhaseRunning, bootTimeout)
	worker.WaitLog(0, bootTimeout, bootsim.MsgTrustdCertified)
	worker.WaitLog(0, 10*time.Second, bootsim.MsgAPIServing)

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	if _, err := c.client(t, "127.0.0.3:"+strconv.Itoa(workerPort)).Version(ctx); err != nil {
		t.Fatalf("the cluster's admin on the worker: %v", err)
	}

	// An admin certificate of the CA only the worker accepts: refused.
	kp, err := secrets.NewAdminCertificateAndKey(time.Now().Add(-time.Minute), &x509.PEMEncodedCertificateAndKey{Crt: extra.CrtPEM, Key: extra.KeyPEM},
		role.MakeSet(role.Admin), time.Hour)
	if err != nil {
		t.Fatal(err)
	}

	cert, err := tls.X509KeyPair(kp.Crt, kp.Key)
	if err != nil {
		t.Fatal(err)
	}

	conn, err := tls.Dial("tcp", "127.0.0.3:"+strconv.Itoa(workerPort), &tls.Config{
		Certificates: []tls.Certificate{cert}, InsecureSkipVerify: true, //nolint:gosec // the server is not what is tested
	})
	if err == nil {
		_ = conn.SetReadDeadline(time.Now().Add(3 * time.Second))
		_, err = conn.Read(make([]byte, 1))
		conn.Close()
	}

	if err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("a client certificate of the worker's own accepted CA: %v, want refused", err)
	}
}

// TestInstallFromBootMedia: a machine booting installation media installs
// Talos in the first boot that has a configuration (STATE created, the
// configuration stored) and reboots from disk (v1alpha1_sequencer.go
// Install); a Reset with no partitions named wipes the whole system disk
// (ResetSystemDisk), so it boots the media and installs again.
func TestInstallFromBootMedia(t *testing.T) {
	testutil.RequireRoot(t)

	c := newCluster(t)
	ca := newTestCA(t)
	srv := newConfigServer(t, ca)
	uuid := bootsimtest.NewUUID(t)
	port := testutil.FreePort(t)
	srv.set(uuid, c.config(t, machine.TypeControlPlane, "https://127.0.0.1:6443"))

	m := bootsimtest.Start(t, bootsimtest.Options{UUID: uuid, Args: []string{
		"--boot-media", "--api-port", strconv.Itoa(port), "--trustd-port", strconv.Itoa(testutil.FreePort(t)),
		"--talos-config", srv.URL + "/config?uuid=${uuid}", "--roots", writeFile(t, "roots.pem", ca.PEM),
	}})

	if st := m.WaitPhase(2, bootsim.PhaseRunning, bootTimeout); st.ConfigSource != "state" {
		t.Fatalf("boot from disk: %+v", st)
	}

	if len(m.Find(0, bootsim.MsgInstalling, "boot=1")) != 1 || len(m.Find(0, bootsim.MsgAPIServing, "boot=1")) != 0 || len(srv.seen()) != 1 {
		t.Fatalf("the install boot should fetch once, install and not serve:\n%s", m.Tail(40))
	}

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	if err := c.client(t, "127.0.0.1:"+strconv.Itoa(port)).ResetGeneric(ctx, &machineapi.ResetRequest{Reboot: true, Graceful: true}); err != nil {
		t.Fatal(err)
	}

	m.WaitPhase(4, bootsim.PhaseRunning, bootTimeout)

	if len(m.Find(0, bootsim.MsgInstalling, "boot=3")) != 1 || len(srv.seen()) != 2 {
		t.Fatalf("after a system disk reset the machine should install again:\n%s", m.Tail(40))
	}
}
