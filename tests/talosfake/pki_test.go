package talosfake_test

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	clientconfig "github.com/siderolabs/talos/pkg/machinery/client/config"
	talosconfig "github.com/siderolabs/talos/pkg/machinery/config"
	"github.com/siderolabs/talos/pkg/machinery/config/generate/secrets"
	"github.com/siderolabs/talos/pkg/machinery/role"
	"go.yaml.in/yaml/v4"

	"github.com/sovra-dev/sovra/tests/talosfake"
)

// TestPKIFromBundle loads a secrets bundle as the Cluster API bootstrap
// provider stores it, and checks that fakes made from it trust the
// talosconfig the providers would make from the same bundle.
func TestPKIFromBundle(t *testing.T) {
	bundle, err := secrets.NewBundle(secrets.NewFixedClock(time.Now()), talosconfig.TalosVersionCurrent)
	if err != nil {
		t.Fatal(err)
	}

	bundleYAML, err := yaml.Marshal(bundle)
	if err != nil {
		t.Fatal(err)
	}

	pki, err := talosfake.PKIFromBundle("capi", bundleYAML)
	if err != nil {
		t.Fatal(err)
	}

	if !bytes.Equal(pki.CA.Crt, bundle.Certs.OS.Crt) || !bytes.Equal(pki.CA.Key, bundle.Certs.OS.Key) {
		t.Fatal("the PKI's CA is not the bundle's OS CA")
	}

	if pki.Talosconfig.Context != "capi" {
		t.Fatalf("talosconfig context %q, want the cluster name", pki.Talosconfig.Context)
	}

	// The providers' talosconfig: an os:admin certificate from the bundle.
	admin, err := bundle.GenerateTalosAPIClientCertificate(role.MakeSet(role.Admin))
	if err != nil {
		t.Fatal(err)
	}

	providers := clientconfig.NewConfig("capi", nil, bundle.Certs.OS.Crt, admin)

	cl := startCluster(t, pki, 2)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	for name, cfg := range map[string]*clientconfig.Config{"PKI": pki.Talosconfig, "providers": providers} {
		c := newClusterClient(t, cfg, cl.endpoints...)

		v, err := c.Version(ctx)
		if err != nil || len(v.GetMessages()) != 1 {
			t.Fatalf("version with the %s talosconfig: %v %v", name, v, err)
		}
	}

	// The PKI's talosconfig is an admin's.
	c := newClusterClient(t, pki.Talosconfig, cl.endpoints[0])
	if err := c.Bootstrap(ctx, &machine.BootstrapRequest{}); err != nil {
		t.Fatalf("bootstrap with the PKI talosconfig: %v", err)
	}
}

func TestPKIFromBundleRefusesBadBundles(t *testing.T) {
	other, err := secrets.NewBundle(secrets.NewFixedClock(time.Now()), talosconfig.TalosVersionCurrent)
	if err != nil {
		t.Fatal(err)
	}

	other.Certs.OS = nil

	noOS, err := yaml.Marshal(other)
	if err != nil {
		t.Fatal(err)
	}

	for name, b := range map[string][]byte{
		"empty":      nil,
		"not YAML":   []byte("certs: [unterminated"),
		"no OS CA":   noOS,
		"corrupt CA": []byte("certs:\n  os:\n    crt: bm90IGEgY2VydGlmaWNhdGU=\n    key: bm90IGEga2V5\n"),
		"not base64": []byte("certs:\n  os:\n    crt: '***'\n    key: '***'\n"),
	} {
		if _, err := talosfake.PKIFromBundle("capi", b); err == nil {
			t.Errorf("%s bundle: loaded, want an error", name)
		}
	}

}
