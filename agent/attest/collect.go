package attest

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/siderolabs/talos/pkg/machinery/extensions"

	"github.com/sovra-dev/sovra/internal/claims"
)

// Default paths of the facts the agent claims.
const (
	DefaultSecureBootPath = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"
	DefaultLockdownPath   = "/sys/kernel/security/lockdown"
	DefaultSELinuxPath    = "/sys/fs/selinux/enforce"
	DefaultAppArmorPath   = "/sys/module/apparmor/parameters/enabled"
	DefaultOSReleasePath  = "/etc/os-release"
	DefaultExtensionsPath = "/etc/extensions.yaml"
	DefaultLayersDir      = "/layers"
	DefaultEventLogPath   = "/sys/kernel/security/tpm0/binary_bios_measurements"
	DefaultBootIDPath     = "/proc/sys/kernel/random/boot_id"
	DefaultStatPath       = "/proc/stat"

	// efiVarAttrLen is the attribute prefix of an efivarfs file.
	efiVarAttrLen = 4
	// maxClaimFile bounds every file read for a claim (/proc/stat of a large
	// machine included).
	maxClaimFile = 1 << 20
	// maxBootIDLen bounds a boot ID (the kernel's is a 36-character UUID).
	maxBootIDLen = 64
)

// Collector reads the node's claims. Every path is a field so tests point
// them at a temporary directory; empty fields use the defaults above.
type Collector struct {
	SecureBootPath string
	LockdownPath   string
	SELinuxPath    string
	AppArmorPath   string
	OSReleasePath  string
	// ExtensionsPath is Talos' runtime list of system extensions; each
	// extension's digest is the SHA-256 of its image in LayersDir.
	ExtensionsPath string
	LayersDir      string
	// BootIDPath is the kernel's boot ID; StatPath holds the boot time
	// (btime) the boot's start is read from.
	BootIDPath string
	StatPath   string
}

func or(v, def string) string {
	if v == "" {
		return def
	}
	return v
}

// Collect reads every claim. A claim that cannot be read becomes an error
// for that claim; Collect itself never fails.
func (c Collector) Collect() claims.Set {
	s := claims.Set{}
	set := func(name string, v string, err error) {
		if err != nil {
			s.SetErr(name, err)
			return
		}
		s.Set(name, v)
	}
	v, err := secureBoot(or(c.SecureBootPath, DefaultSecureBootPath))
	set(claims.SecureBoot, v, err)
	v, err = lockdown(or(c.LockdownPath, DefaultLockdownPath))
	set(claims.Lockdown, v, err)
	v, err = boolFile(or(c.SELinuxPath, DefaultSELinuxPath), "1", "enforcing", "permissive")
	set(claims.SELinux, v, err)
	v, err = boolFile(or(c.AppArmorPath, DefaultAppArmorPath), "Y", "enabled", "disabled")
	set(claims.AppArmor, v, err)
	v, err = talosVersion(or(c.OSReleasePath, DefaultOSReleasePath))
	set(claims.TalosVersion, v, err)
	v, err = bootID(or(c.BootIDPath, DefaultBootIDPath))
	set(claims.BootID, v, err)
	v, err = bootStarted(or(c.StatPath, DefaultStatPath))
	set(claims.BootStarted, v, err)
	c.extensions(s)
	return s
}

// bootID is the kernel's random ID of this boot.
func bootID(path string) (string, error) {
	b, err := readSmall(path)
	if err != nil {
		return "", err
	}
	id := strings.TrimSpace(string(b))
	if id == "" || len(id) > maxBootIDLen {
		return "", fmt.Errorf("boot ID in %s of %d bytes", path, len(id))
	}
	return id, nil
}

// bootStarted is the btime line of /proc/stat: the boot's start in Unix seconds.
func bootStarted(path string) (string, error) {
	b, err := readSmall(path)
	if err != nil {
		return "", err
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) == 2 && f[0] == "btime" {
			if _, err := strconv.ParseInt(f[1], 10, 64); err != nil {
				return "", fmt.Errorf("btime in %s is not a number", path)
			}
			return f[1], nil
		}
	}
	return "", fmt.Errorf("no btime in %s", path)
}

func readSmall(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxClaimFile+1))
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	if len(b) > maxClaimFile {
		return nil, fmt.Errorf("reading %s: larger than %d bytes", path, maxClaimFile)
	}
	return b, nil
}

func secureBoot(path string) (string, error) {
	b, err := readSmall(path)
	if errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("no SecureBoot EFI variable (not booted with UEFI?): %w", err)
	}
	if err != nil {
		return "", err
	}
	if len(b) != efiVarAttrLen+1 {
		return "", fmt.Errorf("SecureBoot variable of %d bytes, want %d", len(b), efiVarAttrLen+1)
	}
	switch b[efiVarAttrLen] {
	case 0:
		return "disabled", nil
	case 1:
		return "enabled", nil
	default:
		return "", fmt.Errorf("SecureBoot variable holds %d", b[efiVarAttrLen])
	}
}

// lockdown returns the selected mode of "none [integrity] confidentiality".
func lockdown(path string) (string, error) {
	b, err := readSmall(path)
	if err != nil {
		return "", err
	}
	for _, f := range strings.Fields(string(b)) {
		if strings.HasPrefix(f, "[") && strings.HasSuffix(f, "]") {
			return strings.Trim(f, "[]"), nil
		}
	}
	return "", fmt.Errorf("no selected mode in %s", path)
}

// boolFile reads a one-word flag; a missing file means the feature is absent.
func boolFile(path, on, onValue, offValue string) (string, error) {
	b, err := readSmall(path)
	if errors.Is(err, fs.ErrNotExist) {
		return "disabled", nil
	}
	if err != nil {
		return "", err
	}
	if strings.TrimSpace(string(b)) == on {
		return onValue, nil
	}
	return offValue, nil
}

func talosVersion(path string) (string, error) {
	b, err := readSmall(path)
	if err != nil {
		return "", err
	}
	kv := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), "=")
		if ok {
			kv[k] = strings.Trim(v, `"'`)
		}
	}
	if kv["ID"] != "talos" {
		return "", fmt.Errorf("os-release ID is %q, not talos", kv["ID"])
	}
	if kv["VERSION_ID"] == "" {
		return "", errors.New("os-release has no VERSION_ID")
	}
	return kv["VERSION_ID"], nil
}

// extensions claims each installed extension as "version sha256:<digest>".
func (c Collector) extensions(s claims.Set) {
	path := or(c.ExtensionsPath, DefaultExtensionsPath)
	var cfg extensions.Config
	if err := cfg.Read(path); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return // no extensions installed
		}
		s.SetErr(claims.ExtensionPrefix+"*", fmt.Errorf("reading %s: %w", path, err))
		return
	}
	for _, l := range cfg.Layers {
		if l == nil {
			continue
		}
		name := claims.ExtensionPrefix + l.Metadata.Name
		digest, err := fileDigest(filepath.Join(or(c.LayersDir, DefaultLayersDir), filepath.Base(l.Image)))
		if err != nil {
			s.SetErr(name, err)
			continue
		}
		s.Set(name, l.Metadata.Version+" sha256:"+digest)
	}
}

func fileDigest(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("hashing %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
