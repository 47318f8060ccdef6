package talosfake_test

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/siderolabs/crypto/x509"
	"github.com/siderolabs/talos/pkg/machinery/client"
	clientconfig "github.com/siderolabs/talos/pkg/machinery/client/config"
	"github.com/siderolabs/talos/pkg/machinery/config/generate/secrets"
	machinetype "github.com/siderolabs/talos/pkg/machinery/config/machine"
	"github.com/siderolabs/talos/pkg/machinery/role"

	"github.com/sovra-dev/sovra/tests/talosfake"
)

// TestAcceptedCAs: like machine.acceptedCAs in Talos, a client certificate
// of an accepted CA is let in; one of another CA is not.
func TestAcceptedCAs(t *testing.T) {
	pki, err := talosfake.NewPKI("fake")
	if err != nil {
		t.Fatal(err)
	}

	agentCA := newCA(t)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}

	serveNode(t, talosfake.Options{
		Address: netip.MustParseAddr("127.0.0.1"), CA: pki.CA, MachineType: machinetype.TypeWorker,
		BootTime: time.Unix(1_700_000_000, 0), AcceptedCAs: []*x509.PEMEncodedCertificate{{Crt: agentCA.Crt}},
	}, lis)

	for name, c := range map[string]struct {
		ca *x509.PEMEncodedCertificateAndKey
		ok bool
	}{"accepted CA": {agentCA, true}, "unknown CA": {newCA(t), false}} {
		t.Run(name, func(t *testing.T) {
			cert, err := secrets.NewAdminCertificateAndKey(time.Now(), c.ca, role.MakeSet(role.Admin), time.Hour)
			if err != nil {
				t.Fatal(err)
			}

			cl, err := client.New(context.Background(), client.WithEndpoints(lis.Addr().String()),
				client.WithConfig(clientconfig.NewConfig("agent", []string{"127.0.0.1"}, pki.CA.Crt, cert)))
			if err != nil {
				t.Fatal(err)
			}
			defer cl.Close() //nolint:errcheck

			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()

			if _, err := cl.Version(ctx); (err == nil) != c.ok {
				t.Fatalf("Version: %v, want it to succeed: %v", err, c.ok)
			}
		})
	}
}

func newCA(t *testing.T) *x509.PEMEncodedCertificateAndKey {
	t.Helper()

	ca, err := secrets.NewTalosCA(time.Now())
	if err != nil {
		t.Fatal(err)
	}

	return x509.NewCertificateAndKeyFromCertificateAuthority(ca)
}
