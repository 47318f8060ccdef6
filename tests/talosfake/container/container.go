// Package container runs a process the way Talos runs an extension service
// (containerd with runc): in new mount, PID and UTS namespaces and the
// host's network and IPC namespaces, in a root filesystem of its own
// (read-only unless asked), with containerd's default mounts (/proc, /dev,
// /dev/pts, /dev/shm, /dev/mqueue, a read-only /sys, /run), the host's
// /etc/hosts and /etc/resolv.conf, the service's mounts, then runc's masked
// and read-only paths, no new privileges, the environment it is given and
// "/" as its working directory.
//
// The simulator does this for real: it re-executes its own binary as a
// small wrapper (Main) in the new namespaces, which sets the mounts up,
// pivots into the root filesystem and execs the service's entrypoint, so
// the service is PID 1 of its namespace as in a container. It needs root.
//
// Sources imitated:
//   - siderolabs/talos v1.13.9
//     internal/app/machined/pkg/system/services/extension.go (the OCI
//     options of an extension service) and
//     internal/app/machined/pkg/system/runner/containerd/containerd.go
//     (host hosts and resolv.conf, no new privileges);
//   - containerd v2.2.4 pkg/oci/spec.go, pkg/oci/mounts.go (default
//     mounts, namespaces, masked and read-only paths);
//   - runc v1.3 libcontainer/rootfs_linux.go (mounts, then masked paths:
//     a read-only tmpfs over a directory, /dev/null over a file).
//
// Not imitated: cgroups, capabilities, seccomp, rlimits, device cgroup
// rules; /dev holds bind mounts of the host's null, zero, full, random,
// urandom and tty instead of device nodes made by runc. A mount whose
// destination cannot be made inside a kernel filesystem of this host (an
// EFI directory on a host booted without EFI) is skipped with a warning.
package container

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// WrapperArg is the first argument that makes a binary calling Main the
// container wrapper.
const WrapperArg = "__talosfake-container"

// Spec is one container.
type Spec struct {
	// ID names the container in errors (ext-<name>).
	ID string `json:"id"`
	// Rootfs is the host directory that becomes the container's root; the
	// wrapper creates mount points in it.
	Rootfs string `json:"rootfs"`
	// WritableRootfs leaves the root writable (security.writeableRootfs).
	WritableRootfs bool `json:"writableRootfs,omitempty"`
	// WritableSysfs mounts /sys writable (security.writeableSysfs).
	WritableSysfs bool `json:"writableSysfs,omitempty"`
	// Args are the process's arguments; Args[0] is resolved in the
	// container, relative to "/".
	Args []string `json:"args"`
	// Env is the process's whole environment.
	Env []string `json:"env"`
	// Mounts come after the default mounts, in order.
	Mounts []specs.Mount `json:"mounts"`
	// MaskedPaths and ReadonlyPaths replace runc's defaults when not nil.
	MaskedPaths   []string `json:"maskedPaths,omitempty"`
	ReadonlyPaths []string `json:"readonlyPaths,omitempty"`
	// Warnings receives the wrapper's warnings (skipped mounts); empty
	// means stderr.
	Warnings string `json:"warnings,omitempty"`
}

// DefaultMaskedPaths and DefaultReadonlyPaths are containerd's.
var (
	DefaultMaskedPaths = []string{
		"/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
		"/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
		"/sys/devices/virtual/powercap", "/proc/scsi",
	}
	DefaultReadonlyPaths = []string{"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"}
)

// defaultMounts are containerd's (pkg/oci/mounts.go), /sys read-only
// unless the service asks for it writable.
func defaultMounts(writableSysfs bool) []specs.Mount {
	sysOpts := []string{"nosuid", "noexec", "nodev", "ro"}
	if writableSysfs {
		sysOpts = sysOpts[:3]
	}

	return []specs.Mount{
		{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid", "noexec", "nodev"}},
		{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
		{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"}},
		{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}},
		{Destination: "/dev/mqueue", Type: "mqueue", Source: "mqueue", Options: []string{"nosuid", "noexec", "nodev"}},
		{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: sysOpts},
		{Destination: "/run", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
	}
}

// devices are the host devices bound into /dev (runc creates these).
var devices = []string{"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty"}

// hostFiles are containerd's WithHostHostsFile and WithHostResolvconf.
var hostFiles = []string{"/etc/hosts", "/etc/resolv.conf"}

// Command returns the command that runs spec, written to specFile, in its
// container: self (the simulator's binary, which calls Main first thing)
// re-executed as the wrapper in new mount, PID and UTS namespaces. The
// process is killed when the simulator dies.
func Command(self, specFile string, spec Spec) (*exec.Cmd, error) {
	b, err := json.Marshal(spec)
	if err != nil {
		return nil, fmt.Errorf("encoding the container spec of %s: %w", spec.ID, err)
	}

	if err := os.WriteFile(specFile, b, 0o600); err != nil {
		return nil, fmt.Errorf("writing the container spec of %s: %w", spec.ID, err)
	}

	cmd := exec.Command(self, WrapperArg, specFile)
	cmd.Env = []string{} // the wrapper sets the service's environment itself
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags: syscall.CLONE_NEWNS | syscall.CLONE_NEWPID | syscall.CLONE_NEWUTS,
		Pdeathsig:  syscall.SIGKILL,
	}

	return cmd, nil
}

// Main runs the container wrapper and never returns when the process was
// started as one (os.Args[1] == WrapperArg); otherwise it returns at once.
// Call it first thing in main (and in TestMain of tests that run
// containers from the test binary).
func Main() {
	if len(os.Args) < 3 || os.Args[1] != WrapperArg {
		return
	}

	err := wrap(os.Args[2])
	fmt.Fprintf(os.Stderr, "talosfake container: %v\n", err)
	os.Exit(1)
}

// wrap sets the container up and execs its process; it returns only on
// failure.
func wrap(specFile string) error {
	b, err := os.ReadFile(specFile)
	if err != nil {
		return fmt.Errorf("reading the container spec: %w", err)
	}

	var spec Spec
	if err := json.Unmarshal(b, &spec); err != nil {
		return fmt.Errorf("decoding the container spec: %w", err)
	}

	warn := io.Writer(os.Stderr)

	if spec.Warnings != "" {
		if f, err := os.OpenFile(spec.Warnings, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600); err == nil {
			defer f.Close() //nolint:errcheck
			warn = f
		}
	}

	if err := setup(spec, warn); err != nil {
		return fmt.Errorf("setting up %s: %w", spec.ID, err)
	}

	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("setting no_new_privs: %w", err)
	}

	if len(spec.Args) == 0 {
		return errors.New("no process arguments")
	}

	path := spec.Args[0]
	if !strings.Contains(path, "/") {
		return fmt.Errorf("entrypoint %q: no PATH lookup in the container", path)
	}

	if err := unix.Exec(path, spec.Args, spec.Env); err != nil {
		return fmt.Errorf("executing %s: %w", path, err)
	}

	return nil
}

// setup builds the container's mounts and pivots into its root.
func setup(spec Spec, warn io.Writer) error {
	// Nothing done here may reach the host's mount namespace.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("making mounts private: %w", err)
	}

	root, err := filepath.Abs(spec.Rootfs)
	if err != nil {
		return err
	}

	// pivot_root needs the new root to be a mount point.
	if err := unix.Mount(root, root, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("binding the root filesystem: %w", err)
	}

	for _, m := range defaultMounts(spec.WritableSysfs) {
		if err := mount(root, m); err != nil {
			if m.Type == "mqueue" {
				fmt.Fprintf(warn, "skipping %s: %v\n", m.Destination, err)

				continue
			}

			return err
		}

		if m.Destination == "/dev" {
			for _, dev := range devices {
				if err := mount(root, specs.Mount{Source: dev, Destination: dev, Type: "bind", Options: []string{"bind", "rw"}}); err != nil {
					return err
				}
			}
		}
	}

	for _, f := range hostFiles {
		if _, err := os.Stat(f); err != nil {
			continue
		}

		if err := mount(root, specs.Mount{Source: f, Destination: f, Type: "bind", Options: []string{"rbind", "ro"}}); err != nil {
			return err
		}
	}

	for _, m := range spec.Mounts {
		if err := mount(root, m); err != nil {
			var skip *unmountableError
			if errors.As(err, &skip) {
				fmt.Fprintf(warn, "skipping mount of %s: %v\n", m.Destination, err)

				continue
			}

			return err
		}
	}

	readonly := spec.ReadonlyPaths
	if readonly == nil {
		readonly = DefaultReadonlyPaths
	}

	for _, p := range readonly {
		if err := readonlyPath(filepath.Join(root, p)); err != nil {
			return err
		}
	}

	masked := spec.MaskedPaths
	if masked == nil {
		masked = DefaultMaskedPaths
	}

	for _, p := range masked {
		if err := maskPath(filepath.Join(root, p)); err != nil {
			return err
		}
	}

	if !spec.WritableRootfs {
		if err := unix.Mount("", root, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
			return fmt.Errorf("making the root filesystem read-only: %w", err)
		}
	}

	if err := unix.Chdir(root); err != nil {
		return err
	}

	if err := unix.PivotRoot(".", "."); err != nil {
		return fmt.Errorf("pivot_root: %w", err)
	}

	if err := unix.Unmount(".", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detaching the old root: %w", err)
	}

	return unix.Chdir("/")
}

// unmountableError is a mount whose destination cannot be made inside a
// kernel filesystem.
type unmountableError struct{ err error }

func (e *unmountableError) Error() string { return e.err.Error() }

// mount mounts m at its destination under root, making the mount point.
func mount(root string, m specs.Mount) error {
	dest := filepath.Join(root, m.Destination)
	flags, data := parseOptions(m.Options)

	bind := m.Type == "bind" || flags&unix.MS_BIND != 0

	if err := mountPoint(root, dest, m.Source, bind); err != nil {
		return err
	}

	if !bind {
		if err := unix.Mount(m.Source, dest, m.Type, flags, data); err != nil {
			return fmt.Errorf("mounting %s at %s: %w", m.Type, m.Destination, err)
		}

		return nil
	}

	if err := unix.Mount(m.Source, dest, "", flags&(unix.MS_BIND|unix.MS_REC), ""); err != nil {
		return fmt.Errorf("binding %s at %s: %w", m.Source, m.Destination, err)
	}

	// Read-only and the other flags of a bind mount take a remount.
	if rest := flags &^ (unix.MS_BIND | unix.MS_REC); rest != 0 {
		if err := unix.Mount("", dest, "", unix.MS_BIND|unix.MS_REMOUNT|rest, ""); err != nil {
			return fmt.Errorf("remounting %s: %w", m.Destination, err)
		}
	}

	return nil
}

// mountPoint makes dest: a file for a bind mount of a file, else a
// directory. A destination inside a kernel filesystem that cannot be made
// is an unmountableError.
func mountPoint(root, dest, source string, bind bool) error {
	if !strings.HasPrefix(dest, root+string(filepath.Separator)) && dest != root {
		return fmt.Errorf("mount destination %s leaves the root filesystem", dest)
	}

	isFile := false

	if bind {
		st, err := os.Stat(source)
		if err != nil {
			return fmt.Errorf("mount source %s: %w", source, err)
		}

		isFile = !st.IsDir()
	}

	if _, err := os.Stat(dest); err == nil {
		return nil
	}

	dir := dest
	if isFile {
		dir = filepath.Dir(dest)
	}

	if err := os.MkdirAll(dir, 0o755); err != nil {
		return &unmountableError{fmt.Errorf("making %s: %w", dir, err)}
	}

	if isFile {
		f, err := os.OpenFile(dest, os.O_CREATE|os.O_WRONLY, 0o644)
		if err != nil {
			return &unmountableError{fmt.Errorf("making %s: %w", dest, err)}
		}

		return f.Close()
	}

	return nil
}

// readonlyPath is runc's readonlyPath: bind the path onto itself read-only.
func readonlyPath(path string) error {
	if err := unix.Mount(path, path, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}

		return fmt.Errorf("making %s read-only: %w", path, err)
	}

	if err := unix.Mount("", path, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("making %s read-only: %w", path, err)
	}

	return nil
}

// maskPath is runc's maskPath: a read-only tmpfs over a directory,
// /dev/null over a file; a missing path is skipped.
func maskPath(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}

		return fmt.Errorf("masking %s: %w", path, err)
	}

	if st.IsDir() {
		err = unix.Mount("tmpfs", path, "tmpfs", unix.MS_RDONLY, "")
	} else {
		err = unix.Mount("/dev/null", path, "", unix.MS_BIND, "")
	}

	if err != nil {
		return fmt.Errorf("masking %s: %w", path, err)
	}

	return nil
}

// mountFlags are the OCI mount options that are flags.
var mountFlags = map[string]uintptr{
	"bind": unix.MS_BIND, "rbind": unix.MS_BIND | unix.MS_REC, "ro": unix.MS_RDONLY,
	"nosuid": unix.MS_NOSUID, "nodev": unix.MS_NODEV, "noexec": unix.MS_NOEXEC,
	"strictatime": unix.MS_STRICTATIME, "relatime": unix.MS_RELATIME, "noatime": unix.MS_NOATIME,
}

// ignoredOptions are OCI mount options that are neither flags nor data.
var ignoredOptions = []string{"rw", "private", "rprivate", "shared", "rshared", "slave", "rslave"}

// parseOptions splits OCI mount options into flags and filesystem data.
func parseOptions(opts []string) (uintptr, string) {
	var (
		flags uintptr
		data  []string
	)

	for _, o := range opts {
		if f, ok := mountFlags[o]; ok {
			flags |= f

			continue
		}

		if slices.Contains(ignoredOptions, o) {
			continue
		}

		data = append(data, o)
	}

	return flags, strings.Join(data, ",")
}
