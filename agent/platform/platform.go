// Package platform tells whether this machine can attest: attestation needs
// a TPM 2.0 character device and UEFI firmware, whose variables (efivarfs)
// hold the Secure Boot state the agent claims. A machine without them (a
// plain VM, a legacy BIOS boot) still runs everything else the agent does;
// the agent checks once at start and says what is missing.
//
// The extension's service spec (extension/sovra-agent.yaml) is written so
// that Talos starts the agent on such a machine at all: it binds /dev and
// /sys/firmware, which exist everywhere, instead of /dev/tpmrm0 and
// /sys/firmware/efi/efivars, which do not, and it does not wait for the TPM.
// See that file and docs/operators.md for what Talos does with a missing
// mount source or path dependency.
package platform

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"

	"github.com/sovra-dev/sovra/agent/tpm/device"
)

// DefaultEFIVarsDir is where Talos mounts efivarfs, on UEFI machines only
// (machinery constants.EFIVarsMountPoint).
const DefaultEFIVarsDir = "/sys/firmware/efi/efivars"

// Sentinel errors, wrapped with the detail of what is missing.
var (
	// ErrNoTPM: no TPM character device.
	ErrNoTPM = errors.New("no TPM device")
	// ErrNoEFIVars: no UEFI variables.
	ErrNoEFIVars = errors.New("no UEFI variables")
)

// UnavailableError says why this machine cannot attest: one error per
// missing part, each wrapping ErrNoTPM or ErrNoEFIVars.
type UnavailableError struct {
	Missing []error
}

// Error lists what is missing on one line.
func (e *UnavailableError) Error() string {
	parts := make([]string, len(e.Missing))
	for i, m := range e.Missing {
		parts[i] = m.Error()
	}

	return strings.Join(parts, "; ")
}

// Unwrap returns the missing parts, for errors.Is.
func (e *UnavailableError) Unwrap() []error { return e.Missing }

// Probe checks the machine. The zero value checks the default paths.
type Probe struct {
	// TPMPaths are the TPM devices, any of which will do; nil means
	// device.ResourceManagerPath and device.RawPath.
	TPMPaths []string
	// EFIVarsDir is where efivarfs is mounted; empty means
	// DefaultEFIVarsDir.
	EFIVarsDir string
}

// Attestation returns nil when this machine can attest, else an
// *UnavailableError that names each missing part and why.
func (p Probe) Attestation() error {
	var missing []error

	if err := p.tpm(); err != nil {
		missing = append(missing, err)
	}

	if err := p.efiVars(); err != nil {
		missing = append(missing, err)
	}

	if len(missing) == 0 {
		return nil
	}

	return &UnavailableError{Missing: missing}
}

// tpm finds a TPM character device among the paths.
func (p Probe) tpm() error {
	paths := p.TPMPaths
	if len(paths) == 0 {
		paths = []string{device.ResourceManagerPath, device.RawPath}
	}

	for _, path := range paths {
		st, err := os.Stat(path)

		switch {
		case errors.Is(err, fs.ErrNotExist):
			continue
		case err != nil:
			return fmt.Errorf("%w: %w", ErrNoTPM, err)
		case st.Mode()&fs.ModeCharDevice != 0:
			return nil
		case st.IsDir():
			// An older service spec bound /dev/tpmrm0 itself: Talos makes
			// a missing mount source an empty directory.
			return fmt.Errorf("%w: %s is an empty directory, not a device (no TPM 2.0 on this machine)", ErrNoTPM, path)
		default:
			return fmt.Errorf("%w: %s is not a character device", ErrNoTPM, path)
		}
	}

	return fmt.Errorf("%w: %s not found (no TPM 2.0, or it is disabled in the firmware)", ErrNoTPM, strings.Join(paths, " and "))
}

// efiVars checks that efivarfs is there and holds variables.
func (p Probe) efiVars() error {
	dir := p.EFIVarsDir
	if dir == "" {
		dir = DefaultEFIVarsDir
	}

	entries, err := os.ReadDir(dir)

	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("%w: %s not found (the machine boots in legacy BIOS mode, not UEFI)", ErrNoEFIVars, dir)
	case err != nil:
		return fmt.Errorf("%w: %w", ErrNoEFIVars, err)
	case len(entries) == 0:
		return fmt.Errorf("%w: %s is empty (efivarfs is not mounted there)", ErrNoEFIVars, dir)
	}

	return nil
}
