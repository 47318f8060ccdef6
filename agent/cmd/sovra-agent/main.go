// Command sovra-agent is the node agent of sovra, run by Talos as the extension
// service ext-sovra-agent.
//
// Usage:
//
//	sovra-agent [run] [flags]   run the agent (the default)
//	sovra-agent discover [flags] run one discovery round and print it as JSON
//	sovra-agent version         print the version
//
// Every flag of run has an environment variable; `sovra-agent help` lists them.
package main

import (
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/sovra-dev/sovra/agent/status"
	"github.com/sovra-dev/sovra/internal/version"
)

// Exit codes.
const (
	exitOK     = 0
	exitFailed = 1
	exitUsage  = 2
)

// command is one subcommand: it gets its arguments and returns the exit code.
type command struct {
	name    string
	summary string
	run     func(args []string, stdout, stderr io.Writer) int
}

// commands lists the subcommands; the first one is the default.
func commands() []command {
	return []command{
		{"run", "run the agent (default)", runCommand},
		{"discover", "run one discovery round and print the verified peers as JSON", discoverCommand},
		{"status", "print the status document of the agent on this node (--file - reads it from stdin)", status.Command},
		{"version", "print the version", func(_ []string, stdout, _ io.Writer) int {
			fmt.Fprintln(stdout, version.Version)

			return exitOK
		}},
	}
}

func main() {
	os.Exit(dispatch(os.Args[1:], os.Stdout, os.Stderr))
}

func dispatch(args []string, stdout, stderr io.Writer) int {
	cmds := commands()

	if len(args) > 0 && (args[0] == "help" || args[0] == "-h" || args[0] == "--help") {
		usage(stdout, cmds)

		return exitOK
	}

	if len(args) == 0 || strings.HasPrefix(args[0], "-") {
		return cmds[0].run(args, stdout, stderr)
	}

	for _, c := range cmds {
		if c.name == args[0] {
			return c.run(args[1:], stdout, stderr)
		}
	}

	fmt.Fprintf(stderr, "sovra-agent: unknown command %q\n", args[0])
	usage(stderr, cmds)

	return exitUsage
}
