package capi_test

import (
	"fmt"
	"strings"
)

// clusterYAML is a cluster as a user writes it (see the Kommodity guide in
// shared/context): no namespaces on references, no selectors, no defaults;
// the Cluster names its control plane by the CAPI contract version
// (v1beta1), which the contract labels resolve to CACPPT's v1alpha3.
func clusterYAML(ns, name string, cpReplicas, workers int) string {
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

// badSelectorYAML is a MachineDeployment whose selector does not match its
// template's labels: Cluster API's validating webhook must reject it.
func badSelectorYAML(ns, cluster string) string {
	return strings.NewReplacer("NS", ns, "CLUSTER", cluster).Replace(`apiVersion: cluster.x-k8s.io/v1beta1
kind: MachineDeployment
metadata:
  name: bad-selector
  namespace: NS
spec:
  clusterName: CLUSTER
  selector:
    matchLabels:
      pool: a
  template:
    metadata:
      labels:
        pool: b
    spec:
      clusterName: CLUSTER
      bootstrap:
        configRef:
          apiVersion: bootstrap.cluster.x-k8s.io/v1alpha3
          kind: TalosConfigTemplate
          name: CLUSTER-workers
      infrastructureRef:
        apiVersion: infrastructure.cluster.x-k8s.io/v1alpha1
        kind: SovraTestMachineTemplate
        name: CLUSTER-workers
`)
}
