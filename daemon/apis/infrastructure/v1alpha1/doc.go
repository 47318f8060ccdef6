// Package v1alpha1 holds sovra's Cluster API infrastructure provider API,
// infrastructure.cluster.x-k8s.io/v1alpha1 (the v1beta1 contract of Cluster
// API v1.10): SovraCluster (the control-plane endpoint a user gives: a VIP, a
// DNS name or a load balancer), SovraMachine (a machine that claims one
// attested host of sovra's pool by a label selector) and SovraMachineTemplate.
//
// +kubebuilder:object:generate=true
// +groupName=infrastructure.cluster.x-k8s.io
package v1alpha1

//go:generate go run sigs.k8s.io/controller-tools/cmd/controller-gen@v0.17.3 object paths=. crd:crdVersions=v1 output:crd:artifacts:config=crds
