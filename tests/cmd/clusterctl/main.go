// Command clusterctl is the upstream clusterctl, built from
// sigs.k8s.io/cluster-api at the pinned version so tests read sovra's
// clusters with the real client (`clusterctl describe cluster`) and never
// depend on whatever clusterctl a machine has installed.
//
// It never downloads: the check for a newer release, which asks GitHub after
// every command, is always switched off. Commands that fetch provider
// manifests (init, upgrade, generate) are not for sovra: sovrad installs its
// providers itself.
package main

import (
	"os"

	"sigs.k8s.io/cluster-api/cmd/clusterctl/cmd"
)

// versionCheckEnv switches off clusterctl's release check.
const versionCheckEnv = "CLUSTERCTL_DISABLE_VERSIONCHECK"

func main() {
	_ = os.Setenv(versionCheckEnv, "true")
	cmd.Execute()
}
