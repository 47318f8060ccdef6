// Command kubectl is the upstream kubectl, built from k8s.io/kubectl at the
// pinned version so tests talk to the daemon with the real client and never
// depend on whatever kubectl a machine has installed.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	"k8s.io/kubectl/pkg/cmd"
	"k8s.io/kubectl/pkg/cmd/util"
)

func main() {
	command := cmd.NewDefaultKubectlCommand()
	if err := cli.RunNoErrOutput(command); err != nil {
		util.CheckErr(err)
	}
	os.Exit(0)
}
