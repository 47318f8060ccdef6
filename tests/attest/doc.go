// Package attest holds the end-to-end story of TPM attestation against the
// built sovrad (bin/sovrad, SQLite, the Talos KMS on the node API's port as in
// the default deployment): a real agent (its TPM being the reference simulator
// or swtpm with a real EK certificate) enrolls and attests over TLS, seals its
// volume key, and a list of attacks is each refused with a clear reason,
// while the node's own calls (Unseal, membership) keep succeeding, and with no
// change to the node's record beyond the audit trail (log lines, and the
// verdict of evidence the node's own TPM signed). Records are read with a real
// API client from the daemon's admin kubeconfig; logs are read from the
// offset where each attack starts.
//
// The replica stories run two sovrad on one PostgreSQL (tests/pgtest): a
// nonce of one replica is used once across both, two TPMs racing for one
// UUID through different replicas bind it once, and sealing windows hold
// across replicas.
//
// Run it with swtpm (apt: swtpm swtpm-tools), PostgreSQL (apt: postgresql)
// and the simulator (cgo), after make build:
//
//	SOVRA_BIN_DIR=$PWD/bin go test -tags tpmsimulator ./tests/attest/
package attest
