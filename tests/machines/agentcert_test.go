package machines

import (
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"slices"
	"testing"

	machineapi "github.com/siderolabs/talos/pkg/machinery/api/machine"
	talosclient "github.com/siderolabs/talos/pkg/machinery/client"
	clientconfig "github.com/siderolabs/talos/pkg/machinery/client/config"
	"github.com/siderolabs/talos/pkg/machinery/config/configloader"
	"github.com/siderolabs/talos/pkg/machinery/role"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sovra-dev/sovra/daemon/machineconfig"
)

// workerAgentIsReader checks the talosconfig of a provisioned worker's
// agent (in the configuration the worker runs, from its STATE): its
// certificate, of the cluster's Talos CA and so valid on every node of the
// cluster, has the os:reader role only; the worker's Talos API answers a
// reader's call with it (Version) and refuses an os:admin one (Bootstrap:
// an os:admin caller gets FailedPrecondition on a worker, anyone else
// PermissionDenied, as machined's authz rules say).
func workerAgentIsReader(t *testing.T, m *machine) {
	t.Helper()

	running, err := configloader.NewFromBytes(m.StoredConfig())
	if err != nil {
		t.Fatalf("the configuration in STATE of %s does not load: %v", m.UUID, err)
	}

	var tc []byte

	for _, svc := range running.ExtensionServiceConfigs() {
		for _, f := range svc.ConfigFiles() {
			if f.MountPath() == machineconfig.TalosconfigPath {
				tc = []byte(f.Content())
			}
		}
	}

	if tc == nil {
		t.Fatalf("machine %s: no talosconfig in the agent's service", m.UUID)
	}

	cfg, err := clientconfig.FromBytes(tc)
	if err != nil {
		t.Fatalf("machine %s: the agent's talosconfig: %v", m.UUID, err)
	}

	crt, err := base64.StdEncoding.DecodeString(cfg.Contexts[cfg.Context].Crt)
	if err != nil {
		t.Fatal(err)
	}

	block, _ := pem.Decode(crt)
	if block == nil {
		t.Fatalf("machine %s: the agent's certificate is not PEM", m.UUID)
	}

	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}

	if got := cert.Subject.Organization; !slices.Equal(got, []string{string(role.Reader)}) {
		t.Errorf("worker %s: its agent's certificate has roles %v, want only %s", m.UUID, got, role.Reader)
	}

	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()

	c, err := talosclient.New(ctx, talosclient.WithConfig(cfg), talosclient.WithEndpoints(m.addr.String()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close() //nolint:errcheck

	if _, err := c.Version(ctx); err != nil {
		t.Errorf("worker %s: a reader's call with its agent's certificate: %v", m.UUID, err)
	}

	if err := c.Bootstrap(ctx, &machineapi.BootstrapRequest{}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("worker %s: an os:admin call (Bootstrap) with its agent's certificate: %v, want PermissionDenied", m.UUID, err)
	}
}
