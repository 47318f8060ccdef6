// Package kms holds the end-to-end stories of key custody: the upstream
// Talos KMS client against the built sovrad over TLS, the attacks it must
// refuse, what the datastore holds, faults, and the boot-storm benchmark.
package kms
