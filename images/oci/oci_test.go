package oci

import (
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

var created = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

func testImage(t *testing.T, arch, content string) v1.Image {
	t.Helper()

	l, err := Layer([]Entry{
		{Path: "/usr/local/bin/tool", Mode: 0o755, Data: []byte(content)},
		{Path: "var/lib/app", Mode: fs.ModeDir | 0o700, UID: 65532, GID: 65532},
		{Path: "/tmp", Mode: fs.ModeDir | fs.ModeSticky | 0o777},
	}, created)
	if err != nil {
		t.Fatal(err)
	}

	img, err := Image(Spec{Arch: arch, Layers: []v1.Layer{l}, Created: created, Config: v1.Config{User: "65532"}})
	if err != nil {
		t.Fatal(err)
	}

	return img
}

func TestImagesAreReproducible(t *testing.T) {
	a, err := testImage(t, "amd64", "x").Digest()
	if err != nil {
		t.Fatal(err)
	}

	b, err := testImage(t, "amd64", "x").Digest()
	if err != nil {
		t.Fatal(err)
	}

	c, err := testImage(t, "amd64", "y").Digest()
	if err != nil {
		t.Fatal(err)
	}

	if a != b || a == c {
		t.Fatalf("digests: same input %s vs %s, other input %s", a, b, c)
	}
}

func TestUnpackKeepsModesAndParents(t *testing.T) {
	dir := t.TempDir()
	if err := Unpack(testImage(t, "amd64", "x"), dir); err != nil {
		t.Fatal(err)
	}

	for p, want := range map[string]fs.FileMode{
		"usr":                0o755 | fs.ModeDir,
		"usr/local/bin/tool": 0o755,
		"var/lib/app":        0o700 | fs.ModeDir,
		"tmp":                0o777 | fs.ModeDir | fs.ModeSticky,
	} {
		st, err := os.Lstat(filepath.Join(dir, p))
		if err != nil {
			t.Fatal(err)
		}

		if st.Mode() != want {
			t.Errorf("%s: mode %v, want %v", p, st.Mode(), want)
		}
	}
}

func TestWriteLayoutAndTarball(t *testing.T) {
	dir := t.TempDir()
	imgs := map[string]v1.Image{"amd64": testImage(t, "amd64", "a"), "arm64": testImage(t, "arm64", "b")}

	if _, err := WriteLayout(filepath.Join(dir, "oci"), "v1.0.0", imgs); err != nil {
		t.Fatal(err)
	}

	idx, err := layout.ImageIndexFromPath(filepath.Join(dir, "oci"))
	if err != nil {
		t.Fatal(err)
	}

	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}

	names := map[string]v1.Descriptor{}
	for _, d := range im.Manifests {
		names[d.Annotations[AnnotationRefName]] = d
	}

	for arch, img := range imgs {
		d, ok := names["v1.0.0-"+arch]
		if !ok || d.Platform == nil || d.Platform.Architecture != arch || d.Platform.OS != "linux" {
			t.Fatalf("%s: descriptor %+v", arch, d)
		}

		want, _ := img.Digest()
		if d.Digest != want {
			t.Errorf("%s: digest %s, want %s", arch, d.Digest, want)
		}
	}

	multi, ok := names["v1.0.0"]
	if !ok || !multi.MediaType.IsIndex() {
		t.Fatalf("no multi-platform index named v1.0.0: %+v", names)
	}

	file := filepath.Join(dir, "img.tar")
	if err := WriteTarball(file, "tool:v1.0.0", imgs["arm64"]); err != nil {
		t.Fatal(err)
	}

	back, err := tarball.ImageFromPath(file, nil)
	if err != nil {
		t.Fatal(err)
	}

	// A tarball has no manifest of its own (the reader makes a Docker one),
	// so compare what it carries: the config blob and the layers.
	got, _ := back.ConfigName()
	want, _ := imgs["arm64"].ConfigName()

	if got != want {
		t.Errorf("tarball image config %s, want %s", got, want)
	}
}

func TestTag(t *testing.T) {
	for in, want := range map[string]string{
		"v1.2.3":                 "v1.2.3",
		"v1.2.3-4-gabcdef-dirty": "v1.2.3-4-gabcdef-dirty",
		"v1.2.3+build/7":         "v1.2.3-build-7",
		"":                       "dev",
		".hidden":                "hidden",
		strings.Repeat("a", 200): strings.Repeat("a", 128),
	} {
		if got := Tag(in); got != want {
			t.Errorf("Tag(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestCheckStaticELF(t *testing.T) {
	// /bin/true is a dynamically linked executable of the host's architecture.
	if err := CheckStaticELF("/bin/true", runtime.GOARCH); err == nil || !strings.Contains(err.Error(), "dynamically linked") {
		t.Errorf("/bin/true: %v, want a dynamic-linking error", err)
	}

	other := map[string]string{"amd64": "arm64", "arm64": "amd64"}[runtime.GOARCH]
	if err := CheckStaticELF("/bin/true", other); err == nil || !strings.Contains(err.Error(), "is built for") {
		t.Errorf("/bin/true as %s: %v, want an architecture error", other, err)
	}

	files, err := RuntimeFiles("/", "/bin/true", runtime.GOARCH)
	if err != nil {
		t.Fatal(err)
	}

	if len(files) < 2 {
		t.Errorf("/bin/true needs %v, want at least the interpreter and libc", files)
	}
}
