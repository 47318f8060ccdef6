// Package tpm groups the ways the agent reaches a TPM, one subpackage per
// transport: device (the kernel's /dev/tpmrm0 or /dev/tpm0), swtpm (a
// software TPM over TCP, for labs and tests) and simulator (the Microsoft
// reference TPM through go-tpm-tools, cgo, tests only). Each returns an
// io.ReadWriteCloser carrying raw TPM 2.0 commands and responses; the caller's
// interface (agent/attest.TPM) is what they implement.
package tpm
