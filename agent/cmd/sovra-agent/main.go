// Command sovra-agent is the node agent of sovra, run by Talos as the extension
// service ext-sovra-agent.
package main

import (
	"fmt"
	"os"

	"github.com/sovra-dev/sovra/internal/version"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "version" {
		fmt.Println(version.Version)
		return
	}
	fmt.Fprintf(os.Stderr, "sovra-agent %s\n", version.Version)
}
