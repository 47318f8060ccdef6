// Package oci builds OCI images from files on disk, without a container
// runtime: reproducible layers, single-platform images, an OCI layout that
// holds every platform, and per-platform tarballs that `docker load` and
// `crane push` accept. Both the Talos extension and the daemon image use it.
package oci

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

const (
	// OS is the only operating system the images are built for.
	OS = "linux"

	// AnnotationRefName names a manifest in an OCI layout's index.json, as
	// `skopeo copy oci:<dir>:<name>` and friends expect.
	AnnotationRefName = "org.opencontainers.image.ref.name"
	// AnnotationVersion is the version of the packaged software.
	AnnotationVersion = "org.opencontainers.image.version"
	// AnnotationCreated is the build time (RFC 3339).
	AnnotationCreated = "org.opencontainers.image.created"
	// AnnotationTitle is the human-readable name of the image.
	AnnotationTitle = "org.opencontainers.image.title"

	// dirMode is the mode of the parent directories a layer creates on its own.
	dirMode = 0o755
)

// Entry is one file or directory of a layer.
type Entry struct {
	// Path is the slash-separated path in the image, with or without a
	// leading slash.
	Path string
	// Mode holds the permission bits; with fs.ModeDir set the entry is a
	// directory. Special bits (sticky) are kept.
	Mode fs.FileMode
	// UID and GID own the entry; zero is root.
	UID, GID int
	// Data is the content of a regular file. It is ignored when Source is set.
	Data []byte
	// Source is a file on the build host whose content the entry carries.
	Source string
}

// Layer builds a gzip-compressed layer holding entries, in path order, every
// timestamp set to modTime, so the same inputs give the same digest. Parent
// directories that entries do not declare are added as root-owned 0755.
func Layer(entries []Entry, modTime time.Time) (v1.Layer, error) {
	byPath := map[string]Entry{}

	for _, e := range entries {
		p := cleanPath(e.Path)
		if p == "" {
			return nil, fmt.Errorf("building layer: entry with empty path")
		}

		if _, dup := byPath[p]; dup {
			return nil, fmt.Errorf("building layer: %s listed twice", p)
		}

		e.Path = p
		byPath[p] = e
	}

	for p := range byPath {
		for dir := path.Dir(p); dir != "." && dir != "/"; dir = path.Dir(dir) {
			if _, ok := byPath[dir]; !ok {
				byPath[dir] = Entry{Path: dir, Mode: fs.ModeDir | dirMode}
			}
		}
	}

	paths := make([]string, 0, len(byPath))
	for p := range byPath {
		paths = append(paths, p)
	}

	sort.Strings(paths)

	var buf bytes.Buffer

	zw, err := gzip.NewWriterLevel(&buf, gzip.BestCompression)
	if err != nil {
		return nil, err
	}

	tw := tar.NewWriter(zw)

	for _, p := range paths {
		if err := writeEntry(tw, byPath[p], modTime); err != nil {
			return nil, fmt.Errorf("building layer: %s: %w", p, err)
		}
	}

	if err := tw.Close(); err != nil {
		return nil, err
	}

	if err := zw.Close(); err != nil {
		return nil, err
	}

	compressed := buf.Bytes()

	return tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(compressed)), nil
	}, tarball.WithMediaType(types.OCILayer))
}

func writeEntry(tw *tar.Writer, e Entry, modTime time.Time) error {
	hdr := &tar.Header{
		Name:    e.Path,
		Mode:    int64(e.Mode.Perm() | tarSpecialBits(e.Mode)),
		Uid:     e.UID,
		Gid:     e.GID,
		ModTime: modTime,
		Format:  tar.FormatPAX,
	}

	if e.Mode.IsDir() {
		hdr.Typeflag = tar.TypeDir
		hdr.Name += "/"

		return tw.WriteHeader(hdr)
	}

	data := e.Data

	if e.Source != "" {
		var err error

		if data, err = os.ReadFile(e.Source); err != nil {
			return err
		}
	}

	hdr.Typeflag = tar.TypeReg
	hdr.Size = int64(len(data))

	if err := tw.WriteHeader(hdr); err != nil {
		return err
	}

	_, err := tw.Write(data)

	return err
}

// tarSpecialBits maps Go's setuid/setgid/sticky mode bits to their tar (Unix)
// values.
func tarSpecialBits(m fs.FileMode) fs.FileMode {
	var bits fs.FileMode

	if m&fs.ModeSetuid != 0 {
		bits |= 0o4000
	}

	if m&fs.ModeSetgid != 0 {
		bits |= 0o2000
	}

	if m&fs.ModeSticky != 0 {
		bits |= 0o1000
	}

	return bits
}

func cleanPath(p string) string {
	p = strings.TrimPrefix(path.Clean("/"+p), "/")

	return p
}

// Spec describes a single-platform image.
type Spec struct {
	// Arch is the Go architecture (amd64, arm64).
	Arch string
	// Layers are the image's layers, bottom first.
	Layers []v1.Layer
	// Config is the runtime configuration (user, entrypoint, volumes, ...).
	Config v1.Config
	// Created stamps the image configuration and its history.
	Created time.Time
	// CreatedBy is recorded in the history of each layer.
	CreatedBy string
	// Annotations are set on the image manifest.
	Annotations map[string]string
}

// Image assembles an OCI image (OCI manifest and config media types) for
// linux/<Arch>.
func Image(s Spec) (v1.Image, error) {
	if s.Arch == "" {
		return nil, errors.New("building image: no architecture")
	}

	img := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)

	for _, l := range s.Layers {
		var err error

		img, err = mutate.Append(img, mutate.Addendum{
			Layer:     l,
			MediaType: types.OCILayer,
			History:   v1.History{Created: v1.Time{Time: s.Created}, CreatedBy: s.CreatedBy},
		})
		if err != nil {
			return nil, fmt.Errorf("building image: %w", err)
		}
	}

	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("building image: %w", err)
	}

	cf = cf.DeepCopy()
	cf.OS = OS
	cf.Architecture = s.Arch
	cf.Created = v1.Time{Time: s.Created}
	cf.Config = s.Config

	if img, err = mutate.ConfigFile(img, cf); err != nil {
		return nil, fmt.Errorf("building image: %w", err)
	}

	if len(s.Annotations) > 0 {
		img = mutate.Annotations(img, s.Annotations).(v1.Image) //nolint:forcetypeassert // Annotations returns the type it is given.
	}

	return img, nil
}

// Platform returns the OCI platform of a linux image for a Go architecture.
func Platform(arch string) v1.Platform {
	return v1.Platform{OS: OS, Architecture: arch}
}

// WriteLayout writes images (one per architecture, keyed by Go arch) as a
// fresh OCI layout in dir, replacing what was there. Its index.json lists
// each image with its platform and the name "<ref>-<arch>" (the form the
// Talos imager reads from a directory), and a multi-platform index named
// "<ref>" that holds them all (the form to push to a registry).
func WriteLayout(dir, ref string, images map[string]v1.Image) (layout.Path, error) {
	if err := os.RemoveAll(dir); err != nil {
		return "", fmt.Errorf("clearing %s: %w", dir, err)
	}

	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return "", fmt.Errorf("writing OCI layout %s: %w", dir, err)
	}

	var adds []mutate.IndexAddendum

	for _, arch := range sortedKeys(images) {
		img := images[arch]
		platform := Platform(arch)

		if err := p.AppendImage(img,
			layout.WithPlatform(platform),
			layout.WithAnnotations(map[string]string{AnnotationRefName: ref + "-" + arch}),
		); err != nil {
			return "", fmt.Errorf("writing %s image to %s: %w", arch, dir, err)
		}

		adds = append(adds, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: &platform}})
	}

	index := mutate.AppendManifests(mutate.IndexMediaType(empty.Index, types.OCIImageIndex), adds...)

	if err := p.AppendIndex(index, layout.WithAnnotations(map[string]string{AnnotationRefName: ref})); err != nil {
		return "", fmt.Errorf("writing multi-platform index to %s: %w", dir, err)
	}

	return p, nil
}

// WriteTarball writes img to file as an image tarball tagged tag (for
// `docker load`, `podman load` or `crane push`).
func WriteTarball(file, tag string, img v1.Image) error {
	t, err := name.NewTag(tag)
	if err != nil {
		return fmt.Errorf("tagging image %q: %w", tag, err)
	}

	if err := os.MkdirAll(path.Dir(file), 0o755); err != nil {
		return err
	}

	if err := tarball.WriteToFile(file, t, img); err != nil {
		return fmt.Errorf("writing image tarball %s: %w", file, err)
	}

	return nil
}

var tagInvalid = regexp.MustCompile(`[^A-Za-z0-9_.-]`)

// Tag turns a version (as `git describe` prints it) into a valid image tag.
func Tag(version string) string {
	t := tagInvalid.ReplaceAllString(version, "-")
	t = strings.TrimLeft(t, ".-")

	const maxTag = 128
	if len(t) > maxTag {
		t = t[:maxTag]
	}

	if t == "" {
		return "dev"
	}

	return t
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}

	sort.Strings(keys)

	return keys
}
