// Package controllers names the controllers sovrad can run in-process and
// parses the --controllers selection. It has no dependencies, so the daemon's
// configuration validates the flag without loading the controllers.
package controllers

import (
	"fmt"
	"slices"
	"sort"
	"strings"
)

// Controller names, as --controllers takes them.
const (
	Cluster            = "cluster"
	Machine            = "machine"
	MachineSet         = "machineset"
	MachineDeployment  = "machinedeployment"
	MachineHealthCheck = "machinehealthcheck"
	ClusterResourceSet = "clusterresourceset"
	TalosConfig        = "talosconfig"
	TalosControlPlane  = "taloscontrolplane"
	GarbageCollector   = "garbagecollector"
	Namespace          = "namespace"
	// Infrastructure is sovra's own infrastructure provider (SovraCluster,
	// SovraMachine) and its pool of hosts.
	Infrastructure = "infrastructure"

	// All selects every controller; None selects none (the replica serves the
	// API only); -name removes one from the selection so far.
	All  = "all"
	None = "none"
)

// Names lists every controller, in the order they are set up.
var Names = []string{
	Cluster, Machine, MachineSet, MachineDeployment, MachineHealthCheck, ClusterResourceSet,
	TalosConfig, TalosControlPlane, GarbageCollector, Namespace, Infrastructure,
}

// Set is a selection of controllers. The zero value selects none.
type Set map[string]bool

// Parse reads a --controllers value: a comma-separated list of names, all,
// none, and -name to drop one ("all,-garbagecollector"). An empty value means
// all. Unknown names are errors, listed together.
func Parse(value string) (Set, error) {
	value = strings.TrimSpace(value)
	if value == "" {
		value = All
	}
	set := Set{}
	var unknown []string
	for _, item := range strings.Split(value, ",") {
		item = strings.ToLower(strings.TrimSpace(item))
		switch {
		case item == "":
		case item == All:
			for _, n := range Names {
				set[n] = true
			}
		case item == None:
			clear(set)
		case strings.HasPrefix(item, "-") && slices.Contains(Names, item[1:]):
			delete(set, item[1:])
		case slices.Contains(Names, item):
			set[item] = true
		default:
			unknown = append(unknown, item)
		}
	}
	if len(unknown) > 0 {
		return nil, fmt.Errorf("unknown controllers %q: choose from all, none, %s (prefix - to exclude one)", unknown, strings.Join(Names, ", "))
	}
	return set, nil
}

// Has reports whether name is selected.
func (s Set) Has(name string) bool { return s[name] }

// Empty reports whether nothing is selected.
func (s Set) Empty() bool { return len(s) == 0 }

// Sorted returns the selected names in a stable order, for logs.
func (s Set) Sorted() []string {
	out := make([]string, 0, len(s))
	for n := range s {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}
