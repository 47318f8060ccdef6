// Package membership holds the stories of the daemon's ClusterService against
// the real sovrad: node credentials over mutual TLS, the membership list of a
// cluster from SovraNode records, and the bootstrap lease as a
// compare-and-swap on a Lease in the real Kubernetes API, raced by many
// nodes at once.
package membership
