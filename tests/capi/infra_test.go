package capi_test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/internal/testutil"
	"github.com/sovra-dev/sovra/tests/capi/testinfra"
	"github.com/sovra-dev/sovra/tests/sovradtest"
)

const (
	// infraWebhook is the ValidatingWebhookConfiguration of sovra's check
	// of infrastructure references.
	infraWebhook = "sovra-infrastructure-references"
	// servedKinds is how the refusal names the kinds sovrad serves.
	servedKinds = "SovraCluster, SovraMachine and SovraMachineTemplate"
	// deleteBound bounds `kubectl delete cluster` of a Cluster whose
	// infrastructure kind is gone: Cluster API's reconcile, then sovra's.
	deleteBound = 90 * time.Second
	// releasedReason is the reason of sovra's event on such a Cluster.
	releasedReason    = "InfrastructureKindMissing"
	clusterctlTimeout = time.Minute
	// cacheSyncTimeout is controller-runtime's default CacheSyncTimeout:
	// a controller whose kinds are not installed stops the manager then.
	cacheSyncTimeout = 2 * time.Minute
)

// TestInfrastructureReferences is the story of what sovrad does not serve:
// a Cluster or Machine naming an infrastructure kind that is not installed
// is refused at admission with a message that names the kinds sovrad serves,
// as is one of sovra's kinds in the wrong place, while a provider whose CRDs
// the operator installed (the stand-in) is accepted; a Cluster whose
// infrastructure CRD was deleted under it still deletes; and `clusterctl
// describe cluster` shows a sovra cluster, down to why its machines wait.
//
// The daemon runs without its node API, as the other stories here do: its
// Cluster API manager installs the host pool's kinds itself (a sovrad that
// did not stopped when its SovraMachine controller's cache never synced),
// and the story outlasts that two-minute cache-sync timeout.
func TestInfrastructureReferences(t *testing.T) {
	d := startDaemon(t, filepath.Join(t.TempDir(), "data"))
	waitCRDs(t, d)
	testinfra.Start(t, d)
	waitFor(t, time.Minute, "the infrastructure-reference webhook to be registered", func() (bool, string) {
		url := jsonpath(d, "get", "validatingwebhookconfiguration", infraWebhook, "-o", "jsonpath={.webhooks[0].clientConfig.url}")
		return strings.HasSuffix(url, "/validate-infrastructure-references"), "url " + url
	})
	const ns = "refs"
	d.Kubectl("create", "namespace", ns)

	t.Run("unserved kinds refused", func(t *testing.T) {
		out, err := apply(t, d, clusterYAML(ns, "azure", "infrastructure.cluster.x-k8s.io/v1beta2", "AzureCluster"))
		wantRefused(t, out, err, `The Cluster "azure" is invalid`, "spec.infrastructureRef.kind", "AzureCluster",
			"no CustomResourceDefinition azureclusters.infrastructure.cluster.x-k8s.io is installed", servedKinds,
			"need its CRDs installed in this API and its controllers run against it")
		if _, err := d.TryKubectl("-n", ns, "get", "cluster", "azure"); err == nil {
			t.Error("the refused Cluster exists")
		}

		out, err = apply(t, d, machineYAML(ns, "aws-0", "infrastructure.cluster.x-k8s.io/v1beta2", "AWSMachine"))
		wantRefused(t, out, err, `The Machine "aws-0" is invalid`, "AWSMachine", "awsmachines.infrastructure.cluster.x-k8s.io", servedKinds)

		out, err = apply(t, d, machineYAML(ns, "misplaced-0", "infrastructure.cluster.x-k8s.io/v1alpha1", "SovraCluster"))
		wantRefused(t, out, err, `The Machine "misplaced-0" is invalid`, "SovraCluster cannot be used here",
			"a Machine's spec.infrastructureRef takes a SovraMachine")
	})

	t.Run("installed provider accepted", func(t *testing.T) {
		mustApply(t, d, clusterYAML(ns, "stand-in", "infrastructure.cluster.x-k8s.io/v1alpha1", "SovraTestCluster"))
		mustApply(t, d, machineYAML(ns, "stand-in-0", "infrastructure.cluster.x-k8s.io/v1alpha1", "SovraTestMachine"))
		mustApply(t, d, machineYAML(ns, "sovra-0", "infrastructure.cluster.x-k8s.io/v1alpha1", "SovraMachine"))
	})

	t.Run("cluster deletes after its infrastructure CRD is gone", func(t *testing.T) {
		crd := filepath.Join(t.TempDir(), "crd.yaml")
		if err := os.WriteFile(crd, []byte(goneCRD), 0o600); err != nil {
			t.Fatal(err)
		}
		d.Kubectl("apply", "-f", crd)
		d.WaitEstablished(goneCRDName)
		mustApply(t, d, clusterYAML(ns, "orphan", "infrastructure.cluster.x-k8s.io/v1alpha1", "SovraGoneCluster")+`---
apiVersion: infrastructure.cluster.x-k8s.io/v1alpha1
kind: SovraGoneCluster
metadata:
  name: orphan
  namespace: `+ns+"\n")
		// Cluster API holds the Cluster with its finalizer and has adopted
		// the infrastructure object.
		waitFor(t, reconcileTimeout, "Cluster API to own the infrastructure object", func() (bool, string) {
			owner := jsonpath(d, "-n", ns, "get", "sovragoneclusters", "orphan", "-o", "jsonpath={.metadata.ownerReferences[0].kind}")
			fin := jsonpath(d, "-n", ns, "get", "cluster", "orphan", "-o", "jsonpath={.metadata.finalizers}")
			return owner == "Cluster" && strings.Contains(fin, "cluster.cluster.x-k8s.io"), "owner " + owner + ", finalizers " + fin
		})

		d.Kubectl("delete", "crd", goneCRDName, "--timeout=1m")
		offset := d.LogSize()
		start := time.Now()
		if out, err := d.TryKubectl("-n", ns, "delete", "cluster", "orphan", "--timeout="+deleteBound.String()); err != nil {
			t.Fatalf("deleting a Cluster whose infrastructure CRD is gone did not complete within %s: %v\n%s\nfinalizers: %s",
				deleteBound, err, out, jsonpath(d, "-n", ns, "get", "cluster", "orphan", "-o", "jsonpath={.metadata.finalizers}"))
		}
		t.Logf("Cluster with a missing infrastructure kind deleted in %s", time.Since(start).Round(100*time.Millisecond))
		events := d.Kubectl("-n", ns, "get", "events", "--field-selector", "reason="+releasedReason, "-o",
			"jsonpath={range .items[*]}{.type} {.involvedObject.kind}/{.involvedObject.name}: {.message}{\"\\n\"}{end}")
		if !strings.Contains(events, "Normal Cluster/orphan: ") || !strings.Contains(events, goneCRDName) {
			t.Errorf("no Normal %s event on the Cluster naming the missing CRD: %q", releasedReason, events)
		}
		if log := d.LogSince(offset); !strings.Contains(log, "released deleted cluster whose infrastructure kind is missing") ||
			!strings.Contains(log, `"cluster":"`+ns+`/orphan"`) {
			t.Error("the daemon did not log why it released the Cluster")
		}
	})

	t.Run("clusterctl describe cluster", func(t *testing.T) {
		const cns, name = "sovra-clusters", "demo"
		mustApply(t, d, sovraClusterYAML(cns, name))
		// No host is in the pool: the three SovraMachines (one control
		// plane, two workers) wait for one, and their Machines say so.
		const wantWaiting = "NoHostAvailable NoHostAvailable NoHostAvailable"
		waitFor(t, reconcileTimeout, "the SovraCluster to be ready and every SovraMachine and Machine to wait for a host", func() (bool, string) {
			ready := jsonpath(d, "-n", cns, "get", "cluster", name, "-o", "jsonpath={.status.infrastructureReady}")
			infra := jsonpath(d, "-n", cns, "get", "sovramachines", "-o", `jsonpath={.items[*].status.conditions[?(@.type=="Ready")].reason}`)
			machines := jsonpath(d, "-n", cns, "get", "machines", "-o", `jsonpath={.items[*].status.conditions[?(@.type=="Ready")].reason}`)
			return ready == "true" && infra == wantWaiting && machines == wantWaiting,
				"infrastructureReady " + ready + ", SovraMachines " + infra + ", Machines " + machines
		})
		// --echo shows each Machine's SovraMachine even where it says what
		// the Machine says; --grouping=false lists the workers one by one.
		out := clusterctl(t, d, "describe", "cluster", name, "-n", cns, "--grouping=false", "--show-templates", "--echo")
		wantLines(t, out,
			"Cluster/"+name+" ",
			"ClusterInfrastructure - SovraCluster/"+name+" True",
			"ControlPlane - TalosControlPlane/"+name+"-control-plane ",
			"MachineInfrastructure - SovraMachine/"+name+"-control-plane-",
			"MachineDeployment/"+name+"-workers ",
			"MachineInfrastructureTemplate - infrastructure.cluster.x-k8s.io/v1alpha1/"+name+"-workers",
			"MachineInfrastructure - SovraMachine/"+name+"-workers-",
		)
		// Every Machine, and its SovraMachine, says why it waits.
		for _, m := range strings.Fields(jsonpath(d, "-n", cns, "get", "machines", "-o", "jsonpath={.items[*].metadata.name}")) {
			wantLines(t, out, "Machine/"+m+" False Warning NoHostAvailable")
		}
		if n := strings.Count(out, noHostMessage); n != 3 {
			t.Errorf("%d SovraMachines say %q, want 3:\n%s", n, noHostMessage, out)
		}
		// The v1beta2 view reads the same objects and shows the reason too.
		out = clusterctl(t, d, "describe", "cluster", name, "-n", cns, "--v1beta2")
		wantLines(t, out, "Cluster/"+name+" ", "MachineInfrastructure - SovraMachine/"+name+"-control-plane-")
		if !strings.Contains(out, "InfrastructureReady: "+noHostMessage) {
			t.Errorf("the v1beta2 view does not say why the control-plane Machine waits:\n%s", out)
		}
	})

	// Every controller's cache synced: sovrad is still up after
	// controller-runtime's cache-sync timeout.
	time.Sleep(time.Until(d.StartedAt.Add(cacheSyncTimeout + 10*time.Second)))
	if out, err := d.TryKubectl("get", "--raw", "/readyz"); err != nil {
		t.Fatalf("sovrad is down %s after its start: %v\n%s\n%s", time.Since(d.StartedAt).Round(time.Second), err, out, d.Tail(20))
	}
}

// noHostMessage is what a SovraMachine without a host says.
const noHostMessage = "no accepted, attested host is available whose labels match the host selector"

// wantLines fails unless every part of want is on some line of clusterctl's
// table, with runs of spaces collapsed to one.
func wantLines(t *testing.T, out string, want ...string) {
	t.Helper()
	var lines []string
	for _, l := range strings.Split(out, "\n") {
		lines = append(lines, strings.Join(strings.Fields(l), " ")+" ")
	}
	for _, w := range want {
		found := false
		for _, l := range lines {
			if strings.Contains(l, w) {
				found = true
				break
			}
		}
		if !found {
			t.Errorf("clusterctl describe does not show %q:\n%s", w, out)
		}
	}
}

// wantRefused fails unless kubectl apply was refused with every part of want.
func wantRefused(t *testing.T, out string, err error, want ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("accepted:\n%s", out)
	}
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("refusal does not say %q: %v", w, err)
		}
	}
}

// clusterctl runs the built clusterctl against d, in a private home (it
// reads and writes its configuration there), and fails the test unless it
// exits 0. It returns stdout.
func clusterctl(t *testing.T, d *sovradtest.Daemon, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), clusterctlTimeout)
	defer cancel()
	home := t.TempDir()
	cmd := exec.CommandContext(ctx, testutil.Bin(t, "clusterctl"), append(args, "--kubeconfig", d.Kubeconfig())...)
	cmd.Env = append(os.Environ(), "HOME="+home, "XDG_CONFIG_HOME="+filepath.Join(home, ".config"))
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("clusterctl %s: %v\n%s\n%s", strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String()
}

// clusterYAML is a Cluster with only an infrastructure reference.
func clusterYAML(ns, name, apiVersion, kind string) string {
	return strings.NewReplacer("NS", ns, "NAME", name, "APIVERSION", apiVersion, "KIND", kind).Replace(`apiVersion: cluster.x-k8s.io/v1beta1
kind: Cluster
metadata:
  name: NAME
  namespace: NS
spec:
  infrastructureRef:
    apiVersion: APIVERSION
    kind: KIND
    name: NAME
`)
}

// machineYAML is a Machine of cluster "stand-in" with an infrastructure reference.
func machineYAML(ns, name, apiVersion, kind string) string {
	return strings.NewReplacer("NS", ns, "NAME", name, "APIVERSION", apiVersion, "KIND", kind).Replace(`apiVersion: cluster.x-k8s.io/v1beta1
kind: Machine
metadata:
  name: NAME
  namespace: NS
spec:
  clusterName: stand-in
  bootstrap:
    dataSecretName: NAME-bootstrap
  infrastructureRef:
    apiVersion: APIVERSION
    kind: KIND
    name: NAME
`)
}

// goneCRD is an infrastructure cluster kind the story installs, uses and
// deletes.
const (
	goneCRDName = "sovragoneclusters.infrastructure.cluster.x-k8s.io"
	goneCRD     = `apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: sovragoneclusters.infrastructure.cluster.x-k8s.io
  labels: {cluster.x-k8s.io/v1beta1: v1alpha1}
spec:
  group: infrastructure.cluster.x-k8s.io
  scope: Namespaced
  names: {plural: sovragoneclusters, singular: sovragonecluster, kind: SovraGoneCluster}
  versions:
    - name: v1alpha1
      served: true
      storage: true
      schema:
        openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
`
)

// sovraClusterYAML is a cluster on sovra's own provider: a SovraCluster, a
// TalosControlPlane of one and a MachineDeployment of two, both of
// SovraMachineTemplates. No host is in the pool, so its machines wait.
func sovraClusterYAML(ns, name string) string {
	return strings.NewReplacer("NS", ns, "NAME", name).Replace(`apiVersion: v1
kind: Namespace
metadata:
  name: NS
---
apiVersion: cluster.x-k8s.io/v1beta1
kind: Cluster
metadata:
  name: NAME
  namespace: NS
spec:
  clusterNetwork:
    pods:
      cidrBlocks: ["10.244.0.0/16"]
    services:
      cidrBlocks: ["10.96.0.0/12"]
  controlPlaneRef:
    apiVersion: controlplane.cluster.x-k8s.io/v1beta1
    kind: TalosControlPlane
    name: NAME-control-plane
  infrastructureRef:
    apiVersion: infrastructure.cluster.x-k8s.io/v1alpha1
    kind: SovraCluster
    name: NAME
---
apiVersion: infrastructure.cluster.x-k8s.io/v1alpha1
kind: SovraCluster
metadata:
  name: NAME
  namespace: NS
spec:
  controlPlaneEndpoint:
    host: 10.5.0.10
    port: 6443
---
apiVersion: infrastructure.cluster.x-k8s.io/v1alpha1
kind: SovraMachineTemplate
metadata:
  name: NAME-control-plane
  namespace: NS
spec:
  template:
    spec: {}
---
apiVersion: controlplane.cluster.x-k8s.io/v1alpha3
kind: TalosControlPlane
metadata:
  name: NAME-control-plane
  namespace: NS
spec:
  version: v1.32.6
  replicas: 1
  infrastructureTemplate:
    apiVersion: infrastructure.cluster.x-k8s.io/v1alpha1
    kind: SovraMachineTemplate
    name: NAME-control-plane
  controlPlaneConfig:
    controlplane:
      generateType: controlplane
      talosVersion: v1.10
---
apiVersion: infrastructure.cluster.x-k8s.io/v1alpha1
kind: SovraMachineTemplate
metadata:
  name: NAME-workers
  namespace: NS
spec:
  template:
    spec: {}
---
apiVersion: bootstrap.cluster.x-k8s.io/v1alpha3
kind: TalosConfigTemplate
metadata:
  name: NAME-workers
  namespace: NS
spec:
  template:
    spec:
      generateType: worker
      talosVersion: v1.10
---
apiVersion: cluster.x-k8s.io/v1beta1
kind: MachineDeployment
metadata:
  name: NAME-workers
  namespace: NS
spec:
  clusterName: NAME
  replicas: 2
  template:
    spec:
      clusterName: NAME
      version: v1.32.6
      bootstrap:
        configRef:
          apiVersion: bootstrap.cluster.x-k8s.io/v1alpha3
          kind: TalosConfigTemplate
          name: NAME-workers
      infrastructureRef:
        apiVersion: infrastructure.cluster.x-k8s.io/v1alpha1
        kind: SovraMachineTemplate
        name: NAME-workers
`)
}
