// Command build-images builds the daemon's container image without Docker,
// from an already built sovrad (make bin/sovrad), for that binary's
// architecture (the build host's): an OCI layout (<out>/oci) and an image
// tarball (<out>/sovrad-<arch>.tar).
//
//	go run ./images/cmd/build-images --sovrad bin/sovrad --out dist/images
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"

	"github.com/sovra-dev/sovra/images"
	"github.com/sovra-dev/sovra/images/gitinfo"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "build-images:", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		sovrad   = flag.String("sovrad", "bin/sovrad", "the sovrad binary to package")
		out      = flag.String("out", "dist/images", "output directory")
		version  = flag.String("version", "", "image version (default: git describe)")
		hostRoot = flag.String("host-root", "/", "where sovrad's shared libraries are looked up (a sysroot of its architecture)")
	)

	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()

	wd, err := os.Getwd()
	if err != nil {
		return err
	}

	if *version == "" {
		*version = gitinfo.Version(ctx, wd)
	}

	created, err := gitinfo.Created(ctx, wd)
	if err != nil {
		return err
	}

	outDir, err := filepath.Abs(*out)
	if err != nil {
		return err
	}

	res, err := images.BuildDaemon(ctx, images.BuildOptions{
		DaemonOptions: images.DaemonOptions{
			Binary:   *sovrad,
			Version:  *version,
			Created:  created,
			HostRoot: *hostRoot,
		},
		OutDir: outDir,
	})
	if err != nil {
		return err
	}

	d, err := res.Image.Digest()
	if err != nil {
		return err
	}

	fmt.Printf("%s\tlinux/%s\t%s\n%s\n", res.Tarball, res.Arch, d, res.Layout)

	return nil
}
