// Package testinfra is a stand-in Cluster API infrastructure provider for the
// end-to-end stories: three CRDs (SovraTestCluster, SovraTestMachine,
// SovraTestMachineTemplate) and a tiny controller, run by the test process
// against the daemon's kubeconfig, that marks every infrastructure cluster
// and machine ready at once. It lives in tests/ and is never shipped: the
// real infrastructure providers are a later issue.
package testinfra

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/sovra-dev/sovra/tests/sovradtest"
)

const (
	// Group and Version of the stand-in types.
	Group   = "infrastructure.cluster.x-k8s.io"
	Version = "v1alpha1"

	// EndpointHost and EndpointPort are the control-plane endpoint every
	// SovraTestCluster reports.
	EndpointHost = "10.5.0.1"
	EndpointPort = 6443

	pollInterval = 250 * time.Millisecond
)

// CRDs are the stand-in types, with the contract label Cluster API reads to
// find the version that implements its v1beta1 contract.
const CRDs = `apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: sovratestclusters.infrastructure.cluster.x-k8s.io
  labels: {cluster.x-k8s.io/v1beta1: v1alpha1}
spec:
  group: infrastructure.cluster.x-k8s.io
  scope: Namespaced
  names: {plural: sovratestclusters, singular: sovratestcluster, kind: SovraTestCluster, categories: [cluster-api]}
  versions:
    - name: v1alpha1
      served: true
      storage: true
      schema:
        openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: sovratestmachines.infrastructure.cluster.x-k8s.io
  labels: {cluster.x-k8s.io/v1beta1: v1alpha1}
spec:
  group: infrastructure.cluster.x-k8s.io
  scope: Namespaced
  names: {plural: sovratestmachines, singular: sovratestmachine, kind: SovraTestMachine, categories: [cluster-api]}
  versions:
    - name: v1alpha1
      served: true
      storage: true
      schema:
        openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: sovratestmachinetemplates.infrastructure.cluster.x-k8s.io
  labels: {cluster.x-k8s.io/v1beta1: v1alpha1}
spec:
  group: infrastructure.cluster.x-k8s.io
  scope: Namespaced
  names: {plural: sovratestmachinetemplates, singular: sovratestmachinetemplate, kind: SovraTestMachineTemplate, categories: [cluster-api]}
  versions:
    - name: v1alpha1
      served: true
      storage: true
      schema:
        openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
`

// Resources are the stand-in resources the controller reconciles, and the template.
var (
	Clusters  = schema.GroupVersionResource{Group: Group, Version: Version, Resource: "sovratestclusters"}
	Machines  = schema.GroupVersionResource{Group: Group, Version: Version, Resource: "sovratestmachines"}
	Templates = schema.GroupVersionResource{Group: Group, Version: Version, Resource: "sovratestmachinetemplates"}
)

// Start installs the stand-in types' CRDs through d and runs the
// controller against d until the test ends.
func Start(t testing.TB, d *sovradtest.Daemon) {
	t.Helper()
	f := filepath.Join(t.TempDir(), "testinfra-crds.yaml")
	if err := os.WriteFile(f, []byte(CRDs), 0o600); err != nil {
		t.Fatal(err)
	}
	d.Kubectl("apply", "-f", f)
	d.WaitEstablished(
		"sovratestclusters.infrastructure.cluster.x-k8s.io",
		"sovratestmachines.infrastructure.cluster.x-k8s.io",
		"sovratestmachinetemplates.infrastructure.cluster.x-k8s.io")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = Run(ctx, d.Kubeconfig()) }()
	t.Cleanup(func() { cancel(); <-done })
}

// Run reconciles the stand-in types through kubeconfig until ctx ends: every
// SovraTestCluster gets the control-plane endpoint and ready, every
// SovraTestMachine a provider ID and ready.
func Run(ctx context.Context, kubeconfig string) error {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return err
	}
	c, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return err
	}
	t := time.NewTicker(pollInterval)
	defer t.Stop()
	for {
		reconcile(ctx, c, Clusters, func(u *unstructured.Unstructured) {
			_ = unstructured.SetNestedMap(u.Object, map[string]any{"host": EndpointHost, "port": int64(EndpointPort)}, "spec", "controlPlaneEndpoint")
		})
		reconcile(ctx, c, Machines, func(u *unstructured.Unstructured) {
			_ = unstructured.SetNestedField(u.Object, fmt.Sprintf("sovra-test://%s/%s", u.GetNamespace(), u.GetName()), "spec", "providerID")
		})
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// reconcile marks every object of gvr that is not yet ready as ready, after
// set has filled in its spec. Conflicts are retried on the next tick.
func reconcile(ctx context.Context, c dynamic.Interface, gvr schema.GroupVersionResource, set func(*unstructured.Unstructured)) {
	list, err := c.Resource(gvr).Namespace(metav1.NamespaceAll).List(ctx, metav1.ListOptions{})
	if err != nil {
		return
	}
	for i := range list.Items {
		u := &list.Items[i]
		if ready, _, _ := unstructured.NestedBool(u.Object, "status", "ready"); ready || u.GetDeletionTimestamp() != nil {
			continue
		}
		set(u)
		_ = unstructured.SetNestedField(u.Object, true, "status", "ready")
		if _, err := c.Resource(gvr).Namespace(u.GetNamespace()).Update(ctx, u, metav1.UpdateOptions{}); err != nil && !apierrors.IsConflict(err) && !apierrors.IsNotFound(err) {
			continue
		}
	}
}

// ClusterYAML is a cluster as a user writes it (see the Kommodity guide in
// shared/context): no namespaces on references, no selectors, no defaults;
// the Cluster names its control plane by the CAPI contract version
// (v1beta1), which the contract labels resolve to CACPPT's v1alpha3. Its
// machines run on this stand-in provider.
func ClusterYAML(ns, name string, cpReplicas, workers int) string {
	return strings.NewReplacer("NS", ns, "NAME", name, "CPREPLICAS", fmt.Sprint(cpReplicas), "WORKERS", fmt.Sprint(workers)).Replace(`apiVersion: v1
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
    kind: SovraTestCluster
    name: NAME
---
apiVersion: infrastructure.cluster.x-k8s.io/v1alpha1
kind: SovraTestCluster
metadata:
  name: NAME
  namespace: NS
spec: {}
---
apiVersion: infrastructure.cluster.x-k8s.io/v1alpha1
kind: SovraTestMachineTemplate
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
  replicas: CPREPLICAS
  infrastructureTemplate:
    apiVersion: infrastructure.cluster.x-k8s.io/v1alpha1
    kind: SovraTestMachineTemplate
    name: NAME-control-plane
  controlPlaneConfig:
    controlplane:
      generateType: controlplane
      talosVersion: v1.10
---
apiVersion: infrastructure.cluster.x-k8s.io/v1alpha1
kind: SovraTestMachineTemplate
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
  replicas: WORKERS
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
        kind: SovraTestMachineTemplate
        name: NAME-workers
`)
}
