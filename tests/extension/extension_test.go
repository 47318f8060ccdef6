// Package extension_test builds the sovra-agent Talos system extension the way
// `make extension` does and checks the result with Talos's own code (the
// machinery module Talos installs extensions with): the image unpacks to an
// extension that extensions.Load and Validate accept, its service spec decodes
// into Talos's services.Spec and validates, and each architecture's image
// carries a static binary of that architecture.
package extension_test

import (
	"context"
	"debug/elf"
	agentconfig "github.com/sovra-dev/sovra/agent/config"
	"io/fs"
	"maps"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/blang/semver/v4"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/siderolabs/talos/pkg/machinery/config/config"
	"github.com/siderolabs/talos/pkg/machinery/config/configloader"
	"github.com/siderolabs/talos/pkg/machinery/config/types/runtime/extensions"
	talosext "github.com/siderolabs/talos/pkg/machinery/extensions"
	"github.com/siderolabs/talos/pkg/machinery/extensions/services"
	"github.com/siderolabs/talos/pkg/machinery/nethelpers"
	talosversion "github.com/siderolabs/talos/pkg/machinery/version"
	"go.yaml.in/yaml/v4"

	"github.com/sovra-dev/sovra/agent/status"
	"github.com/sovra-dev/sovra/extension"
	"github.com/sovra-dev/sovra/images"
	"github.com/sovra-dev/sovra/images/oci"
	"github.com/sovra-dev/sovra/internal/testutil"
)

const (
	testVersion = "v0.0.0-test"
	buildTime   = 10 * time.Minute
)

// buildCreated stamps the test builds.
var buildCreated = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

var (
	buildOnce sync.Once
	built     *extension.Result
	buildErr  error
	buildDir  string
)

// build runs the extension build once for the package, as `make extension`
// does (both architectures, agent compiled from this tree).
func build(t *testing.T) *extension.Result {
	t.Helper()
	testutil.Require(t, "go")

	buildOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), buildTime)
		defer cancel()

		buildDir, buildErr = os.MkdirTemp("", "sovra-extension-test-")
		if buildErr != nil {
			return
		}

		built, buildErr = extension.Build(ctx, extension.Options{
			RepoRoot: testutil.RepoRoot(t),
			OutDir:   buildDir,
			Version:  testVersion,
			Created:  buildCreated,
			Logf:     t.Logf,
		})
	})

	if buildErr != nil {
		t.Fatalf("building the extension: %v", buildErr)
	}

	return built
}

func TestMain(m *testing.M) {
	code := m.Run()

	if buildDir != "" {
		os.RemoveAll(buildDir) //nolint:errcheck
	}

	os.Exit(code)
}

// talosVersion is the Talos release of the machinery module in go.mod.
func talosVersion(t *testing.T) semver.Version {
	t.Helper()

	v, err := semver.ParseTolerant(talosversion.Tag)
	if err != nil {
		t.Fatalf("machinery version %q: %v", talosversion.Tag, err)
	}

	return v
}

// layoutImages reads the per-platform images from the OCI layout, the way the
// Talos imager reads a layout directory: index entries with a platform.
func layoutImages(t *testing.T, dir string) map[string]v1.Image {
	t.Helper()

	p, err := layout.FromPath(dir)
	if err != nil {
		t.Fatal(err)
	}

	idx, err := p.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}

	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}

	out := map[string]v1.Image{}

	for _, d := range im.Manifests {
		if d.Platform == nil {
			continue
		}

		if d.Platform.OS != "linux" {
			t.Errorf("%s: platform %s", d.Digest, d.Platform)
		}

		img, err := p.Image(d.Digest)
		if err != nil {
			t.Fatal(err)
		}

		out[d.Platform.Architecture] = img
	}

	return out
}

// talosCheck is what Talos does with an unpacked extension: Load, Validate
// (constraints and contents), and decode + validate each service spec found
// in /usr/local/etc/containers with machinery's services.Spec. It returns the
// loaded extension and the service specs.
func talosCheck(dir string, version semver.Version) (*talosext.Extension, map[string]services.Spec, error) {
	ext, err := talosext.Load(dir)
	if err != nil {
		return nil, nil, err
	}

	if err := ext.Validate(
		talosext.WithValidateConstraints(),
		talosext.WithValidateContents(),
		talosext.WithTalosVersion(&version),
	); err != nil {
		return nil, nil, err
	}

	specDir := filepath.Join(ext.RootfsPath(), "usr", "local", "etc", "containers")

	entries, err := os.ReadDir(specDir)
	if err != nil {
		return nil, nil, err
	}

	specs := map[string]services.Spec{}

	for _, e := range entries {
		if filepath.Ext(e.Name()) != ".yaml" {
			continue
		}

		f, err := os.Open(filepath.Join(specDir, e.Name()))
		if err != nil {
			return nil, nil, err
		}

		var spec services.Spec

		err = yaml.NewDecoder(f).Decode(&spec)
		f.Close() //nolint:errcheck

		if err != nil {
			return nil, nil, err
		}

		if err := spec.Validate(); err != nil {
			return nil, nil, err
		}

		specs[e.Name()] = spec
	}

	return ext, specs, nil
}

func unpack(t *testing.T, img v1.Image) string {
	t.Helper()

	dir := filepath.Join(t.TempDir(), extension.Name)
	if err := oci.Unpack(img, dir); err != nil {
		t.Fatal(err)
	}

	return dir
}

func TestExtensionPassesTalosValidation(t *testing.T) {
	res := build(t)
	imgs := layoutImages(t, res.Layout)

	if got := slices.Sorted(maps.Keys(imgs)); !slices.Equal(got, []string{"amd64", "arm64"}) {
		t.Fatalf("layout platforms %v, want amd64 and arm64", got)
	}

	for arch, img := range imgs {
		t.Run(arch, func(t *testing.T) {
			dir := unpack(t, img)

			ext, specs, err := talosCheck(dir, talosVersion(t))
			if err != nil {
				t.Fatalf("Talos rejects the %s extension: %v", arch, err)
			}

			m := ext.Manifest.Metadata
			t.Logf("%s: %s %s, compatibility %q, services %v", arch, m.Name, m.Version, m.Compatibility.Talos.Version, slices.Sorted(maps.Keys(specs)))

			if ext.Manifest.Version != "v1alpha1" || m.Name != extension.Name || m.Version != testVersion ||
				m.Author == "" || m.Description == "" {
				t.Errorf("manifest metadata %+v", m)
			}

			// A constraint at the wrong level decodes to nothing and checks
			// nothing: it must be under metadata.compatibility.
			if m.Compatibility.Talos.Version == "" {
				t.Error("manifest has no metadata.compatibility.talos.version")
			}

			spec, ok := specs[extension.Name+".yaml"]
			if !ok {
				t.Fatalf("no %s service spec: %v", extension.Name, specs)
			}

			checkSpec(t, spec, ext.RootfsPath(), arch)
		})
	}
}

func TestExtensionConstraintRejectsOldTalos(t *testing.T) {
	res := build(t)
	dir := unpack(t, res.Images["amd64"])

	old := semver.MustParse("1.12.0")
	if _, _, err := talosCheck(dir, old); err == nil || !strings.Contains(err.Error(), "can't be satisfied") {
		t.Fatalf("Talos v1.12.0 accepted the extension (%v)", err)
	}
}

// checkSpec checks what the service spec asks of Talos, beyond Talos's own
// validation: the entrypoint exists in the container rootfs and is this
// arch's static binary, the dependencies, and only the mounts the agent needs.
func checkSpec(t *testing.T, spec services.Spec, rootfs, arch string) {
	t.Helper()

	if spec.Name != extension.Name || spec.Restart != services.RestartAlways {
		t.Errorf("name %q restart %v", spec.Name, spec.Restart)
	}

	entry := filepath.Join(rootfs, extension.ContainerRoot, filepath.Clean("/"+spec.Container.Entrypoint))
	checkStaticELF(t, entry, arch)
	checkAgentSize(t, entry, arch)

	var deps []string

	for _, d := range spec.Depends {
		switch {
		case len(d.Network) > 0:
			for _, n := range d.Network {
				deps = append(deps, "network:"+n.String())
			}
		case d.Time:
			deps = append(deps, "time")
		case d.Configuration:
			deps = append(deps, "configuration")
		case d.Path != "":
			deps = append(deps, "path:"+d.Path)
		case d.Service != "":
			deps = append(deps, "service:"+d.Service)
		}
	}

	for _, want := range []string{"network:" + nethelpers.StatusAddresses.String(), "time", "configuration"} {
		if !slices.Contains(deps, want) {
			t.Errorf("depends %v lacks %s", deps, want)
		}
	}

	type mount struct{ dst, mode string }

	var mounts []mount

	for _, m := range spec.Container.Mounts {
		mode := "rw"
		if slices.Contains(m.Options, "ro") {
			mode = "ro"
		}

		if m.Source != m.Destination || m.Type != "bind" {
			t.Errorf("mount %+v: want a bind mount of the same path", m)
		}

		mounts = append(mounts, mount{m.Destination, mode})
	}

	want := []mount{
		{"/dev", "ro"},
		{"/sys/kernel/security", "ro"},
		{"/sys/firmware", "ro"},
		{status.DefaultDir, "rw"},
	}
	if !slices.Equal(mounts, want) {
		t.Errorf("mounts %v, want exactly %v", mounts, want)
	}

	checkStartsEverywhere(t, spec)

	if spec.Container.Security.WriteableRootfs || spec.Container.Security.WriteableSysfs {
		t.Errorf("security %+v: the agent needs neither a writeable rootfs nor sysfs", spec.Container.Security)
	}
}

func checkStaticELF(t *testing.T, file, arch string) {
	t.Helper()

	machine := map[string]elf.Machine{"amd64": elf.EM_X86_64, "arm64": elf.EM_AARCH64}[arch]

	f, err := elf.Open(file)
	if err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	defer f.Close() //nolint:errcheck

	if f.Class != elf.ELFCLASS64 || f.OSABI != elf.ELFOSABI_NONE && f.OSABI != elf.ELFOSABI_LINUX || f.Machine != machine {
		t.Errorf("%s: %s %s %s, want a Linux %s executable", file, f.Class, f.OSABI, f.Machine, machine)
	}

	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Errorf("%s has a program interpreter: not static", file)
		}
	}

	if libs, _ := f.ImportedLibraries(); len(libs) > 0 {
		t.Errorf("%s needs %v: not static", file, libs)
	}

	st, err := os.Stat(file)
	if err != nil {
		t.Fatal(err)
	}

	if st.Mode().Perm()&0o111 == 0 {
		t.Errorf("%s is not executable (%v)", file, st.Mode())
	}
}

func TestBrokenServiceSpecFails(t *testing.T) {
	res := build(t)
	version := talosVersion(t)

	for name, edit := range map[string]func(string) string{
		// The bug of the extension our users come from.
		"restart on-failure": func(s string) string {
			return strings.Replace(s, "restart: always", "restart: on-failure", 1)
		},
		"unknown network status": func(s string) string {
			return strings.Replace(s, "- connectivity", "- online", 1)
		},
		"two dependencies in one": func(s string) string {
			return strings.Replace(s, "- time: true", "- time: true\n    configuration: true", 1)
		},
		"no entrypoint": func(s string) string {
			return strings.Replace(s, "entrypoint: ./sovra-agent", "entrypoint: \"\"", 1)
		},
	} {
		t.Run(name, func(t *testing.T) {
			dir := unpack(t, res.Images["amd64"])
			file := filepath.Join(dir, "rootfs", filepath.FromSlash(extension.ServiceSpecPath))

			b, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}

			broken := edit(string(b))
			if broken == string(b) {
				t.Fatal("the edit changed nothing")
			}

			if err := os.WriteFile(file, []byte(broken), 0o644); err != nil {
				t.Fatal(err)
			}

			_, _, err = talosCheck(dir, version)
			if err == nil {
				t.Fatal("Talos accepts the broken spec")
			}

			t.Logf("rejected as Talos would: %v", strings.Join(strings.Fields(err.Error()), " "))

			if _, err := extension.DecodeServiceSpec([]byte(broken)); err == nil {
				t.Error("extension.DecodeServiceSpec (the build's own check) accepts it")
			}
		})
	}
}

// TestNoWorldWritableFiles checks the image's modes itself: Talos's
// contents validation means to refuse world-writable files, but in v1.13 it
// looks at the directory entry's type bits only and lets them through.
func TestNoWorldWritableFiles(t *testing.T) {
	res := build(t)

	for arch, img := range res.Images {
		dir := unpack(t, img)

		err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}

			info, err := d.Info()
			if err != nil {
				return err
			}

			if info.Mode().Perm()&0o002 != 0 {
				t.Errorf("%s: %s is world-writable (%v)", arch, path, info.Mode())
			}

			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}

func TestTarballsMatchLayout(t *testing.T) {
	res := build(t)
	imgs := layoutImages(t, res.Layout)

	for arch, file := range res.Tarballs {
		if filepath.Base(file) != "sovra-agent-"+arch+".tar" {
			t.Errorf("tarball name %s", file)
		}

		tag, err := name.NewTag("sovra-agent:" + testVersion)
		if err != nil {
			t.Fatal(err)
		}

		img, err := tarball.ImageFromPath(file, &tag)
		if err != nil {
			t.Fatalf("%s: %v", file, err)
		}

		cf, err := img.ConfigFile()
		if err != nil {
			t.Fatal(err)
		}

		if cf.OS != "linux" || cf.Architecture != arch {
			t.Errorf("%s: platform %s/%s", file, cf.OS, cf.Architecture)
		}

		got, _ := img.ConfigName()
		want, _ := imgs[arch].ConfigName()

		if got != want {
			t.Errorf("%s: config %s, layout's %s", file, got, want)
		}

		dir := unpack(t, img)
		checkStaticELF(t, filepath.Join(dir, "rootfs", filepath.FromSlash(extension.BinaryPath)), arch)
	}
}

// TestExampleExtensionServiceConfig decodes images/extension-service-config.yaml
// with Talos's config loader: it is an ExtensionServiceConfig for this
// extension that Talos's own validation accepts.
func TestExampleExtensionServiceConfig(t *testing.T) {
	file := filepath.Join(testutil.RepoRoot(t), "images", "extension-service-config.yaml")

	cfg, err := configloader.NewFromFile(file)
	if err != nil {
		t.Fatalf("Talos cannot load %s: %v", file, err)
	}

	docs := cfg.Documents()
	if len(docs) != 1 {
		t.Fatalf("%d documents, want 1", len(docs))
	}

	esc, ok := docs[0].(*extensions.ServiceConfigV1Alpha1)
	if !ok {
		t.Fatalf("document is %T, want an ExtensionServiceConfig", docs[0])
	}

	if _, err := esc.Validate(metalMode{}); err != nil {
		t.Fatalf("Talos rejects it: %v", err)
	}

	if esc.Name() != extension.Name {
		t.Errorf("name %q, want %q (the service spec's name)", esc.Name(), extension.Name)
	}

	env := map[string]string{}
	for _, e := range esc.Environment() {
		k, v, ok := strings.Cut(e, "=")
		if !ok || !strings.HasPrefix(k, "SOVRA_") {
			t.Errorf("environment %q: want SOVRA_*=value", e)
		}
		env[k] = v
	}

	if len(esc.ConfigFiles()) == 0 {
		t.Error("no config files")
	}

	// The agent itself accepts the example's settings, with the config files
	// where Talos would mount them (here under a temporary root).
	root := t.TempDir()
	mounted := map[string]string{}
	for _, f := range esc.ConfigFiles() {
		p := filepath.Join(root, filepath.FromSlash(f.MountPath()))
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(f.Content()), 0o600); err != nil {
			t.Fatal(err)
		}
		mounted[f.MountPath()] = p
	}
	for _, k := range []string{"SOVRA_DAEMON_CA", "SOVRA_TALOSCONFIG"} {
		if v, ok := env[k]; ok {
			if mounted[v] == "" {
				t.Errorf("%s=%s is not one of the example's config files", k, v)
			}
			env[k] = mounted[v]
		}
	}
	if _, ok := env["SOVRA_TALOSCONFIG"]; !ok {
		env["SOVRA_TALOSCONFIG"] = mounted[agentconfig.DefaultTalosConfigPath]
	}
	if _, err := agentconfig.Load(nil, func(k string) (string, bool) { v, ok := env[k]; return v, ok }); err != nil {
		t.Errorf("the agent rejects the example's settings: %v", err)
	}
}

// metalMode is Talos's metal runtime mode, as far as validation asks.
type metalMode struct{}

func (metalMode) String() string        { return "metal" }
func (metalMode) RequiresInstall() bool { return true }
func (metalMode) InContainer() bool     { return false }

// TestExampleVolumeConfig loads images/volume-config-kms.yaml with Talos's
// config loader: STATE and EPHEMERAL keys are KMS keys pointing at the
// daemon's node API over TLS, and every document passes Talos's validation.
func TestExampleVolumeConfig(t *testing.T) {
	file := filepath.Join(testutil.RepoRoot(t), "images", "volume-config-kms.yaml")

	cfg, err := configloader.NewFromFile(file)
	if err != nil {
		t.Fatalf("Talos cannot load %s: %v", file, err)
	}

	kinds := map[string]bool{}

	for _, doc := range cfg.Documents() {
		kinds[doc.Kind()] = true

		if v, ok := doc.(config.Validator); ok {
			if _, err := v.Validate(metalMode{}); err != nil {
				t.Errorf("Talos rejects the %s document: %v", doc.Kind(), err)
			}
		}
	}

	if !kinds["TrustedRootsConfig"] {
		t.Error("no TrustedRootsConfig for the daemon's CA")
	}

	for _, volume := range []string{"STATE", "EPHEMERAL"} {
		vc, ok := cfg.Volumes().ByName(volume)
		if !ok {
			t.Fatalf("no VolumeConfig for %s", volume)
		}

		keys := vc.Encryption().Keys()
		if len(keys) == 0 {
			t.Fatalf("%s: no encryption keys", volume)
		}

		for _, k := range keys {
			if k.KMS() == nil {
				t.Errorf("%s slot %d: not a KMS key", volume, k.Slot())

				continue
			}

			u, err := url.Parse(k.KMS().Endpoint())
			if err != nil || u.Scheme != "https" || u.Port() != strconv.Itoa(images.NodeAPIPort) {
				t.Errorf("%s slot %d: endpoint %q, want https://<daemon>:%d", volume, k.Slot(), k.KMS().Endpoint(), images.NodeAPIPort)
			}
		}
	}
}

// TestExtensionIsReproducible rebuilds the extension with the same version
// and time: every image digest is the same, so a published digest can be
// checked against a rebuild of its commit.
func TestExtensionIsReproducible(t *testing.T) {
	first := build(t)

	ctx, cancel := context.WithTimeout(context.Background(), buildTime)
	defer cancel()

	again, err := extension.Build(ctx, extension.Options{
		RepoRoot: testutil.RepoRoot(t),
		OutDir:   t.TempDir(),
		Version:  testVersion,
		Created:  buildCreated,
	})
	if err != nil {
		t.Fatal(err)
	}

	for arch, img := range first.Images {
		a, _ := img.Digest()
		b, _ := again.Images[arch].Digest()

		if a != b {
			t.Errorf("%s: %s, then %s", arch, a, b)
		}
	}
}
