// Package metrics declares sovra's own metrics, each once, with its help
// text and labels, and registers them in the registry the API server serves
// on /metrics (k8s.io/component-base/metrics/legacyregistry, where kine's
// metrics are too), beside the reconcile metrics of the in-process
// controller-runtime managers (controllerruntime.go).
//
// The packages that count (attestation, kms, nodeauth, membership, the
// bootstrap fence, connlimit, nodeapi, hosts, bootconfig) own their label values: reasons are
// the same CamelCase constants their log lines and events carry, so a
// panel's reason finds its log lines. Every label has a small, fixed set of
// values: never a node name, a UUID, an address or an error text.
package metrics

import (
	k8smetrics "k8s.io/component-base/metrics"
	"k8s.io/component-base/metrics/legacyregistry"
)

// namespace prefixes every sovra metric.
const namespace = "sovra"

// Attestation (package attestation).
var (
	// Enrollments counts finished or refused enrollments.
	Enrollments = k8smetrics.NewCounterVec(&k8smetrics.CounterOpts{
		Namespace: namespace, Name: "enrollments_total",
		Help: "Enrollments of a node's TPM, by outcome (enrolled, refused, invalid, retry, error) and the method that admitted its EK " +
			"(Certificate, AllowList, TrustOnFirstUse; None when the EK was not admitted).",
	}, []string{"outcome", "method"})

	// Attestations counts attestation verdicts.
	Attestations = k8smetrics.NewCounterVec(&k8smetrics.CounterOpts{
		Namespace: namespace, Name: "attestations_total",
		Help: "Attestation verdicts, by result (passed; failed: the node's TPM signed evidence that broke a policy or its event log, recorded on the node; " +
			"rejected: evidence not accepted, nothing recorded) and reason (AttestationPassed, PolicyWarnings, PolicyViolation, EventLogMismatch, EvidenceRejected).",
	}, []string{"result", "reason"})

	// SealingWindowsOpened counts the sealing windows opened for a record.
	SealingWindowsOpened = k8smetrics.NewCounterVec(&k8smetrics.CounterOpts{
		Namespace: namespace, Name: "sealing_windows_opened_total",
		Help: "Sealing windows opened on a node's record, by reason (Enrollment, Operator, Wipe): times in which anyone who knows the node's UUID may Seal.",
	}, []string{"reason"})
)

// Key custody (package kms).
var (
	// KMSDecisions counts the KMS's and the volume key service's decisions.
	KMSDecisions = k8smetrics.NewCounterVec(&k8smetrics.CounterOpts{
		Namespace: namespace, Subsystem: "kms", Name: "decisions_total",
		Help: "Key decisions, by operation (Seal, Unseal, VolumeKey), decision (allowed, denied) and reason (as in the kms decision log line; " +
			"RateLimited for calls over the per-source or per-node rate).",
	}, []string{"op", "decision", "reason"})

	// KMSUnexpectedReleases counts the key releases no reported boot explains.
	KMSUnexpectedReleases = k8smetrics.NewCounterVec(&k8smetrics.CounterOpts{
		Namespace: namespace, Subsystem: "kms", Name: "unexpected_releases_total",
		Help: "Key releases nothing the node reported explains (the UnexpectedUnseal alarm raised on its record), by reason.",
	}, []string{"reason"})

	// KMSQuarantines counts the nodes the KMS quarantined.
	KMSQuarantines = k8smetrics.NewCounterVec(&k8smetrics.CounterOpts{
		Namespace: namespace, Subsystem: "kms", Name: "quarantines_total",
		Help: "Nodes quarantined (no Unseal, no volume key, no node credential until an operator clears them), by reason.",
	}, []string{"reason"})

	// KMSLedgerEntries is this replica's ledger of key releases by verdict.
	KMSLedgerEntries = k8smetrics.NewGaugeVec(&k8smetrics.GaugeOpts{
		Namespace: namespace, Subsystem: "kms", Name: "ledger_entries",
		Help: "Entries in this replica's ledger of key releases, by verdict (Pending: waiting for the node to report the boot that explains it; Explained; Unexpected).",
	}, []string{"verdict"})

	// KMSLedgerWrites counts the writes of ledger segments to the API.
	KMSLedgerWrites = k8smetrics.NewCounterVec(&k8smetrics.CounterOpts{
		Namespace: namespace, Subsystem: "kms", Name: "ledger_writes_total",
		Help: "Writes of this replica's ledger segments to the API, by result (ok, error: retried at the next flush).",
	}, []string{"result"})
)

// Node credentials, the node API and its listeners (packages nodeauth,
// nodeapi, connlimit).
var (
	// NodeCredentialRefusals counts refused node credentials.
	NodeCredentialRefusals = k8smetrics.NewCounterVec(&k8smetrics.CounterOpts{
		Namespace: namespace, Name: "node_credential_refusals_total",
		Help: "Calls refused for their node credential, by reason (NoCertificate, InvalidCredential, RecordDeleted, EarlierRecordInstance, " +
			"Quarantined, NotEnrolled, NotAttested, RecordUnreadable).",
	}, []string{"reason"})

	// NodeAPIRateLimited counts node API calls refused over the per-address rate.
	NodeAPIRateLimited = k8smetrics.NewCounter(&k8smetrics.CounterOpts{
		Namespace: namespace, Subsystem: "nodeapi", Name: "rate_limited_total",
		Help: "Enrollment, nonce and attestation calls refused over the per-address rate (--node-rate-per-ip).",
	})

	// ConnectionsRefused counts connections closed over a cap at accept.
	ConnectionsRefused = k8smetrics.NewCounterVec(&k8smetrics.CounterOpts{
		Namespace: namespace, Name: "connections_refused_total",
		Help: "Connections to the node API and KMS listeners closed as soon as accepted, by listener and the cap they were over " +
			"(per_source: --node-max-conns-per-ip; total: --node-max-conns).",
	}, []string{"listener", "limit"})

	// ConnectionsHeld is the connections the capped listeners hold.
	ConnectionsHeld = k8smetrics.NewGauge(&k8smetrics.GaugeOpts{
		Namespace: namespace, Name: "connections_held",
		Help: "Connections the node API and KMS listeners hold now, together (bounded by --node-max-conns).",
	})
)

// Bootstrap (packages membership and capi/fence).
var (
	// BootstrapLeaseDecisions counts the decisions on bootstrap leases.
	BootstrapLeaseDecisions = k8smetrics.NewCounterVec(&k8smetrics.CounterOpts{
		Namespace: namespace, Name: "bootstrap_lease_decisions_total",
		Help: "Decisions on clusters' bootstrap leases, asked by agents or the Talos control-plane provider, by the phase asked for " +
			"(Held, Bootstrapping, Bootstrapped) and the transition (BootstrapLeaseWon, BootstrapLeaseRenewed, BootstrapLeaseHeld, " +
			"BootstrapStarted, Bootstrapped, BootstrapLeaseDenied).",
	}, []string{"phase", "reason"})

	// BootstrapFenceRefusals counts the provider's reads the fence refused.
	BootstrapFenceRefusals = k8smetrics.NewCounter(&k8smetrics.CounterOpts{
		Namespace: namespace, Name: "bootstrap_fence_refusals_total",
		Help: "Reads of a cluster's talosconfig the bootstrap fence refused the Talos control-plane provider: it may not bootstrap that cluster now.",
	})
)

// Machines (packages hosts, capi/infra and bootconfig).
var (
	// ConfigReleases counts the decisions on machine configurations.
	ConfigReleases = k8smetrics.NewCounterVec(&k8smetrics.CounterOpts{
		Namespace: namespace, Name: "config_releases_total",
		Help: "Decisions on a claimed host's machine configuration, by decision (released, refused) and reason " +
			"(ConfigReleased, AttestationFailed, NotAttested, AttestationTooOld, ConfigInvalid, NotAccepted).",
	}, []string{"decision", "reason"})

	// HostClaims counts the claims of hosts by machines.
	HostClaims = k8smetrics.NewCounterVec(&k8smetrics.CounterOpts{
		Namespace: namespace, Name: "host_claims_total",
		Help: "Claims of a pool host by a SovraMachine, by result (claimed; lost: another machine claimed the host first; none: no host available).",
	}, []string{"result"})

	// BootConfigFetches counts the fetches of the enrollment configuration.
	BootConfigFetches = k8smetrics.NewCounterVec(&k8smetrics.CounterOpts{
		Namespace: namespace, Name: "boot_config_fetches_total",
		Help: "Fetches of the enrollment configuration, by what they did to the KMS (Created, Pending, Known, BoundElsewhere, Full, NoUUID, KMSOff) " +
			"or why they were refused (RateLimited, BadRequest, Unavailable).",
	}, []string{"outcome"})
)

func init() {
	legacyregistry.MustRegister(
		Enrollments, Attestations, SealingWindowsOpened,
		KMSDecisions, KMSUnexpectedReleases, KMSQuarantines, KMSLedgerEntries, KMSLedgerWrites,
		NodeCredentialRefusals, NodeAPIRateLimited, ConnectionsRefused, ConnectionsHeld,
		BootstrapLeaseDecisions, BootstrapFenceRefusals,
		ConfigReleases, HostClaims, BootConfigFetches,
	)
	legacyregistry.Registerer().MustRegister(controllerRuntime)
}
