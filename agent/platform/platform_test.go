package platform

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestAttestation(t *testing.T) {
	dir := t.TempDir()

	efivars := filepath.Join(dir, "efivars")
	if err := os.Mkdir(efivars, 0o700); err != nil {
		t.Fatal(err)
	}

	if err := os.WriteFile(filepath.Join(efivars, "SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"), []byte{6, 0, 0, 0, 1}, 0o600); err != nil {
		t.Fatal(err)
	}

	empty := filepath.Join(dir, "empty")
	if err := os.Mkdir(empty, 0o700); err != nil {
		t.Fatal(err)
	}

	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}

	absent := filepath.Join(dir, "absent")
	// /dev/null is a character device on every Linux machine: it stands in
	// for a TPM.
	const chardev = "/dev/null"

	for name, c := range map[string]struct {
		probe        Probe
		noTPM, noEFI bool
		says         []string
	}{
		"TPM and UEFI":                 {Probe{TPMPaths: []string{chardev}, EFIVarsDir: efivars}, false, false, nil},
		"the second TPM path":          {Probe{TPMPaths: []string{absent, chardev}, EFIVarsDir: efivars}, false, false, nil},
		"no TPM":                       {Probe{TPMPaths: []string{absent}, EFIVarsDir: efivars}, true, false, []string{"no TPM device", absent, "not found"}},
		"a directory where the TPM is": {Probe{TPMPaths: []string{empty}, EFIVarsDir: efivars}, true, false, []string{"empty directory, not a device"}},
		"a file where the TPM is":      {Probe{TPMPaths: []string{file}, EFIVarsDir: efivars}, true, false, []string{"not a character device"}},
		"legacy BIOS":                  {Probe{TPMPaths: []string{chardev}, EFIVarsDir: absent}, false, true, []string{"no UEFI variables", "legacy BIOS"}},
		"efivarfs not mounted":         {Probe{TPMPaths: []string{chardev}, EFIVarsDir: empty}, false, true, []string{"efivarfs is not mounted"}},
		"neither": {Probe{TPMPaths: []string{absent}, EFIVarsDir: absent}, true, true,
			[]string{"no TPM device", "; ", "no UEFI variables"}},
	} {
		t.Run(name, func(t *testing.T) {
			err := c.probe.Attestation()
			if (err != nil) != (c.noTPM || c.noEFI) {
				t.Fatalf("Attestation() = %v", err)
			}

			if errors.Is(err, ErrNoTPM) != c.noTPM || errors.Is(err, ErrNoEFIVars) != c.noEFI {
				t.Fatalf("Attestation() = %v: no TPM %v, no UEFI %v", err, c.noTPM, c.noEFI)
			}

			for _, s := range c.says {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("%q does not say %q", err, s)
				}
			}

			if err != nil && strings.Contains(err.Error(), "\n") {
				t.Errorf("%q is not one line", err)
			}
		})
	}
}
