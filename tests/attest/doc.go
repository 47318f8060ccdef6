// Package attest holds the end-to-end story of TPM attestation: a real agent
// (its TPM being the reference simulator or swtpm with a real EK certificate)
// enrolls with and attests to a real node API server over TLS, and a list of
// attacks is each refused with a clear reason and no change to the node's
// record.
//
// Run it with swtpm (apt: swtpm swtpm-tools) and the simulator (cgo):
//
//	go test -tags tpmsimulator ./tests/attest/
//
// The node records live on a fake API client; with SOVRA_KUBECONFIG set to a
// running sovrad's kubeconfig they live in its API instead (CRDs installed
// first) and the story ends with `kubectl get sovranodes` (bin/kubectl).
package attest
