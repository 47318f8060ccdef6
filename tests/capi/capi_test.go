package capi_test

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/tests/capi/testinfra"
	"github.com/sovra-dev/sovra/tests/sovradtest"
)

// TestClusterLifecycleOnSQLite is a user's story on the default datastore:
// apply a Cluster with a three-node TalosControlPlane and a MachineDeployment,
// see it provisioned and every Machine given a valid Talos config by CABPT,
// see the webhooks default and reject, then delete the Cluster and find
// nothing left behind.
func TestClusterLifecycleOnSQLite(t *testing.T) {
	d := startDaemon(t, filepath.Join(t.TempDir(), "data"))
	waitCRDs(t, d)
	testinfra.Start(t, d)

	const ns, name = "clusters", "demo"
	mustApply(t, d, testinfra.ClusterYAML(ns, name, 3, 2))

	// Defaulted by the webhooks, not written by the user.
	if got := jsonpath(d, "-n", ns, "get", "cluster", name, "-o", "jsonpath={.spec.controlPlaneRef.namespace}"); got != ns {
		t.Errorf("the Cluster webhook did not default controlPlaneRef.namespace: %q", got)
	}
	if got := jsonpath(d, "-n", ns, "get", "machinedeployment", name+"-workers", "-o", "jsonpath={.spec.selector.matchLabels.cluster\\.x-k8s\\.io/cluster-name}"); got != name {
		t.Errorf("the MachineDeployment webhook did not default the selector: %q", got)
	}
	if got := jsonpath(d, "-n", ns, "get", "taloscontrolplane", name+"-control-plane", "-o", "jsonpath={.spec.infrastructureTemplate.namespace}"); got != ns {
		t.Errorf("the TalosControlPlane webhook did not default infrastructureTemplate.namespace: %q", got)
	}

	waitFor(t, reconcileTimeout, "the Cluster to be Provisioned", func() (bool, string) {
		phase := jsonpath(d, "-n", ns, "get", "cluster", name, "-o", "jsonpath={.status.phase}")
		return phase == "Provisioned", "phase " + phase
	})
	// The contract label resolved the user's v1beta1 reference to CACPPT's version.
	if got := jsonpath(d, "-n", ns, "get", "cluster", name, "-o", "jsonpath={.spec.controlPlaneRef.apiVersion}"); got != "controlplane.cluster.x-k8s.io/v1alpha3" {
		t.Errorf("controlPlaneRef.apiVersion = %q, want the contract version v1alpha3", got)
	}

	waitFor(t, reconcileTimeout, "3 control-plane and 2 worker Machines with bootstrap data", func() (bool, string) {
		cp, workers := bootstrapped(machines(t, d, ns, name))
		return cp == 3 && workers == 2, fmt.Sprintf("%d control-plane, %d workers bootstrapped", cp, workers)
	})
	ms := machines(t, d, ns, name)
	for _, m := range ms {
		checkBootstrapData(t, d, ns, m)
	}
	if len(ms) != 5 {
		t.Fatalf("want 5 machines, got %d", len(ms))
	}

	// A TalosConfig read at CABPT's older served version goes through the
	// conversion webhook.
	cfgName := jsonpath(d, "-n", ns, "get", "talosconfigs", "-o", "jsonpath={.items[0].metadata.name}")
	if got := jsonpath(d, "-n", ns, "get", "talosconfigs.v1alpha2.bootstrap.cluster.x-k8s.io", cfgName, "-o", "jsonpath={.apiVersion} {.spec.generateType}"); !strings.HasPrefix(got, "bootstrap.cluster.x-k8s.io/v1alpha2 ") || strings.HasSuffix(got, " ") {
		t.Errorf("TalosConfig %s read at v1alpha2: %q", cfgName, got)
	}

	// Cluster API's own validation, through its webhook.
	out, err := apply(t, d, badSelectorYAML(ns, name))
	if err == nil || !strings.Contains(err.Error(), "must match spec.selector") || !strings.Contains(err.Error(), `The MachineDeployment "bad-selector" is invalid`) {
		t.Fatalf("a MachineDeployment whose selector does not match its template was not rejected by the webhook: %v\n%s", err, out)
	}

	// Deleting the Cluster cascades to everything it owns, Secrets included.
	if secrets := jsonpath(d, "-n", ns, "get", "secrets", "-o", "name"); strings.Count(secrets, "secret/") < len(ms) {
		t.Fatalf("expected bootstrap Secrets before the delete, got %q", secrets)
	}
	d.Kubectl("-n", ns, "delete", "cluster", name, "--timeout=3m")
	waitFor(t, 2*time.Minute, "no objects left in "+ns, func() (bool, string) {
		left := leftovers(t, d, ns)
		return len(left) == 0, strings.Join(left, " ")
	})
}

// TestControllersFlag: --controllers none serves the API without Cluster API;
// an unknown controller name, as a flag or in SOVRA_CONTROLLERS, is refused
// before anything starts.
func TestControllersFlag(t *testing.T) {
	d := startDaemon(t, filepath.Join(t.TempDir(), "data"), "--controllers", "none")
	if out, err := d.TryKubectl("get", "crd", "clusters.cluster.x-k8s.io"); err == nil {
		t.Fatalf("--controllers none installed Cluster API: %s", out)
	}
	d.Kubectl("get", "namespaces")

	_, err := runSovrad(t, nil, "--data-dir", filepath.Join(t.TempDir(), "x"), "--controllers", "cluster,kubeadm")
	if err == nil || !strings.Contains(err.Error(), `--controllers: unknown controllers ["kubeadm"]`) {
		t.Fatalf("an unknown controller was not refused: %v", err)
	}
	_, err = runSovrad(t, []string{"SOVRA_CONTROLLERS=all,-gc"}, "--data-dir", filepath.Join(t.TempDir(), "y"))
	if err == nil || !strings.Contains(err.Error(), `SOVRA_CONTROLLERS: unknown controllers ["-gc"]`) {
		t.Fatalf("SOVRA_CONTROLLERS with an unknown controller was not refused: %v", err)
	}
}

// TestCRDsAppliedInPlace: at every start the CRDs are server-side applied:
// an unchanged CRD is not written, one installed from an older version is
// upgraded in place, and one installed by a newer sovrad is left alone.
func TestCRDsAppliedInPlace(t *testing.T) {
	d := startDaemon(t, filepath.Join(t.TempDir(), "data"), "--controllers", "talosconfig")
	waitCRDs(t, d)
	const (
		unchanged = "crd/ipaddresses.ipam.cluster.x-k8s.io"
		older     = "crd/talosconfigs.bootstrap.cluster.x-k8s.io"
		newer     = "crd/machinedrainrules.cluster.x-k8s.io"
	)
	rv := jsonpath(d, "get", unchanged, "-o", "jsonpath={.metadata.resourceVersion}")
	d.Kubectl("label", older, "cluster.x-k8s.io/v1beta1-")
	d.Kubectl("annotate", "--overwrite", older, "capi.sovra.dev/source=github.com/siderolabs/cluster-api-bootstrap-provider-talos@v0.6.0")
	d.Kubectl("annotate", "--overwrite", newer, "capi.sovra.dev/source=sigs.k8s.io/cluster-api@v9.9.9")
	d.Kubectl("label", newer, "cluster.x-k8s.io/provider-")

	d.Restart()
	waitFor(t, time.Minute, "the CRDs to be applied again", func() (bool, string) {
		return strings.Contains(d.Tail(100000), "Cluster API CRDs established"), ""
	})
	if got := jsonpath(d, "get", unchanged, "-o", "jsonpath={.metadata.resourceVersion}"); got != rv {
		t.Errorf("an unchanged CRD was rewritten at start: resourceVersion %s -> %s", rv, got)
	}
	if got := jsonpath(d, "get", older, "-o", `jsonpath={.metadata.labels.cluster\.x-k8s\.io/v1beta1} {.metadata.annotations.capi\.sovra\.dev/source}`); got != "v1alpha3 github.com/siderolabs/cluster-api-bootstrap-provider-talos@v0.6.12" {
		t.Errorf("the CRD from an older version was not upgraded in place: %q", got)
	}
	if got := jsonpath(d, "get", newer, "-o", `jsonpath={.metadata.labels.cluster\.x-k8s\.io/provider}{.metadata.annotations.capi\.sovra\.dev/source}`); got != "sigs.k8s.io/cluster-api@v9.9.9" {
		t.Errorf("the CRD from a newer sovrad was overwritten: %q", got)
	}
}

// waitCRDs waits until every Cluster API CRD is Established.
func waitCRDs(t testing.TB, d *sovradtest.Daemon) {
	t.Helper()
	waitFor(t, time.Minute, "the Cluster API CRDs", func() (bool, string) {
		out, err := d.TryKubectl("get", "crd", "-l", "cluster.x-k8s.io/provider", "-o",
			`jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Established")].status}{"\n"}{end}`)
		if err != nil {
			return false, err.Error()
		}
		lines := strings.Fields(out)
		for _, l := range lines {
			if !strings.HasSuffix(l, "=True") {
				return false, l
			}
		}
		return len(lines) == wantCRDs, fmt.Sprintf("%d established", len(lines))
	})
}

// wantCRDs is the number of CRDs of CAPI core (13), CABPT (2), CACPPT (1)
// and sovra's infrastructure provider (3).
const wantCRDs = 19
