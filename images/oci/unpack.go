package oci

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
)

// Unpack writes the flattened filesystem of img into dir, as Talos does when
// it installs an extension: directories, regular files and symlinks with
// their permission bits (ownership is kept when running as root). Entries
// that would land outside dir, and device nodes, are refused.
func Unpack(img v1.Image, dir string) error {
	rc := mutate.Extract(img)
	defer rc.Close() //nolint:errcheck

	tr := tar.NewReader(rc)

	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}

		if err != nil {
			return fmt.Errorf("unpacking image: %w", err)
		}

		if err := unpackEntry(tr, hdr, dir); err != nil {
			return fmt.Errorf("unpacking %s: %w", hdr.Name, err)
		}
	}
}

func unpackEntry(r io.Reader, hdr *tar.Header, dir string) error {
	target := filepath.Join(dir, filepath.FromSlash(cleanPath(hdr.Name)))
	if target != dir && !strings.HasPrefix(target, dir+string(filepath.Separator)) {
		return errors.New("path escapes the destination")
	}

	mode := hdr.FileInfo().Mode()

	switch hdr.Typeflag {
	case tar.TypeDir:
		if err := os.MkdirAll(target, 0o755); err != nil {
			return err
		}
	case tar.TypeReg:
		if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
			return err
		}

		f, err := os.OpenFile(target, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
		if err != nil {
			return err
		}

		if _, err := io.Copy(f, r); err != nil {
			f.Close() //nolint:errcheck

			return err
		}

		if err := f.Close(); err != nil {
			return err
		}
	case tar.TypeSymlink:
		if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
			return err
		}

		return os.Symlink(hdr.Linkname, target)
	default:
		return fmt.Errorf("unsupported entry type %q", hdr.Typeflag)
	}

	// chmod (not the umask-filtered create mode) keeps the image's bits.
	if err := os.Chmod(target, mode.Perm()|mode&(os.ModeSticky|os.ModeSetuid|os.ModeSetgid)); err != nil {
		return err
	}

	if os.Geteuid() == 0 {
		return os.Lchown(target, hdr.Uid, hdr.Gid)
	}

	return nil
}
