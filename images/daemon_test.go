package images

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/images/oci"
	"github.com/sovra-dev/sovra/internal/testutil"
)

// fakeDaemon stands in for sovrad: a cgo binary (as sovrad is), dynamically
// linked against the host's libc, that prints who it runs as.
const fakeDaemon = `package main

// #include <unistd.h>
import "C"

import (
	"fmt"
	"os"
)

func main() {
	fmt.Printf("uid=%d gid=%d args=%v data=%s\n", int(C.getuid()), int(C.getgid()), os.Args[1:], os.Getenv("SOVRA_DATA_DIR"))
}
`

func buildFakeDaemon(t *testing.T) string {
	t.Helper()
	testutil.Require(t, "go", "gcc")

	src := t.TempDir()
	for name, content := range map[string]string{
		"go.mod":  "module fakesovrad\n\ngo 1.22\n",
		"main.go": fakeDaemon,
	} {
		if err := os.WriteFile(filepath.Join(src, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}

	bin := filepath.Join(t.TempDir(), "sovrad")
	cmd := exec.Command("go", "build", "-o", bin, ".")
	cmd.Dir = src
	cmd.Env = append(os.Environ(), "CGO_ENABLED=1", "GOFLAGS=-mod=mod", "GOWORK=off")

	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building a cgo stand-in for sovrad: %v\n%s", err, out)
	}

	return bin
}

func TestDaemonImageConfig(t *testing.T) {
	bin := buildFakeDaemon(t)

	img, arch, err := DaemonImage(DaemonOptions{Binary: bin, Version: "v0.1.0", Created: time.Unix(1e9, 0)})
	if err != nil {
		t.Fatal(err)
	}

	if arch != runtime.GOARCH {
		t.Errorf("arch %s, want the host's %s", arch, runtime.GOARCH)
	}

	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}

	c := cf.Config
	if c.User != "65532:65532" {
		t.Errorf("user %q, want 65532:65532", c.User)
	}

	if !slices.Equal(c.Entrypoint, []string{DaemonBinary}) {
		t.Errorf("entrypoint %q, want [%s]", c.Entrypoint, DaemonBinary)
	}

	if hc := c.Healthcheck; hc == nil || !slices.Equal(hc.Test, []string{"CMD", DaemonBinary, "healthcheck"}) {
		t.Errorf("health check %+v, want %s healthcheck", hc, DaemonBinary)
	}

	if _, ok := c.Volumes[DataDir]; !ok {
		t.Errorf("volumes %v lack %s", c.Volumes, DataDir)
	}

	if cf.OS != "linux" || cf.Architecture != runtime.GOARCH {
		t.Errorf("platform %s/%s", cf.OS, cf.Architecture)
	}

	dir := t.TempDir()
	if err := oci.Unpack(img, dir); err != nil {
		t.Fatal(err)
	}

	// The loader and libc came along from the host, at the paths the binary
	// asks for.
	libs, err := oci.RuntimeFiles("/", bin, runtime.GOARCH)
	if err != nil {
		t.Fatal(err)
	}

	for _, lib := range append(libs, DaemonBinary, "/etc/passwd") {
		if _, err := os.Stat(filepath.Join(dir, lib)); err != nil {
			t.Errorf("image lacks %s: %v", lib, err)
		}
	}

	st, err := os.Stat(filepath.Join(dir, DataDir))
	if err != nil {
		t.Fatal(err)
	}

	if st.Mode().Perm() != dataDirMode {
		t.Errorf("%s mode %v, want %v", DataDir, st.Mode().Perm(), os.FileMode(dataDirMode))
	}
}

// TestDaemonImageRuns unpacks the image and runs its entrypoint chrooted into
// it as the image's user: the binary finds every library it needs inside the
// image, and runs without root.
func TestDaemonImageRuns(t *testing.T) {
	testutil.RequireRoot(t)

	bin := buildFakeDaemon(t)

	img, _, err := DaemonImage(DaemonOptions{Binary: bin, Version: "v0.1.0", Created: time.Unix(1e9, 0)})
	if err != nil {
		t.Fatal(err)
	}

	dir := t.TempDir()
	if err := oci.Unpack(img, dir); err != nil {
		t.Fatal(err)
	}

	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}

	cmd := exec.Command(cf.Config.Entrypoint[0], "--version")
	cmd.Env = cf.Config.Env
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Chroot:     dir,
		Credential: &syscall.Credential{Uid: UID, Gid: GID},
	}

	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("running the entrypoint in the image: %v\n%s", err, out)
	}

	want := "uid=" + strconv.Itoa(UID) + " gid=" + strconv.Itoa(GID) + " args=[--version] data=" + DataDir
	if strings.TrimSpace(string(out)) != want {
		t.Fatalf("entrypoint printed %q, want %q", out, want)
	}
}
