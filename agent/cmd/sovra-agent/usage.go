package main

import (
	"fmt"
	"io"

	"github.com/sovra-dev/sovra/agent/config"
)

func usage(w io.Writer, cmds []command) {
	fmt.Fprintln(w, "usage: sovra-agent [command] [flags]")
	fmt.Fprintln(w, "\ncommands:")

	for _, c := range cmds {
		fmt.Fprintf(w, "  %-10s %s\n", c.name, c.summary)
	}

	fmt.Fprintln(w, "\nflags of run and discover:")
	fmt.Fprint(w, config.Usage())
}
