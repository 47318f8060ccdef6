// Command build-extension builds the sovra-agent Talos system extension
// without Docker: a static agent per architecture, packaged as an OCI layout
// (<out>/oci) and as image tarballs (<out>/sovra-agent-<arch>.tar).
//
//	go run ./extension/cmd/build-extension --out dist/extension
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"

	"github.com/sovra-dev/sovra/extension"
	"github.com/sovra-dev/sovra/images/gitinfo"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "build-extension:", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		out     = flag.String("out", "dist/extension", "output directory")
		version = flag.String("version", "", "version of the extension and the agent (default: git describe)")
		archs   = flag.String("archs", strings.Join(extension.Archs, ","), "comma-separated Go architectures")
	)

	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()

	wd, err := os.Getwd()
	if err != nil {
		return err
	}

	// Outside a git checkout (a source tarball), build from here.
	root, err := gitinfo.RepoRoot(ctx, wd)
	if err != nil {
		root = wd
	}

	if *version == "" {
		*version = gitinfo.Version(ctx, root)
	}

	created, err := gitinfo.Created(ctx, root)
	if err != nil {
		return err
	}

	outDir, err := filepath.Abs(*out)
	if err != nil {
		return err
	}

	res, err := extension.Build(ctx, extension.Options{
		RepoRoot: root,
		OutDir:   outDir,
		Version:  *version,
		Created:  created,
		Archs:    strings.Split(*archs, ","),
		Logf: func(format string, args ...any) {
			fmt.Fprintf(os.Stderr, format+"\n", args...)
		},
	})
	if err != nil {
		return err
	}

	for _, arch := range strings.Split(*archs, ",") {
		d, err := res.Images[arch].Digest()
		if err != nil {
			return err
		}

		fmt.Printf("%s\tlinux/%s\t%s\n", res.Tarballs[arch], arch, d)
	}

	return nil
}
