package extension_test

import (
	"context"
	"maps"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/sovra-dev/sovra/images"
	"github.com/sovra-dev/sovra/images/oci"
	"github.com/sovra-dev/sovra/internal/testutil"
)

// runTimeout bounds `sovrad --help` inside the unpacked image.
const runTimeout = time.Minute

// TestDaemonImage builds the daemon image from bin/sovrad as `make images`
// does, and checks it: sovrad is the entrypoint, it runs as the non-root
// user, its data directory is a volume, and (as root) the unpacked image runs
// sovrad with nothing from the host.
func TestDaemonImage(t *testing.T) {
	sovrad := testutil.Bin(t, "sovrad")
	out := t.TempDir()

	res, err := images.BuildDaemon(context.Background(), images.BuildOptions{
		DaemonOptions: images.DaemonOptions{Binary: sovrad, Version: testVersion, Created: time.Unix(0, 0)},
		OutDir:        out,
	})
	if err != nil {
		t.Fatal(err)
	}

	tag, err := name.NewTag("sovrad:" + testVersion)
	if err != nil {
		t.Fatal(err)
	}

	img, err := tarball.ImageFromPath(res.Tarball, &tag)
	if err != nil {
		t.Fatalf("%s: %v", res.Tarball, err)
	}

	if _, err := layout.FromPath(res.Layout); err != nil {
		t.Fatalf("%s: %v", res.Layout, err)
	}

	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}

	c := cf.Config
	t.Logf("sovrad image (%s): user %s, entrypoint %v, volumes %v, env %v", res.Arch, c.User, c.Entrypoint, slices.Sorted(maps.Keys(c.Volumes)), c.Env)

	uid, _, _ := strings.Cut(c.User, ":")
	if n, err := strconv.Atoi(uid); err != nil || n == 0 {
		t.Errorf("user %q: want a numeric non-root uid", c.User)
	}

	if !slices.Equal(c.Entrypoint, []string{images.DaemonBinary}) {
		t.Errorf("entrypoint %v, want [%s]", c.Entrypoint, images.DaemonBinary)
	}

	if _, ok := c.Volumes[images.DataDir]; !ok {
		t.Errorf("volumes %v lack %s", c.Volumes, images.DataDir)
	}

	if !slices.Contains(c.Env, "SOVRA_DATA_DIR="+images.DataDir) {
		t.Errorf("env %v does not point sovrad at %s", c.Env, images.DataDir)
	}

	if cf.OS != "linux" || cf.Architecture != res.Arch {
		t.Errorf("platform %s/%s, want linux/%s", cf.OS, cf.Architecture, res.Arch)
	}

	testutil.RequireRoot(t)

	dir := filepath.Join(t.TempDir(), "rootfs")
	if err := oci.Unpack(img, dir); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), runTimeout)
	defer cancel()

	cmd := exec.CommandContext(ctx, c.Entrypoint[0], "--help")
	cmd.Env = c.Env
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Chroot:     dir,
		Credential: &syscall.Credential{Uid: images.UID, Gid: images.GID},
	}

	help, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("sovrad --help in the image, as %s: %v\n%s", c.User, err, help)
	}

	if !strings.Contains(string(help), "--data-dir") {
		t.Errorf("sovrad --help printed:\n%s", help)
	}
}
