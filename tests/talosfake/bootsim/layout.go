package bootsim

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// The machine's directory:
//
//	disk/META/0x..          META tags, one file each
//	disk/STATE/             the STATE partition (volume package layout:
//	                        luks2.json, data/config.yaml)
//	disk/EPHEMERAL/         the EPHEMERAL partition (data/ is /var)
//	disk/BOOT/installed     Talos installed (boot-media machines)
//	extensions/<name>/      an extension's root filesystem
//	boots/<n>/              one boot: its kernel files (root/), container
//	                        specs, and ext-<name>.log per extension service
//	status.json             the current boot and phase
const (
	diskDir       = "disk"
	metaDir       = "META"
	stateLabel    = "STATE"
	ephemeralLab  = "EPHEMERAL"
	bootDir       = "BOOT"
	installedFile = "installed"
	extensionsDir = "extensions"
	bootsDir      = "boots"
	// StatusFile is the machine's status (Status, JSON).
	StatusFile = "status.json"
	// ConfigFile is the configuration's name in STATE (constants.ConfigFilename).
	ConfigFile = "config.yaml"
)

// StatePartition is the directory of the STATE partition of the machine in
// dir.
func StatePartition(dir string) string { return filepath.Join(dir, diskDir, stateLabel) }

// EphemeralPartition is the directory of the EPHEMERAL partition.
func EphemeralPartition(dir string) string { return filepath.Join(dir, diskDir, ephemeralLab) }

// MetaDir is the directory of the META partition's tags.
func MetaDir(dir string) string { return filepath.Join(dir, diskDir, metaDir) }

// BootDir is the directory of boot n.
func BootDir(dir string, n int) string { return filepath.Join(dir, bootsDir, strconv.Itoa(n)) }

// ExtensionLog is the log of extension service name (stdout and stderr)
// in boot n.
func ExtensionLog(dir string, n int, name string) string {
	return filepath.Join(BootDir(dir, n), "ext-"+name+".log")
}

// metaStore is the META partition: tags by number.
type metaStore struct{ dir string }

func (s metaStore) path(tag uint8) string { return filepath.Join(s.dir, fmt.Sprintf("0x%02x", tag)) }

// get returns tag's value.
func (s metaStore) get(tag uint8) ([]byte, bool) {
	b, err := os.ReadFile(s.path(tag))
	if err != nil {
		return nil, false
	}

	return b, true
}

// all returns the tags that have values.
func (s metaStore) all() map[uint8]string {
	tags := map[uint8]string{}

	entries, _ := os.ReadDir(s.dir) //nolint:errcheck // no META: no tags
	for _, e := range entries {
		tag, err := strconv.ParseUint(strings.TrimPrefix(e.Name(), "0x"), 16, 8)
		if err != nil {
			continue
		}

		if v, ok := s.get(uint8(tag)); ok {
			tags[uint8(tag)] = string(v)
		}
	}

	return tags
}

// set writes tag.
func (s metaStore) set(tag uint8, value []byte) error {
	if err := os.MkdirAll(s.dir, 0o700); err != nil {
		return fmt.Errorf("writing META tag 0x%02x: %w", tag, err)
	}

	if err := os.WriteFile(s.path(tag), value, 0o600); err != nil {
		return fmt.Errorf("writing META tag 0x%02x: %w", tag, err)
	}

	return nil
}

// remove deletes tag and reports whether it existed.
func (s metaStore) remove(tag uint8) (bool, error) {
	err := os.Remove(s.path(tag))
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}

	if err != nil {
		return false, fmt.Errorf("deleting META tag 0x%02x: %w", tag, err)
	}

	return true, nil
}
