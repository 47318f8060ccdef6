// Package images builds the daemon's container image without Docker: sovrad
// (built by `make bin/sovrad`, with cgo), the shared libraries it needs copied
// from the build host, a non-root user and the data directory as a volume. The
// image is for the build host's architecture: cgo binaries and their
// libraries come from the host, so a cross build needs a host (or a sysroot,
// see DaemonOptions.HostRoot) of the target architecture.
//
// The directory also holds the daemon's systemd unit (sovrad.service), an
// example ExtensionServiceConfig for the agent (extension-service-config.yaml)
// and a Grafana dashboard of sovrad's metrics (grafana-dashboard.json).
package images

import (
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/sovra-dev/sovra/images/oci"
)

const (
	// DaemonName names the image and its binary.
	DaemonName = "sovrad"
	// DaemonBinary is the daemon's path in the image (its entrypoint).
	DaemonBinary = "/usr/local/bin/sovrad"
	// DataDir is the daemon's data directory in the image, a volume.
	DataDir = "/var/lib/sovra"
	// UID and GID run the daemon: a non-root user, owner of DataDir.
	UID = 65532
	GID = 65532
	// User is the name of UID in the image's /etc/passwd.
	User = "sovra"
	// APIPort is the port of the daemon's Kubernetes API.
	APIPort = 6443
	// NodeAPIPort is the port of the node API (agents, and Talos's KMS
	// calls): sovrad's --node-listen default.
	NodeAPIPort = 7443

	// caBundle is where Debian-family hosts keep the system CA bundle; Go's
	// crypto/x509 looks there too.
	caBundle = "/etc/ssl/certs/ca-certificates.crt"

	// The health check's pacing: sovrad answers in milliseconds once up;
	// a first start (keys, datastore, CRDs) takes up to a minute or two.
	healthInterval    = 30 * time.Second
	healthTimeout     = 10 * time.Second
	healthStartPeriod = 2 * time.Minute
	healthRetries     = 3

	dataDirMode = 0o700
	tmpMode     = 0o1777
	binaryMode  = 0o755
	fileMode    = 0o644
)

// DaemonOptions configure DaemonImage.
type DaemonOptions struct {
	// Binary is the sovrad executable to package (bin/sovrad).
	Binary string
	// Version labels the image.
	Version string
	// Created stamps the files and the image config.
	Created time.Time
	// HostRoot is where the binary's shared libraries are looked up: "" or
	// "/" for the build host, or a sysroot of the binary's architecture.
	HostRoot string
}

// DaemonImage builds the daemon image for the architecture of o.Binary.
func DaemonImage(o DaemonOptions) (v1.Image, string, error) {
	arch, err := BinaryArch(o.Binary)
	if err != nil {
		return nil, "", err
	}

	root := o.HostRoot
	if root == "" {
		root = "/"
	}

	libs, err := oci.RuntimeFiles(root, o.Binary, arch)
	if err != nil {
		return nil, "", fmt.Errorf("finding the shared libraries of %s: %w", o.Binary, err)
	}

	uid, gid := strconv.Itoa(UID), strconv.Itoa(GID)

	base := []oci.Entry{
		{Path: "/etc/passwd", Mode: fileMode, Data: []byte(
			"root:x:0:0:root:/root:/sbin/nologin\n" +
				User + ":x:" + uid + ":" + gid + ":sovra daemon:" + DataDir + ":/sbin/nologin\n")},
		{Path: "/etc/group", Mode: fileMode, Data: []byte("root:x:0:\n" + User + ":x:" + gid + ":\n")},
		{Path: "/etc/nsswitch.conf", Mode: fileMode, Data: []byte("passwd: files\ngroup: files\nhosts: files dns\n")},
		{Path: "/tmp", Mode: fs.ModeDir | fs.ModeSticky | tmpMode},
		{Path: DataDir, Mode: fs.ModeDir | dataDirMode, UID: UID, GID: GID},
	}

	if _, err := os.Stat(filepath.Join(root, caBundle)); err == nil {
		base = append(base, oci.Entry{Path: caBundle, Mode: fileMode, Source: filepath.Join(root, caBundle)})
	}

	for _, lib := range libs {
		base = append(base, oci.Entry{Path: lib, Mode: binaryMode, Source: filepath.Join(root, lib)})
	}

	runtimeLayer, err := oci.Layer(base, o.Created)
	if err != nil {
		return nil, "", err
	}

	binLayer, err := oci.Layer([]oci.Entry{{Path: DaemonBinary, Mode: binaryMode, Source: o.Binary}}, o.Created)
	if err != nil {
		return nil, "", err
	}

	img, err := oci.Image(oci.Spec{
		Arch:      arch,
		Layers:    []v1.Layer{runtimeLayer, binLayer},
		Created:   o.Created,
		CreatedBy: "sovra images/cmd/build-images",
		Config: v1.Config{
			User:       uid + ":" + gid,
			Entrypoint: []string{DaemonBinary},
			// sovrad reads every flag from SOVRA_<FLAG> as well: a
			// container's loopback is of no use, so it listens on every
			// interface; `docker run -e SOVRA_...` overrides both.
			Env: []string{
				"PATH=/usr/local/bin:/usr/bin:/bin",
				"HOME=" + DataDir,
				"SOVRA_DATA_DIR=" + DataDir,
				"SOVRA_LISTEN=0.0.0.0:" + strconv.Itoa(APIPort),
			},
			ExposedPorts: map[string]struct{}{
				strconv.Itoa(APIPort) + "/tcp":     {},
				strconv.Itoa(NodeAPIPort) + "/tcp": {},
			},
			// `sovrad healthcheck` asks /readyz (with SOVRA_LISTEN and
			// SOVRA_DATA_DIR from the environment). Docker runs it; the
			// OCI format has no health check, so podman and Kubernetes
			// need it given (an exec probe, podman --health-cmd).
			Healthcheck: &v1.HealthConfig{
				Test:        []string{"CMD", DaemonBinary, "healthcheck"},
				Interval:    healthInterval,
				Timeout:     healthTimeout,
				StartPeriod: healthStartPeriod,
				Retries:     healthRetries,
			},
			WorkingDir: DataDir,
			Volumes:    map[string]struct{}{DataDir: {}},
			StopSignal: "SIGTERM",
			Labels: map[string]string{
				oci.AnnotationTitle:                 DaemonName,
				oci.AnnotationVersion:               o.Version,
				"org.opencontainers.image.licenses": "Apache-2.0",
			},
		},
		Annotations: map[string]string{
			oci.AnnotationTitle:   DaemonName,
			oci.AnnotationVersion: o.Version,
			oci.AnnotationCreated: o.Created.UTC().Format(time.RFC3339),
		},
	})
	if err != nil {
		return nil, "", err
	}

	return img, arch, nil
}

// BinaryArch returns the Go architecture of a Linux ELF executable.
func BinaryArch(file string) (string, error) {
	f, err := elf.Open(file)
	if err != nil {
		return "", fmt.Errorf("reading %s: %w", file, err)
	}
	defer f.Close() //nolint:errcheck

	for _, arch := range []string{"amd64", "arm64"} {
		if m, _ := oci.ELFMachine(arch); m == f.Machine {
			return arch, nil
		}
	}

	return "", fmt.Errorf("%s is built for %s, which sovra does not ship", file, f.Machine)
}

// BuildOptions configure BuildDaemon.
type BuildOptions struct {
	DaemonOptions

	// OutDir receives oci/ and sovrad-<arch>.tar.
	OutDir string
}

// BuildResult is what BuildDaemon wrote.
type BuildResult struct {
	Arch    string
	Image   v1.Image
	Layout  string
	Tarball string
}

// BuildDaemon writes the daemon image as an OCI layout (OutDir/oci) and an
// image tarball (OutDir/sovrad-<arch>.tar, tagged sovrad:<version>).
func BuildDaemon(_ context.Context, o BuildOptions) (*BuildResult, error) {
	if o.Version == "" {
		return nil, errors.New("building the daemon image: no version")
	}

	img, arch, err := DaemonImage(o.DaemonOptions)
	if err != nil {
		return nil, err
	}

	tag := oci.Tag(o.Version)
	res := &BuildResult{
		Arch:    arch,
		Image:   img,
		Layout:  filepath.Join(o.OutDir, "oci"),
		Tarball: filepath.Join(o.OutDir, DaemonName+"-"+arch+".tar"),
	}

	if err := oci.WriteTarball(res.Tarball, DaemonName+":"+tag, img); err != nil {
		return nil, err
	}

	if _, err := oci.WriteLayout(res.Layout, tag, map[string]v1.Image{arch: img}); err != nil {
		return nil, err
	}

	return res, nil
}
