// Package device opens the node's TPM through the kernel: the resource
// manager /dev/tpmrm0 when present, else the raw /dev/tpm0.
package device

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
)

// Default device paths, in order of preference.
const (
	ResourceManagerPath = "/dev/tpmrm0"
	RawPath             = "/dev/tpm0"
)

// Device opens a TPM character device. The zero value uses the defaults.
type Device struct {
	// Paths are tried in order; nil means ResourceManagerPath, RawPath.
	Paths []string
}

// Open returns a command channel to the first device path that opens.
func (d Device) Open() (io.ReadWriteCloser, error) {
	paths := d.Paths
	if len(paths) == 0 {
		paths = []string{ResourceManagerPath, RawPath}
	}
	var errs []error
	for _, p := range paths {
		f, err := os.OpenFile(p, os.O_RDWR, 0)
		if err == nil {
			return f, nil
		}
		errs = append(errs, err)
		if !errors.Is(err, fs.ErrNotExist) {
			break
		}
	}
	return nil, fmt.Errorf("opening TPM device: %w", errors.Join(errs...))
}
