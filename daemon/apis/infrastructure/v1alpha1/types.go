package v1alpha1

import (
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	clusterv1 "sigs.k8s.io/cluster-api/api/v1beta1"
)

// ContractLabel is the label Cluster API reads to find the version of a
// provider's CRDs that implements its v1beta1 contract.
const ContractLabel = "cluster.x-k8s.io/v1beta1"

// Finalizers.
const (
	// ClusterFinalizer holds a SovraCluster until its machines are gone.
	ClusterFinalizer = "sovracluster.infrastructure.cluster.x-k8s.io"
	// MachineFinalizer holds a SovraMachine until its host is released.
	MachineFinalizer = "sovramachine.infrastructure.cluster.x-k8s.io"
)

// Conditions and reasons.
const (
	// HostClaimedCondition is True once the machine holds a host.
	HostClaimedCondition clusterv1.ConditionType = "HostClaimed"
	// HostProvisionedCondition is True once the host runs the machine's configuration.
	HostProvisionedCondition clusterv1.ConditionType = "HostProvisioned"

	WaitingForBootstrapDataReason = "WaitingForBootstrapData"
	WaitingForClusterReason       = "WaitingForClusterInfrastructure"
	NoHostAvailableReason         = "NoHostAvailable"
	WaitingForHostReason          = "WaitingForHost"
	HostFailedReason              = "HostFailed"
	HostReleasingReason           = "HostReleasing"
	// ClusterLabelConflictReason: the claimed host's SovraNode carries an
	// operator's sovra.dev/cluster label naming another cluster.
	ClusterLabelConflictReason = "ClusterLabelConflict"
)

// ProviderIDPrefix starts the provider ID of every machine: sovra://<host>.
const ProviderIDPrefix = "sovra://"

// SovraClusterSpec is the infrastructure of a cluster: its control-plane
// endpoint, given by the user (a VIP, a DNS name or a load balancer).
type SovraClusterSpec struct {
	// ControlPlaneEndpoint is where the cluster's Kubernetes API is reached.
	ControlPlaneEndpoint clusterv1.APIEndpoint `json:"controlPlaneEndpoint"`
}

// SovraClusterStatus follows the Cluster API contract.
type SovraClusterStatus struct {
	// Ready is true once the endpoint is known.
	// +optional
	Ready bool `json:"ready"`
	// Conditions of the cluster infrastructure.
	// +optional
	Conditions clusterv1.Conditions `json:"conditions,omitempty"`
}

// SovraCluster is the infrastructure of a Cluster whose machines run on
// sovra's attested hosts.
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:categories=cluster-api
// +kubebuilder:metadata:labels="cluster.x-k8s.io/v1beta1=v1alpha1"
// +kubebuilder:subresource:status
// +kubebuilder:printcolumn:name="Cluster",type=string,JSONPath=`.metadata.labels.cluster\.x-k8s\.io/cluster-name`
// +kubebuilder:printcolumn:name="Ready",type=boolean,JSONPath=`.status.ready`
// +kubebuilder:printcolumn:name="Endpoint",type=string,JSONPath=`.spec.controlPlaneEndpoint.host`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type SovraCluster struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   SovraClusterSpec   `json:"spec,omitempty"`
	Status SovraClusterStatus `json:"status,omitempty"`
}

// GetConditions returns the conditions (Cluster API's conditions.Setter).
func (c *SovraCluster) GetConditions() clusterv1.Conditions { return c.Status.Conditions }

// SetConditions sets the conditions.
func (c *SovraCluster) SetConditions(cs clusterv1.Conditions) { c.Status.Conditions = cs }

// SovraClusterList is a list of SovraClusters.
//
// +kubebuilder:object:root=true
type SovraClusterList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []SovraCluster `json:"items"`
}

// SovraMachineSpec says which hosts may serve a machine.
type SovraMachineSpec struct {
	// HostSelector selects the hosts (by their labels, e.g.
	// host.sovra.dev/cpus or an operator's rack label) the machine may
	// claim; empty selects any accepted host.
	// +optional
	HostSelector *metav1.LabelSelector `json:"hostSelector,omitempty"`
	// ProviderID is sovra://<host>, set once a host is claimed.
	// +optional
	ProviderID *string `json:"providerID,omitempty"`
}

// SovraMachineStatus follows the Cluster API contract.
type SovraMachineStatus struct {
	// Ready is true once the host runs the machine's configuration.
	// +optional
	Ready bool `json:"ready"`
	// Addresses are the host's.
	// +optional
	Addresses clusterv1.MachineAddresses `json:"addresses,omitempty"`
	// HostRef names the claimed host.
	// +optional
	HostRef *corev1.ObjectReference `json:"hostRef,omitempty"`
	// FailureReason and FailureMessage report a terminal problem.
	// +optional
	FailureReason *string `json:"failureReason,omitempty"`
	// +optional
	FailureMessage *string `json:"failureMessage,omitempty"`
	// Conditions of the machine.
	// +optional
	Conditions clusterv1.Conditions `json:"conditions,omitempty"`
}

// SovraMachine is a machine of a cluster that runs on one of sovra's
// attested hosts: it claims an available host whose labels match, and the
// host receives the machine's configuration once it proves its boot.
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:categories=cluster-api
// +kubebuilder:metadata:labels="cluster.x-k8s.io/v1beta1=v1alpha1"
// +kubebuilder:subresource:status
// +kubebuilder:printcolumn:name="Cluster",type=string,JSONPath=`.metadata.labels.cluster\.x-k8s\.io/cluster-name`
// +kubebuilder:printcolumn:name="Ready",type=boolean,JSONPath=`.status.ready`
// +kubebuilder:printcolumn:name="Host",type=string,JSONPath=`.status.hostRef.name`
// +kubebuilder:printcolumn:name="ProviderID",type=string,JSONPath=`.spec.providerID`
// +kubebuilder:printcolumn:name="Machine",type=string,JSONPath=`.metadata.ownerReferences[?(@.kind=="Machine")].name`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type SovraMachine struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   SovraMachineSpec   `json:"spec,omitempty"`
	Status SovraMachineStatus `json:"status,omitempty"`
}

// GetConditions returns the conditions (Cluster API's conditions.Setter).
func (m *SovraMachine) GetConditions() clusterv1.Conditions { return m.Status.Conditions }

// SetConditions sets the conditions.
func (m *SovraMachine) SetConditions(cs clusterv1.Conditions) { m.Status.Conditions = cs }

// SovraMachineList is a list of SovraMachines.
//
// +kubebuilder:object:root=true
type SovraMachineList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []SovraMachine `json:"items"`
}

// SovraMachineTemplateResource is the template's machine.
type SovraMachineTemplateResource struct {
	// +optional
	ObjectMeta clusterv1.ObjectMeta `json:"metadata,omitempty"`
	Spec       SovraMachineSpec     `json:"spec"`
}

// SovraMachineTemplateSpec holds the template.
type SovraMachineTemplateSpec struct {
	Template SovraMachineTemplateResource `json:"template"`
}

// SovraMachineTemplate is the template of the SovraMachines of a control
// plane or a machine deployment.
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:categories=cluster-api
// +kubebuilder:metadata:labels="cluster.x-k8s.io/v1beta1=v1alpha1"
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type SovraMachineTemplate struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec SovraMachineTemplateSpec `json:"spec,omitempty"`
}

// SovraMachineTemplateList is a list of SovraMachineTemplates.
//
// +kubebuilder:object:root=true
type SovraMachineTemplateList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []SovraMachineTemplate `json:"items"`
}
