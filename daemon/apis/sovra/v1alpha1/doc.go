// Package v1alpha1 holds the sovra.dev/v1alpha1 API: the cluster-scoped
// record of each enrolled node (SovraNode), the attestation policies that
// judge them (AttestationPolicy), the markers of used attestation nonces
// (AttestationNonce), the binding of each SMBIOS UUID to one record
// (UUIDClaim), and the KMS's ledger of key releases (UnsealLedger).
//
// +kubebuilder:object:generate=true
// +groupName=sovra.dev
package v1alpha1

//go:generate go run sigs.k8s.io/controller-tools/cmd/controller-gen@v0.17.3 object paths=. crd:crdVersions=v1 output:crd:artifacts:config=crds
