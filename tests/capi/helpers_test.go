package capi_test

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/config/configloader"

	"github.com/sovra-dev/sovra/tests/sovradtest"
)

const (
	pollInterval = 250 * time.Millisecond
	// reconcileTimeout bounds every wait for the controllers: CACPPT creates
	// one control-plane Machine per reconcile and requeues after up to 20 s.
	reconcileTimeout = 4 * time.Minute
	// cpLabel marks control-plane Machines.
	cpLabel = "cluster.x-k8s.io/control-plane"
)

// capiKinds are every kind a Cluster can own, directly or not, in its
// namespace: after the Cluster is deleted none may be left.
var capiKinds = []string{
	"clusters.cluster.x-k8s.io", "machines.cluster.x-k8s.io", "machinesets.cluster.x-k8s.io",
	"machinedeployments.cluster.x-k8s.io", "machinehealthchecks.cluster.x-k8s.io", "machinepools.cluster.x-k8s.io",
	"clusterresourcesetbindings.addons.cluster.x-k8s.io", "ipaddressclaims.ipam.cluster.x-k8s.io",
	"taloscontrolplanes.controlplane.cluster.x-k8s.io", "talosconfigs.bootstrap.cluster.x-k8s.io",
	"talosconfigtemplates.bootstrap.cluster.x-k8s.io", "sovratestclusters.infrastructure.cluster.x-k8s.io",
	"sovratestmachines.infrastructure.cluster.x-k8s.io", "sovratestmachinetemplates.infrastructure.cluster.x-k8s.io",
	"secrets", "configmaps",
}

// startDaemon starts the built sovrad with args and without the node API,
// which these stories do not use (two replicas on one host would otherwise
// compete for its port).
func startDaemon(t testing.TB, dataDir string, args ...string) *sovradtest.Daemon {
	t.Helper()
	return sovradtest.Start(t, dataDir, append([]string{"--node-listen="}, args...)...)
}

// apply runs kubectl apply on manifest and returns its output and error.
func apply(t testing.TB, d *sovradtest.Daemon, manifest string) (string, error) {
	t.Helper()
	f := filepath.Join(t.TempDir(), "manifest.yaml")
	if err := os.WriteFile(f, []byte(manifest), 0o600); err != nil {
		t.Fatal(err)
	}
	return d.TryKubectl("apply", "-f", f)
}

func mustApply(t testing.TB, d *sovradtest.Daemon, manifest string) {
	t.Helper()
	if out, err := apply(t, d, manifest); err != nil {
		t.Fatalf("kubectl apply: %v\n%s", err, out)
	}
}

// waitFor polls cond until it holds, failing the test after timeout with the
// last state cond described.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var state string
	for time.Now().Before(deadline) {
		var ok bool
		if ok, state = cond(); ok {
			return
		}
		time.Sleep(pollInterval)
	}
	t.Fatalf("timed out after %s waiting for %s; last state: %s", timeout, what, state)
}

// machine is the part of a Cluster API Machine the stories read.
type machine struct {
	Metadata struct {
		Name   string            `json:"name"`
		Labels map[string]string `json:"labels"`
	} `json:"metadata"`
	Spec struct {
		Bootstrap struct {
			DataSecretName *string `json:"dataSecretName"`
		} `json:"bootstrap"`
	} `json:"spec"`
	Status struct {
		Phase string `json:"phase"`
	} `json:"status"`
}

func (m machine) controlPlane() bool { _, ok := m.Metadata.Labels[cpLabel]; return ok }

// machines lists the Machines of cluster in ns.
func machines(t testing.TB, d *sovradtest.Daemon, ns, cluster string) []machine {
	t.Helper()
	out, err := d.TryKubectl("-n", ns, "get", "machines", "-l", "cluster.x-k8s.io/cluster-name="+cluster, "-o", "json")
	if err != nil {
		return nil
	}
	var list struct{ Items []machine }
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		t.Fatalf("decoding machines: %v", err)
	}
	return list.Items
}

// bootstrapped counts the control-plane and worker Machines whose bootstrap
// data Secret is written.
func bootstrapped(ms []machine) (cp, workers int) {
	for _, m := range ms {
		if m.Spec.Bootstrap.DataSecretName == nil {
			continue
		}
		if m.controlPlane() {
			cp++
		} else {
			workers++
		}
	}
	return cp, workers
}

// cloudMode is the Talos runtime mode the configs are validated for: no
// installation, not in a container.
type cloudMode struct{}

func (cloudMode) String() string        { return "cloud" }
func (cloudMode) RequiresInstall() bool { return false }
func (cloudMode) InContainer() bool     { return false }

// checkBootstrapData loads the bootstrap data of m with the Talos machinery
// config loader and checks it is a valid config of the Machine's role.
func checkBootstrapData(t testing.TB, d *sovradtest.Daemon, ns string, m machine) {
	t.Helper()
	name := *m.Spec.Bootstrap.DataSecretName
	encoded := d.Kubectl("-n", ns, "get", "secret", name, "-o", "jsonpath={.data.value}")
	data, err := base64.StdEncoding.DecodeString(encoded)
	if err != nil {
		t.Fatalf("bootstrap data %s: %v", name, err)
	}
	cfg, err := configloader.NewFromBytes(data)
	if err != nil {
		t.Fatalf("bootstrap data %s of machine %s does not load as a Talos config: %v", name, m.Metadata.Name, err)
	}
	if _, err := cfg.Validate(cloudMode{}); err != nil {
		t.Fatalf("bootstrap data %s of machine %s is not a valid Talos config: %v", name, m.Metadata.Name, err)
	}
	want := "worker"
	if m.controlPlane() {
		want = "controlplane"
	}
	if got := cfg.Machine().Type().String(); got != want {
		t.Fatalf("bootstrap data %s of machine %s is a %q config, want %q", name, m.Metadata.Name, got, want)
	}
}

// namespaceCA is the ConfigMap the root CA publisher keeps in every
// namespace, as in Kubernetes: no Cluster owns it.
const namespaceCA = "configmap/kube-root-ca.crt"

// leftovers lists every object of capiKinds still in ns, as kind/name.
func leftovers(t testing.TB, d *sovradtest.Daemon, ns string) []string {
	t.Helper()
	out, err := d.TryKubectl("-n", ns, "get", strings.Join(capiKinds, ","), "-o", "name")
	if err != nil {
		return []string{fmt.Sprintf("(listing failed: %v)", err)}
	}
	return slices.DeleteFunc(strings.Fields(out), func(o string) bool { return o == namespaceCA })
}

// jsonpath reads one field with kubectl; empty on error.
func jsonpath(d *sovradtest.Daemon, args ...string) string {
	out, err := d.TryKubectl(args...)
	if err != nil {
		return ""
	}
	return strings.TrimSpace(out)
}
