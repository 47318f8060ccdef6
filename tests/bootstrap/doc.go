// Package bootstrap holds the end-to-end stories of the zero-touch etcd
// bootstrap: network namespaces with one fake Talos node (tests/talosfake) and
// the real agent binary each (and, in the daemon story, the real sovrad with
// swtpm as every node's TPM: membership instead of a scan, and the bootstrap
// lease), an in-process simulation of thousands of boots on a fake clock, and
// the benchmarks of discovery.
package bootstrap
