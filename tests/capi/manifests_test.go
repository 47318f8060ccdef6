package capi_test

import "strings"

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
