package oci

import (
	"debug/elf"
	"fmt"
	"os"
	"path/filepath"
	"slices"
)

// machines maps the Go architectures we ship to their ELF machine.
var machines = map[string]elf.Machine{
	"amd64": elf.EM_X86_64,
	"arm64": elf.EM_AARCH64,
}

// multiarch maps a Go architecture to its Debian/Ubuntu multiarch triplet,
// the directory its shared libraries live in.
var multiarch = map[string]string{
	"amd64": "x86_64-linux-gnu",
	"arm64": "aarch64-linux-gnu",
}

// ELFMachine returns the ELF machine of a Go architecture.
func ELFMachine(arch string) (elf.Machine, error) {
	m, ok := machines[arch]
	if !ok {
		return 0, fmt.Errorf("unsupported architecture %q", arch)
	}

	return m, nil
}

// CheckStaticELF fails unless file is a Linux ELF executable for arch with no
// program interpreter and no shared-library dependencies: a binary that runs
// on a node with nothing else installed.
func CheckStaticELF(file, arch string) error {
	want, err := ELFMachine(arch)
	if err != nil {
		return err
	}

	f, err := elf.Open(file)
	if err != nil {
		return fmt.Errorf("reading %s: %w", file, err)
	}
	defer f.Close() //nolint:errcheck

	if f.Machine != want {
		return fmt.Errorf("%s is built for %s, not %s (%s)", file, f.Machine, arch, want)
	}

	if f.Type != elf.ET_EXEC && f.Type != elf.ET_DYN {
		return fmt.Errorf("%s is not an executable (%s)", file, f.Type)
	}

	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("%s is dynamically linked (it has a program interpreter)", file)
		}
	}

	libs, err := f.ImportedLibraries()
	if err != nil {
		return fmt.Errorf("reading the dynamic section of %s: %w", file, err)
	}

	if len(libs) > 0 {
		return fmt.Errorf("%s needs shared libraries %v", file, libs)
	}

	return nil
}

// RuntimeFiles lists the host files a dynamically linked executable needs to
// run: its program interpreter and, recursively, every shared library it
// needs, each at the path the loader finds it (searched in the multiarch and
// the usual library directories under root). A static executable needs none.
// The executable must be built for arch.
func RuntimeFiles(root, file, arch string) ([]string, error) {
	want, err := ELFMachine(arch)
	if err != nil {
		return nil, err
	}

	dirs := []string{"/lib/" + multiarch[arch], "/usr/lib/" + multiarch[arch], "/lib64", "/usr/lib64", "/lib", "/usr/lib"}

	seen := map[string]bool{}

	var (
		out  []string
		walk func(path string, top bool) error
	)

	walk = func(path string, top bool) error {
		f, err := elf.Open(path)
		if err != nil {
			return fmt.Errorf("reading %s: %w", path, err)
		}
		defer f.Close() //nolint:errcheck

		if f.Machine != want {
			return fmt.Errorf("%s is built for %s, not %s", path, f.Machine, arch)
		}

		if top {
			for _, p := range f.Progs {
				if p.Type != elf.PT_INTERP {
					continue
				}

				interp, err := readInterp(p)
				if err != nil {
					return fmt.Errorf("reading the interpreter of %s: %w", path, err)
				}

				if !seen[interp] {
					seen[interp] = true
					out = append(out, interp)
				}
			}
		}

		libs, err := f.ImportedLibraries()
		if err != nil {
			return fmt.Errorf("reading the dynamic section of %s: %w", path, err)
		}

		for _, lib := range libs {
			found := ""

			for _, d := range dirs {
				candidate := filepath.Join(d, lib)
				if _, err := os.Stat(filepath.Join(root, candidate)); err == nil {
					found = candidate

					break
				}
			}

			if found == "" {
				return fmt.Errorf("%s needs %s, which is in none of %v", path, lib, dirs)
			}

			if seen[found] {
				continue
			}

			seen[found] = true
			out = append(out, found)

			if err := walk(filepath.Join(root, found), false); err != nil {
				return err
			}
		}

		return nil
	}

	if err := walk(file, true); err != nil {
		return nil, err
	}

	slices.Sort(out)

	return out, nil
}

func readInterp(p *elf.Prog) (string, error) {
	b := make([]byte, p.Filesz)
	if _, err := p.ReadAt(b, 0); err != nil {
		return "", err
	}

	// The interpreter path is NUL-terminated.
	for i, c := range b {
		if c == 0 {
			return string(b[:i]), nil
		}
	}

	return string(b), nil
}
