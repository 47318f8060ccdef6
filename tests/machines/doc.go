// Package machines holds the end-to-end story of sovra's machines (issue
// 12) against the built binaries over the wire: bin/sovrad on SQLite with
// its boot server, and simulated Talos machines (tests/talosfake/bootsim),
// each in its own network namespace with its own swtpm, running the real
// bin/sovra-agent as the extension service ext-sovra-agent. The machines
// boot the enrollment configuration from talos.config=, seal their volumes
// with sovrad's KMS, enroll and attest, and appear as hosts; the operator
// accepts them and applies a Cluster with bin/kubectl; each machine gets
// exactly its own Machine's configuration, reboots into it, re-attests and
// unseals; scaling the MachineDeployment down wipes a host and shreds its
// keys, scaling up reuses it. The attacks (an enrollment-configuration
// fetch for a claimed machine, credentials of another host, an earlier
// boot or an earlier record, a host that is not claimed) get nothing.
// TestHostRefusals: a machine whose EK is not accepted, and a host whose
// attestation fails the policy (Available, then claimed), get nothing
// either, and a failed host returns to the pool only when an operator
// accepts it again.
//
// The benchmarks (`make bench`): BenchmarkProvision times `kubectl apply`
// of the story's Cluster to every Machine Provisioned on three such
// machines; BenchmarkHostPool measures claims and configuration releases
// per second with 50 simulated hosts (attested records whose agents the
// benchmark plays over mutual TLS).
package machines
