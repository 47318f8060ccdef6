package main

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"strings"

	"github.com/sovra-dev/sovra/daemon/custody"
)

// keyringUsage explains the keyring command.
const keyringUsage = `usage: sovrad keyring init|list|rotate MASTER-KEY-FILE

  init    create the file with one fresh master key (version 1), mode 0600;
          refuses a file that exists. sovrad --master-key-file also creates
          it when it is missing at the daemon's first start.
  list    print the master key versions in the file and the one that seals
          (never the keys)
  rotate  append a fresh version to an existing file (mode 0600, replaced
          atomically); it seals from the next start of each replica, and
          every older version still opens. It never creates a file: a new
          keyring opens none of the keys the old one sealed.

Rotation: run rotate on one copy, give every replica the new file, then
restart the replicas one after another. Until a replica restarts it still
seals with the old version, which every replica opens; a replica that
restarted seals with the new one, which a replica still running the old
file cannot open, so restart them all promptly (Talos retries an Unseal).
Never delete a version's line while any key sealed with it is in use.
`

// keyringCommand runs "sovrad keyring ..." and returns the exit code.
func keyringCommand(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && isHelp(args[0]) || len(args) == 2 && isHelp(args[1]) {
		fmt.Fprint(stdout, keyringUsage)
		return exitOK
	}
	if len(args) != 2 || strings.HasPrefix(args[1], "-") {
		fmt.Fprint(stderr, keyringUsage)
		return exitUsage
	}
	verb, path := args[0], args[1]
	switch verb {
	case "init":
		if err := custody.CreateKeyring(path); err != nil {
			if errors.Is(err, fs.ErrExist) {
				fmt.Fprintf(stderr, "sovrad keyring init: %s exists: it may hold keys that open sealed volumes; add a version with: sovrad keyring rotate %s\n", path, path)
			} else {
				fmt.Fprintf(stderr, "sovrad keyring init: %v\n", err)
			}
			return exitFailed
		}
		fmt.Fprintf(stdout, "created master keyring %s (mode 0600) with version 1: give every replica this file (--master-key-file)\n", path)
	case "rotate":
		v, err := custody.Rotate(path)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				fmt.Fprintf(stderr, "sovrad keyring rotate: no keyring at %s: rotate adds a version to an existing keyring; to start one, run: sovrad keyring init %s\n", path, path)
			} else {
				fmt.Fprintf(stderr, "sovrad keyring rotate: %v\n", err)
			}
			return exitFailed
		}
		fmt.Fprintf(stdout, "added master key version %d to %s: it seals once each replica restarts with this file\n", v, path)
	case "list":
	default:
		fmt.Fprint(stderr, keyringUsage)
		return exitUsage
	}
	k, err := custody.LoadKeyring(path)
	if err != nil {
		fmt.Fprintf(stderr, "sovrad keyring %s: %v\n", verb, err)
		return exitFailed
	}
	fmt.Fprintf(stdout, "%s: versions %v; version %d seals\n", path, k.Versions(), k.Current())
	return exitOK
}

// isHelp reports whether arg asks for a command's usage.
func isHelp(arg string) bool {
	return arg == "-h" || arg == "--help" || arg == "help"
}
