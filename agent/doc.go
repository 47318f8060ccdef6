// Package agent is the node side of sovra: a binary shipped as a Talos system
// extension that attests the machine with its TPM, fetches keys for the volumes
// it unlocks, discovers its peers and elects one control-plane node to bootstrap
// etcd. The subpackages hold the pieces; cmd/sovra-agent composes them.
package agent
