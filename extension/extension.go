// Package extension packages the sovra node agent as a Talos system
// extension: an OCI image per architecture whose root holds manifest.yaml and
// rootfs/, with the agent binary under /usr/local/lib/containers/sovra-agent/
// and its service spec in /usr/local/etc/containers/sovra-agent.yaml, the
// layout Talos's installer and imager unpack. It checks what it builds with
// Talos's own machinery types before writing anything.
package extension

import (
	"bytes"
	"context"
	_ "embed"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
	"text/template"
	"time"

	"github.com/blang/semver/v4"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/siderolabs/talos/pkg/machinery/extensions"
	"github.com/siderolabs/talos/pkg/machinery/extensions/services"
	machineryversion "github.com/siderolabs/talos/pkg/machinery/version"
	"go.yaml.in/yaml/v4"

	"github.com/sovra-dev/sovra/images/oci"
)

const (
	// Name is the extension's name, its service spec's name and, prefixed
	// with "ext-", the Talos service that runs the agent.
	Name = "sovra-agent"
	// ServiceID is the Talos service (`talosctl logs ext-sovra-agent`).
	ServiceID = "ext-" + Name

	// ManifestPath is the manifest's path in the extension image.
	ManifestPath = "manifest.yaml"
	// RootfsDir is the directory of the image that Talos overlays onto /.
	RootfsDir = "rootfs"
	// ServiceSpecPath is where Talos looks for extension service specs.
	ServiceSpecPath = "/usr/local/etc/containers/" + Name + ".yaml"
	// ContainerRoot is the root filesystem of the ext-sovra-agent container.
	ContainerRoot = "/usr/local/lib/containers/" + Name
	// BinaryPath is the agent binary on the node.
	BinaryPath = ContainerRoot + "/" + Name

	// AgentPackage is the Go package of the agent binary.
	AgentPackage = "./agent/cmd/sovra-agent"
	// versionVar is stamped with the version at link time.
	versionVar = "github.com/sovra-dev/sovra/internal/version.Version"

	binaryMode = 0o755
	fileMode   = 0o644
)

// Archs are the architectures the extension is built for.
var Archs = []string{"amd64", "arm64"}

//go:embed manifest.yaml
var manifestTemplate string

//go:embed sovra-agent.yaml
var serviceSpec []byte

// ServiceSpec returns the extension's service spec (sovra-agent.yaml).
func ServiceSpec() []byte { return bytes.Clone(serviceSpec) }

// Manifest renders manifest.yaml for version.
func Manifest(version string) ([]byte, error) {
	t, err := template.New(ManifestPath).Option("missingkey=error").Parse(manifestTemplate)
	if err != nil {
		return nil, fmt.Errorf("parsing %s: %w", ManifestPath, err)
	}

	var buf bytes.Buffer
	if err := t.Execute(&buf, struct{ Version string }{version}); err != nil {
		return nil, fmt.Errorf("rendering %s: %w", ManifestPath, err)
	}

	return buf.Bytes(), nil
}

// DecodeServiceSpec decodes and validates a service spec the way Talos's
// extension service controller does (machinery's services.Spec, strict
// enums for restart and network): an invalid spec is one Talos skips.
func DecodeServiceSpec(b []byte) (services.Spec, error) {
	var spec services.Spec

	if err := yaml.NewDecoder(bytes.NewReader(b)).Decode(&spec); err != nil {
		return spec, fmt.Errorf("decoding the service spec: %w", err)
	}

	if err := spec.Validate(); err != nil {
		return spec, fmt.Errorf("validating the service spec: %w", err)
	}

	return spec, nil
}

// Check loads an unpacked extension (a directory holding manifest.yaml and
// rootfs/) with Talos's extensions.Load and validates it for talosVersion
// (constraints and contents), then decodes and validates every service spec
// it carries. It is the check Talos applies when it installs the extension.
func Check(dir string, talosVersion semver.Version) (*extensions.Extension, []services.Spec, error) {
	ext, err := extensions.Load(dir)
	if err != nil {
		return nil, nil, fmt.Errorf("loading extension %s: %w", dir, err)
	}

	if err := ext.Validate(
		extensions.WithValidateConstraints(),
		extensions.WithValidateContents(),
		extensions.WithTalosVersion(&talosVersion),
	); err != nil {
		return nil, nil, fmt.Errorf("validating extension %s: %w", dir, err)
	}

	specDir := filepath.Join(ext.RootfsPath(), filepath.FromSlash(path.Dir(ServiceSpecPath)))

	files, err := os.ReadDir(specDir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, nil, err
	}

	var specs []services.Spec

	for _, f := range files {
		if filepath.Ext(f.Name()) != ".yaml" {
			continue
		}

		b, err := os.ReadFile(filepath.Join(specDir, f.Name()))
		if err != nil {
			return nil, nil, err
		}

		spec, err := DecodeServiceSpec(b)
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w", f.Name(), err)
		}

		specs = append(specs, spec)
	}

	return ext, specs, nil
}

// Image builds the extension image for arch around agentBinary, which must be
// a static Linux executable for arch.
func Image(arch, agentBinary, version string, created time.Time) (v1.Image, error) {
	if err := oci.CheckStaticELF(agentBinary, arch); err != nil {
		return nil, fmt.Errorf("packaging the %s agent: %w", arch, err)
	}

	manifest, err := Manifest(version)
	if err != nil {
		return nil, err
	}

	var m extensions.Manifest
	if err := yaml.Unmarshal(manifest, &m); err != nil {
		return nil, fmt.Errorf("decoding %s: %w", ManifestPath, err)
	}

	if m.Version != "v1alpha1" || m.Metadata.Name != Name {
		return nil, fmt.Errorf("%s: want version v1alpha1 and name %s, have %q and %q", ManifestPath, Name, m.Version, m.Metadata.Name)
	}

	if _, err := DecodeServiceSpec(serviceSpec); err != nil {
		return nil, err
	}

	layer, err := oci.Layer([]oci.Entry{
		{Path: ManifestPath, Mode: fileMode, Data: manifest},
		{Path: RootfsDir + ServiceSpecPath, Mode: fileMode, Data: serviceSpec},
		{Path: RootfsDir + BinaryPath, Mode: binaryMode, Source: agentBinary},
	}, created)
	if err != nil {
		return nil, err
	}

	return oci.Image(oci.Spec{
		Arch:      arch,
		Layers:    []v1.Layer{layer},
		Created:   created,
		CreatedBy: "sovra extension/cmd/build-extension",
		Annotations: map[string]string{
			oci.AnnotationTitle:   Name,
			oci.AnnotationVersion: version,
			oci.AnnotationCreated: created.UTC().Format(time.RFC3339),
		},
	})
}

// BuildAgent compiles the agent for linux/arch as a static binary (no cgo),
// stamped with version, into out. repoRoot is the module's root directory.
func BuildAgent(ctx context.Context, repoRoot, arch, version, out string) error {
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath",
		"-ldflags", "-s -w -X "+versionVar+"="+version,
		"-o", out, AgentPackage)
	cmd.Dir = repoRoot
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+arch)

	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("building the agent for %s: %w\n%s", arch, err, strings.TrimSpace(string(b)))
	}

	return oci.CheckStaticELF(out, arch)
}

// Options configure Build.
type Options struct {
	// RepoRoot is the module's root directory.
	RepoRoot string
	// OutDir receives oci/ and sovra-agent-<arch>.tar.
	OutDir string
	// Version is the extension's and the agent's version (from git).
	Version string
	// Created stamps every file and the image configs (the commit time, so a
	// rebuild of the same commit gives the same digests).
	Created time.Time
	// Archs to build; nil means Archs.
	Archs []string
	// Logf reports progress; nil is silent.
	Logf func(format string, args ...any)
}

// Result is what Build wrote.
type Result struct {
	// Layout is the OCI layout directory (OutDir/oci).
	Layout string
	// Tarballs maps each architecture to its image tarball.
	Tarballs map[string]string
	// Images maps each architecture to its image.
	Images map[string]v1.Image
}

// Build compiles the agent for every architecture and writes the extension
// as an OCI layout (OutDir/oci) and as one image tarball per architecture
// (OutDir/sovra-agent-<arch>.tar, tagged sovra-agent:<version>).
func Build(ctx context.Context, o Options) (*Result, error) {
	logf := o.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}

	archs := o.Archs
	if archs == nil {
		archs = Archs
	}

	if o.Version == "" {
		return nil, errors.New("building the extension: no version")
	}

	tmp, err := os.MkdirTemp("", "sovra-extension-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp) //nolint:errcheck

	res := &Result{
		Layout:   filepath.Join(o.OutDir, "oci"),
		Tarballs: map[string]string{},
		Images:   map[string]v1.Image{},
	}

	talosVersion, err := semver.ParseTolerant(machineryversion.Tag)
	if err != nil {
		return nil, fmt.Errorf("parsing the Talos machinery version %q: %w", machineryversion.Tag, err)
	}

	tag := oci.Tag(o.Version)

	for _, arch := range archs {
		bin := filepath.Join(tmp, Name+"-"+arch)

		logf("building %s for linux/%s", AgentPackage, arch)

		if err := BuildAgent(ctx, o.RepoRoot, arch, o.Version, bin); err != nil {
			return nil, err
		}

		img, err := Image(arch, bin, o.Version, o.Created)
		if err != nil {
			return nil, err
		}

		// Unpack what was built and check it as Talos will, before
		// anything is written.
		unpacked := filepath.Join(tmp, "check-"+arch)
		if err := oci.Unpack(img, unpacked); err != nil {
			return nil, err
		}

		if _, _, err := Check(unpacked, talosVersion); err != nil {
			return nil, fmt.Errorf("the %s image fails Talos's checks: %w", arch, err)
		}

		res.Images[arch] = img
		res.Tarballs[arch] = filepath.Join(o.OutDir, Name+"-"+arch+".tar")

		if err := oci.WriteTarball(res.Tarballs[arch], Name+":"+tag, img); err != nil {
			return nil, err
		}

		logf("wrote %s", res.Tarballs[arch])
	}

	if _, err := oci.WriteLayout(res.Layout, tag, res.Images); err != nil {
		return nil, err
	}

	logf("wrote %s (%s, %s)", res.Layout, tag, strings.Join(archs, ", "))

	return res, nil
}
