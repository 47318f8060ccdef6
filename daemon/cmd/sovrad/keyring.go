package main

import (
	"fmt"
	"io"
	"strings"

	"github.com/sovra-dev/sovra/daemon/custody"
)

// keyringUsage explains the keyring command.
const keyringUsage = `usage: sovrad keyring list|rotate MASTER-KEY-FILE

  list    print the master key versions in the file and the one that seals
          (never the keys)
  rotate  append a fresh version to the file (mode 0600, replaced
          atomically); it seals from the next start of each replica, and
          every older version still opens

Rotation: run rotate on one copy, give every replica the new file, then
restart the replicas one after another. Until a replica restarts it still
seals with the old version, which every replica opens; a replica that
restarted seals with the new one, which a replica still running the old
file cannot open, so restart them all promptly (Talos retries an Unseal).
Never delete a version's line while any key sealed with it is in use.
`

// keyringCommand runs "sovrad keyring ..." and returns the exit code.
func keyringCommand(args []string, stdout, stderr io.Writer) int {
	if len(args) != 2 || (args[0] != "list" && args[0] != "rotate") || strings.HasPrefix(args[1], "-") {
		fmt.Fprint(stderr, keyringUsage)
		return exitUsage
	}
	path := args[1]
	if args[0] == "rotate" {
		v, err := custody.Rotate(path)
		if err != nil {
			fmt.Fprintf(stderr, "sovrad keyring rotate: %v\n", err)
			return exitFailed
		}
		fmt.Fprintf(stdout, "added master key version %d to %s: it seals once each replica restarts with this file\n", v, path)
	}
	k, err := custody.LoadKeyring(path)
	if err != nil {
		fmt.Fprintf(stderr, "sovrad keyring %s: %v\n", args[0], err)
		return exitFailed
	}
	fmt.Fprintf(stdout, "%s: versions %v; version %d seals\n", path, k.Versions(), k.Current())
	return exitOK
}
