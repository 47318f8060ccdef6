// Package fence keeps the Talos control-plane provider (CACPPT) and the sovra
// agents from bootstrapping etcd on two different nodes of one cluster.
//
// Both would otherwise bootstrap on their own: the agents elect the node with
// the earliest boot time and win the cluster's bootstrap lease
// (daemon/membership) before they call Talos Bootstrap; CACPPT, once every
// control-plane Machine has an address, lists /var/lib/etcd/member on them
// and, finding it nowhere, bootstraps the lowest address (in string order).
// The fence makes the lease the one authority for both, in two parts:
//
//   - The gate (gate.go) sits between CACPPT and the API. CACPPT reaches a
//     node only through the cluster's "<cluster>-talosconfig" Secret, and the
//     gate hands it out in a reconcile that may bootstrap only when the
//     cluster's lease is committed to exactly the address this very
//     reconcile would bootstrap, judged from the TalosControlPlane and
//     Machines CACPPT itself read in it. Otherwise the read fails with the
//     reason, which CACPPT shows in its MachinesBootstrapped condition and
//     retries.
//   - The controller (controller.go) keeps the two moving. When an agent has
//     bootstrapped, it marks the TalosControlPlane bootstrapped, so CACPPT
//     stops trying. When no agent holds the lease and CACPPT is ready, it
//     commits the lease to CACPPT's target: at once when no SovraNode is
//     labelled with the cluster, after a grace period when some are or the
//     control plane asks to wait for agents, so that agents that are booting
//     get their turn first. It deletes the lease with the control plane.
//
// The lease's cluster is the Cluster API Cluster's name, the value agents'
// SovraNodes carry in the label sovra.dev/cluster; names must therefore be
// unique across namespaces.
package fence

import (
	"cmp"
	"fmt"
	"slices"
	"sync"

	controlplanev1 "github.com/siderolabs/cluster-api-control-plane-provider-talos/api/v1alpha3"
	"k8s.io/apimachinery/pkg/runtime/schema"
	clusterv1 "sigs.k8s.io/cluster-api/api/v1beta1"
)

const (
	// talosconfigSuffix names a cluster's talosconfig Secret after the
	// cluster (CABPT's naming, which CACPPT reads).
	talosconfigSuffix = "-talosconfig"
	// holderPrefix prefixes the TalosControlPlane's namespace/name in the
	// lease's holder identity when CACPPT holds it; SovraNode names (ek-…)
	// never contain a slash.
	holderPrefix = "taloscontrolplane/"
)

// Holder is the lease holder identity of a TalosControlPlane.
func Holder(tcp *controlplanev1.TalosControlPlane) string {
	return holderPrefix + tcp.Namespace + "/" + tcp.Name
}

// ClusterName is the name of the Cluster that owns tcp, from its owner
// reference, falling back to the cluster-name label, as CACPPT finds it.
func ClusterName(tcp *controlplanev1.TalosControlPlane) string {
	for _, ref := range tcp.OwnerReferences {
		gv, err := schema.ParseGroupVersion(ref.APIVersion)
		if err == nil && ref.Kind == "Cluster" && gv.Group == clusterv1.GroupVersion.Group {
			return ref.Name
		}
	}
	return tcp.Labels[clusterv1.ClusterNameLabel]
}

// Target is the address CACPPT bootstraps given machines: each machine's
// first InternalIP, else its first ExternalIP, and the lowest of them in
// string order. ok is false when a machine has neither (CACPPT does not
// bootstrap then) or there is no machine.
func Target(machines []clusterv1.Machine) (string, bool) {
	var addrs []string
	for i := range machines {
		a, ok := machineAddress(&machines[i])
		if !ok {
			return "", false
		}
		addrs = append(addrs, a)
	}
	if len(addrs) == 0 {
		return "", false
	}
	return slices.Min(addrs), true
}

// machineAddress is a machine's first InternalIP, else its first ExternalIP.
func machineAddress(m *clusterv1.Machine) (string, bool) {
	for _, want := range []clusterv1.MachineAddressType{clusterv1.MachineInternalIP, clusterv1.MachineExternalIP} {
		for _, a := range m.Status.Addresses {
			if a.Type == want {
				return a.Address, true
			}
		}
	}
	return "", false
}

// lastSaid remembers the reason last logged per key, so that a reason is
// logged when it changes rather than on every retry. It is safe for
// concurrent use; its zero value is ready.
type lastSaid[K comparable] struct {
	mu   sync.Mutex
	last map[K]string
}

// changed records reason for key and reports whether it differs from the
// reason recorded before.
func (l *lastSaid[K]) changed(key K, reason string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.last == nil {
		l.last = map[K]string{}
	}
	changed := l.last[key] != reason
	l.last[key] = reason
	return changed
}

// forget drops key's reason.
func (l *lastSaid[K]) forget(key K) {
	l.mu.Lock()
	delete(l.last, key)
	l.mu.Unlock()
}

// describe names a lease holder for messages: an agent's node, or CACPPT.
func describe(holder, address string) string {
	return fmt.Sprintf("%s (%s)", holder, cmp.Or(address, "no address"))
}
