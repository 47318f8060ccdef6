// Package version reports the version of the sovra binaries, stamped at build time.
package version

// Version is the release this binary was built from, set with
// -ldflags "-X github.com/sovra-dev/sovra/internal/version.Version=...".
// It is "dev" for builds without the flag.
var Version = "dev"
