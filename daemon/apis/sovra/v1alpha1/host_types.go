package v1alpha1

import (
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// HostPhase is where a host is in its life.
// +kubebuilder:validation:Enum=Pending;Available;Claimed;Provisioning;Provisioned;Releasing;Failed
type HostPhase string

// Host phases.
const (
	// HostPending: the host enrolled and attested on the enrollment
	// configuration and waits to be accepted.
	HostPending HostPhase = "Pending"
	// HostAvailable: accepted, attested, unclaimed.
	HostAvailable HostPhase = "Available"
	// HostClaimed: a machine claimed it; its configuration is not released yet.
	HostClaimed HostPhase = "Claimed"
	// HostProvisioning: its configuration was released; it has not reported
	// running it yet.
	HostProvisioning HostPhase = "Provisioning"
	// HostProvisioned: it runs its machine's configuration.
	HostProvisioned HostPhase = "Provisioned"
	// HostReleasing: its machine is gone; it is being wiped and returns to
	// the pool once it attests on the enrollment configuration again.
	HostReleasing HostPhase = "Releasing"
	// HostFailed: its attestation failed or its node is quarantined; it is
	// out of the pool and never receives a configuration until it attests
	// again, is not quarantined, and an operator accepts it.
	HostFailed HostPhase = "Failed"
)

// Condition types of a Host.
const (
	// HostConditionAttested mirrors the node's attestation.
	HostConditionAttested = "Attested"
	// HostConditionConfigReleased is True once the configuration of the
	// current generation was released to the host.
	HostConditionConfigReleased = "ConfigReleased"
	// HostConditionReset is True while the host is being wiped.
	HostConditionReset = "Reset"
	// HostConditionDaemonAction reports what sovrad last did to the host
	// through its Talos API (status.daemonAction): True once done, False
	// while a failed call is retried.
	HostConditionDaemonAction = "DaemonAction"
)

// TalosActor is who changes a host's Talos through its API (applies a
// configuration, resets it) while it runs its machine's configuration.
// +kubebuilder:validation:Enum=Agent;Daemon
type TalosActor string

// Talos actors.
const (
	// TalosActorAgent: the host's agent (a control-plane node, whose agent
	// holds an os:admin certificate of a CA of this host alone, which its
	// machine.acceptedCAs lists).
	TalosActorAgent TalosActor = "Agent"
	// TalosActorDaemon: sovrad, with its cluster's talosconfig (a worker,
	// whose Talos API accepts only the cluster's Talos CA: its agent holds
	// an os:reader certificate of that CA and can change nothing).
	TalosActorDaemon TalosActor = "Daemon"
)

// DaemonActionType is what sovrad does through a host's Talos API.
// +kubebuilder:validation:Enum=Apply;Reset
type DaemonActionType string

// Daemon actions.
const (
	// DaemonActionApply applies a new generation of the host's
	// configuration (ApplyConfiguration, with a reboot).
	DaemonActionApply DaemonActionType = "Apply"
	// DaemonActionReset wipes STATE and EPHEMERAL and reboots into the
	// enrollment configuration.
	DaemonActionReset DaemonActionType = "Reset"
)

// HostDaemonAction is one action of sovrad on a host's Talos API,
// recorded before every call so that it is done once per boot of the host
// and retried with backoff, by the host reconciler of the leader only.
type HostDaemonAction struct {
	// Type is Apply or Reset.
	Type DaemonActionType `json:"type"`
	// Generation is the configuration generation an Apply applies.
	// +optional
	Generation int64 `json:"generation,omitempty"`
	// Boot is the host's boot the action is for.
	Boot string `json:"boot"`
	// Requested is when it was decided.
	Requested metav1.Time `json:"requested"`
	// Attempts counts the calls started; LastAttempt is when the last one
	// started.
	// +optional
	Attempts int32 `json:"attempts,omitempty"`
	// +optional
	LastAttempt *metav1.Time `json:"lastAttempt,omitempty"`
	// Done is when a call succeeded: it is not made again.
	// +optional
	Done *metav1.Time `json:"done,omitempty"`
}

// Labels a Host carries from its hardware, for host selectors.
const (
	LabelHostArch     = "host.sovra.dev/arch"
	LabelHostCPUs     = "host.sovra.dev/cpus"
	LabelHostMemory   = "host.sovra.dev/memory-gib"
	LabelHostDisks    = "host.sovra.dev/disks"
	LabelHostDiskSize = "host.sovra.dev/disk-gib"
)

// HostSpec is what an operator and the provider decide about a host.
type HostSpec struct {
	// Accepted lets the host be claimed. A new host waits for an operator
	// (kubectl patch host NAME --type merge -p '{"spec":{"accepted":true}}')
	// unless sovrad accepts hosts by policy (--hosts-auto-accept).
	// +optional
	Accepted bool `json:"accepted,omitempty"`
	// ConsumerRef is the SovraMachine that claimed the host. The provider
	// sets it with the host's resourceVersion, so of several machines
	// claiming one host exactly one wins.
	// +optional
	ConsumerRef *corev1.ObjectReference `json:"consumerRef,omitempty"`
}

// HostHardware is what the host's Talos reports of its hardware.
type HostHardware struct {
	// Architecture is amd64 or arm64.
	// +optional
	Architecture string `json:"architecture,omitempty"`
	// CPUs is the number of logical processors.
	// +optional
	CPUs int32 `json:"cpus,omitempty"`
	// MemoryMiB is the memory in MiB.
	// +optional
	MemoryMiB int64 `json:"memoryMiB,omitempty"`
	// Disks are the host's disks.
	// +optional
	// +kubebuilder:validation:MaxItems=64
	// +listType=atomic
	Disks []HostDisk `json:"disks,omitempty"`
}

// HostDisk is one disk.
type HostDisk struct {
	// Name is the device name, e.g. nvme0n1.
	Name string `json:"name"`
	// SizeBytes is its size.
	SizeBytes int64 `json:"sizeBytes"`
	// Model, when known.
	// +optional
	Model string `json:"model,omitempty"`
}

// HostStatus is the host as sovrad sees it.
type HostStatus struct {
	// Phase is where the host is in its life.
	// +optional
	Phase HostPhase `json:"phase,omitempty"`
	// UUID is the machine's SMBIOS UUID as enrolled.
	// +optional
	UUID string `json:"uuid,omitempty"`
	// Addresses the host enrolled from and claimed.
	// +optional
	// +listType=atomic
	Addresses []string `json:"addresses,omitempty"`
	// Hardware is what the host reported.
	// +optional
	Hardware *HostHardware `json:"hardware,omitempty"`
	// Cluster and Machine name the cluster and the Machine (namespace/name)
	// the host serves.
	// +optional
	Cluster string `json:"cluster,omitempty"`
	// +optional
	Machine string `json:"machine,omitempty"`
	// Mode is what the host's agent last reported it runs: "enrollment"
	// (the enrollment configuration) or "configured".
	// +optional
	Mode string `json:"mode,omitempty"`
	// ReleasedGeneration is the generation of the configuration last
	// released to the host; RunningGeneration the one it reports running.
	// +optional
	ReleasedGeneration int64 `json:"releasedGeneration,omitempty"`
	// +optional
	RunningGeneration int64 `json:"runningGeneration,omitempty"`
	// ConfigHash is the SHA-256 of the bootstrap data of the released
	// generation: a new hash means a new generation.
	// +optional
	ConfigHash string `json:"configHash,omitempty"`
	// Boot is the boot the host last reported.
	// +optional
	Boot string `json:"boot,omitempty"`
	// ReleaseRequested is when the host's machine let it go; ReleaseBoot
	// the boot it ran then: a Sync from a later boot on the enrollment
	// configuration returns it to the pool.
	// +optional
	ReleaseRequested *metav1.Time `json:"releaseRequested,omitempty"`
	// +optional
	ReleaseBoot string `json:"releaseBoot,omitempty"`
	// TalosActor is who changes the host's Talos through its API while it
	// runs its machine's configuration: Agent (a control plane) or Daemon
	// (a worker); empty on the enrollment configuration.
	// +optional
	TalosActor TalosActor `json:"talosActor,omitempty"`
	// DaemonAction is what sovrad does, or did, to the host through its
	// Talos API (a worker's new configuration generation, its reset on
	// release); nil when nothing.
	// +optional
	DaemonAction *HostDaemonAction `json:"daemonAction,omitempty"`
	// LastSync is when the host's agent last reported.
	// +optional
	LastSync *metav1.Time `json:"lastSync,omitempty"`
	// Conditions: Attested, ConfigReleased, Reset, DaemonAction.
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// Host is a machine in sovra's pool: it booted the enrollment configuration,
// enrolled and attested, and waits to be claimed by a machine of a cluster.
// Its name is its SovraNode's.
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster
// +kubebuilder:subresource:status
// +kubebuilder:printcolumn:name="Phase",type=string,JSONPath=`.status.phase`
// +kubebuilder:printcolumn:name="Accepted",type=boolean,JSONPath=`.spec.accepted`
// +kubebuilder:printcolumn:name="Attested",type=string,JSONPath=`.status.conditions[?(@.type=="Attested")].status`
// +kubebuilder:printcolumn:name="Cluster",type=string,JSONPath=`.status.cluster`
// +kubebuilder:printcolumn:name="Machine",type=string,JSONPath=`.status.machine`
// +kubebuilder:printcolumn:name="CPUs",type=integer,JSONPath=`.status.hardware.cpus`
// +kubebuilder:printcolumn:name="Memory MiB",type=integer,JSONPath=`.status.hardware.memoryMiB`
// +kubebuilder:printcolumn:name="Addresses",type=string,JSONPath=`.status.addresses`,priority=1
// +kubebuilder:printcolumn:name="UUID",type=string,JSONPath=`.status.uuid`,priority=1
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type Host struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   HostSpec   `json:"spec,omitempty"`
	Status HostStatus `json:"status,omitempty"`
}

// HostList is a list of Hosts.
//
// +kubebuilder:object:root=true
type HostList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []Host `json:"items"`
}
