package machineconfig

import (
	"context"
	"crypto/tls"
	stdx509 "crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"net"
	"testing"
	"time"

	"github.com/siderolabs/crypto/x509"
	clientconfig "github.com/siderolabs/talos/pkg/machinery/client/config"
	coreconfig "github.com/siderolabs/talos/pkg/machinery/config/config"
	"github.com/siderolabs/talos/pkg/machinery/config/machine"
	"github.com/siderolabs/talos/pkg/machinery/role"
)

// agentTalosconfigOf returns the talosconfig the agent's service mounts.
func agentTalosconfigOf(t *testing.T, cfg coreconfig.Config) []byte {
	t.Helper()
	for _, svc := range cfg.ExtensionServiceConfigs() {
		for _, f := range svc.ConfigFiles() {
			if f.MountPath() == TalosconfigPath {
				return []byte(f.Content())
			}
		}
	}
	t.Fatal("no talosconfig in the agent's service")
	return nil
}

// handshake runs a TLS handshake between the agent, with talosconfig, and
// an apid-like server of 127.0.0.1 whose certificate serverCA issued and
// which accepts client certificates of clientCAs, as Talos's apid does
// (machine.ca and machine.acceptedCAs).
func handshake(t *testing.T, talosconfig []byte, serverCA *x509.PEMEncodedCertificateAndKey, clientCAs ...[]byte) error {
	t.Helper()
	tc, err := clientconfig.FromBytes(talosconfig)
	if err != nil {
		t.Fatal(err)
	}
	ctx := tc.Contexts[tc.Context]
	dec := func(s string) []byte {
		b, err := base64.StdEncoding.DecodeString(s)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	clientCert, err := tls.X509KeyPair(dec(ctx.Crt), dec(ctx.Key))
	if err != nil {
		t.Fatal(err)
	}
	roots := stdx509.NewCertPool()
	roots.AppendCertsFromPEM(dec(ctx.CA))

	authority, err := x509.NewCertificateAuthorityFromCertificateAndKey(serverCA)
	if err != nil {
		t.Fatal(err)
	}
	kp, err := x509.NewKeyPair(authority, x509.CommonName("apid"), x509.IPAddresses([]net.IP{net.IPv4(127, 0, 0, 1)}),
		x509.NotAfter(time.Now().Add(time.Hour)), x509.ExtKeyUsage([]stdx509.ExtKeyUsage{stdx509.ExtKeyUsageServerAuth}))
	if err != nil {
		t.Fatal(err)
	}
	accepted := stdx509.NewCertPool()
	for _, ca := range clientCAs {
		accepted.AppendCertsFromPEM(ca)
	}

	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close() //nolint:errcheck
	done := make(chan error, 1)
	go func() {
		conn, err := lis.Accept()
		if err != nil {
			done <- err
			return
		}
		defer conn.Close() //nolint:errcheck
		_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
		done <- tls.Server(conn, &tls.Config{Certificates: []tls.Certificate{*kp.Certificate}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: accepted}).Handshake()
	}()
	d := tls.Dialer{Config: &tls.Config{RootCAs: roots, ServerName: "127.0.0.1", Certificates: []tls.Certificate{clientCert}}}
	dialCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := d.DialContext(dialCtx, "tcp", lis.Addr().String())
	if err != nil {
		return err
	}
	defer conn.Close() //nolint:errcheck
	// TLS 1.3: the server checks the client's certificate after the
	// client's handshake completes; a read surfaces its verdict.
	_ = conn.SetReadDeadline(time.Now().Add(time.Second))
	_, _ = conn.Read(make([]byte, 1))
	return <-done
}

// TestAgentReachesItsTalosAPI: in the enrollment and in a released
// configuration, the agent's talosconfig verifies apid's certificate (of the
// machine's Talos CA) and apid accepts the agent's certificate.
func TestAgentReachesItsTalosAPI(t *testing.T) {
	var e Enroller
	b, err := e.Config(daemon, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	enrollment, err := Load(b)
	if err != nil {
		t.Fatal(err)
	}
	osCA := enrollment.RawV1Alpha1().MachineConfig.MachineCA
	if err := handshake(t, agentTalosconfigOf(t, enrollment), osCA, osCA.Crt); err != nil {
		t.Fatalf("enrollment configuration: %v", err)
	}

	bundle, bootstrap := bootstrapOf(t, machine.TypeWorker)
	agentCA, err := NewAgentCA(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	merged, err := Merge(bootstrap, Released{Daemon: daemon, ProviderID: "sovra://ek-abc", Generation: 1, AgentCA: agentCA})
	if err != nil {
		t.Fatal(err)
	}
	released, err := Load(merged)
	if err != nil {
		t.Fatal(err)
	}
	if err := handshake(t, agentTalosconfigOf(t, released), bundle.Certs.OS, bundle.Certs.OS.Crt, agentCA.Crt); err != nil {
		t.Fatalf("released configuration: %v", err)
	}
}

// rolesOf returns the roles of the client certificate in a talosconfig
// (Talos reads them from the subject's organizations, pkg/machinery/role).
func rolesOf(t *testing.T, talosconfig []byte) role.Set {
	t.Helper()
	tc, err := clientconfig.FromBytes(talosconfig)
	if err != nil {
		t.Fatal(err)
	}
	crt, err := base64.StdEncoding.DecodeString(tc.Contexts[tc.Context].Crt)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(crt)
	if block == nil {
		t.Fatal("the agent's certificate is not PEM")
	}
	cert, err := stdx509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	roles, unknown := role.Parse(cert.Subject.Organization)
	if len(unknown) > 0 {
		t.Fatalf("unknown roles %v in the agent's certificate", unknown)
	}
	return roles
}

// TestWorkerAgentIsReader: with AgentReadOnly (a worker, whose agent's
// certificate is of the cluster's Talos CA), the agent's certificate is
// os:reader only and still reaches the worker's apid, which accepts only
// the cluster's Talos CA; the CA is not added to machine.acceptedCAs.
// Without it (a control plane), the certificate is os:admin of the host's
// own agent CA, which machine.acceptedCAs lists.
func TestWorkerAgentIsReader(t *testing.T) {
	bundle, bootstrap := bootstrapOf(t, machine.TypeWorker)

	merged, err := Merge(bootstrap, Released{Daemon: daemon, ProviderID: "sovra://ek-abc", Generation: 1, AgentCA: bundle.Certs.OS, AgentReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	released, err := Load(merged)
	if err != nil {
		t.Fatal(err)
	}
	tc := agentTalosconfigOf(t, released)
	if got := rolesOf(t, tc); !got.Includes(role.Reader) || got.IncludesAny(role.MakeSet(role.Admin, role.Operator, role.Impersonator, role.EtcdBackup)) {
		t.Fatalf("a worker's agent certificate has roles %v, want os:reader only", got.Strings())
	}
	if n := len(released.RawV1Alpha1().MachineConfig.MachineAcceptedCAs); n != 0 {
		t.Fatalf("the worker's machine.acceptedCAs has %d CAs, want none added", n)
	}
	if err := handshake(t, tc, bundle.Certs.OS, bundle.Certs.OS.Crt); err != nil {
		t.Fatalf("the worker's apid refused its agent: %v", err)
	}

	agentCA, err := NewAgentCA(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	merged, err = Merge(bootstrap, Released{Daemon: daemon, ProviderID: "sovra://ek-abc", Generation: 1, AgentCA: agentCA})
	if err != nil {
		t.Fatal(err)
	}
	if released, err = Load(merged); err != nil {
		t.Fatal(err)
	}
	if got := rolesOf(t, agentTalosconfigOf(t, released)); !got.Includes(role.Admin) {
		t.Fatalf("a control plane's agent certificate has roles %v, want os:admin", got.Strings())
	}
}
