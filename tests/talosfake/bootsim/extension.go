package bootsim

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"syscall"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	talosconfig "github.com/siderolabs/talos/pkg/machinery/config"
	"github.com/siderolabs/talos/pkg/machinery/config/config"
	extservices "github.com/siderolabs/talos/pkg/machinery/extensions/services"
	"go.uber.org/zap"
	"go.yaml.in/yaml/v4"

	"github.com/sovra-dev/sovra/tests/talosfake/container"
)

// Extension services (services/extension.go, controllers/runtime/
// extension_service*.go).
const (
	// dependencyPoll is how often unmet dependencies are checked.
	dependencyPoll = 500 * time.Millisecond
	// configFilesDir is where Talos writes the configFiles of an
	// ExtensionServiceConfig (constants.ExtensionServiceUserConfigPath).
	configFilesDir = "/system/overlays/extensions"
)

// The kernel's files bound over the container's /proc: a machine's own in
// every boot.
var kernelFiles = []string{"/proc/sys/kernel/random/boot_id", "/proc/stat"}

// extService is one extension service in a boot.
type extService struct {
	b      *bootRun
	ext    Extension
	spec   extservices.Spec
	log    *zap.Logger
	logf   string
	rootfs string

	// restart is signalled when the service's ExtensionServiceConfig
	// changes; stopCh when the boot ends; done closes when run returns.
	restart chan struct{}
	stopCh  chan struct{}
	done    chan struct{}
	// version is the ExtensionServiceConfig it runs with ("" for none);
	// guarded by b.mu.
	version string
}

// startExtensions loads every installed extension service and starts it
// once its dependencies are met, as the ExtensionServiceController does.
func (b *bootRun) startExtensions() error {
	for _, ext := range b.m.cfg.Extensions {
		spec, err := loadSpec(ext.Spec)
		if err != nil {
			b.m.log.Error("error loading extension service spec", zap.String("filename", ext.Spec), zap.Error(err))

			continue
		}

		rootfs, err := b.m.prepareRootfs(spec, ext)
		if err != nil {
			return err
		}

		e := &extService{
			b: b, ext: ext, spec: spec, rootfs: rootfs,
			log:     b.m.log.With(zap.Int("boot", b.num), zap.String("service", "ext-"+spec.Name)),
			logf:    ExtensionLog(b.m.cfg.Dir, b.num, spec.Name),
			restart: make(chan struct{}, 1), stopCh: make(chan struct{}), done: make(chan struct{}),
		}

		b.mu.Lock()
		b.exts = append(b.exts, e)
		e.version = serviceConfigVersion(b.cfg, spec.Name)
		b.mu.Unlock()

		go e.run()
	}

	return nil
}

// loadSpec reads and validates an extension service spec.
func loadSpec(path string) (extservices.Spec, error) {
	var spec extservices.Spec

	f, err := os.Open(path)
	if err != nil {
		return spec, err
	}
	defer f.Close() //nolint:errcheck

	if err := yaml.NewDecoder(f).Decode(&spec); err != nil {
		return spec, fmt.Errorf("error unmarshalling extension service config: %w", err)
	}

	if err := spec.Validate(); err != nil {
		return spec, fmt.Errorf("error validating extension service spec: %w", err)
	}

	return spec, nil
}

// prepareRootfs makes the extension's root filesystem on the machine
// (/usr/local/lib/containers/<name>): a copy of a directory, or, for a
// binary, an empty directory the binary is bound into at the entrypoint.
func (m *Machine) prepareRootfs(spec extservices.Spec, ext Extension) (string, error) {
	dir := filepath.Join(m.cfg.Dir, extensionsDir, spec.Name, "rootfs")

	st, err := os.Stat(ext.Rootfs)
	if err != nil {
		return "", fmt.Errorf("extension %s: %w", spec.Name, err)
	}

	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("extension %s: %w", spec.Name, err)
	}

	if st.IsDir() {
		entries, _ := os.ReadDir(dir) //nolint:errcheck
		if len(entries) == 0 {
			if err := os.CopyFS(dir, os.DirFS(ext.Rootfs)); err != nil {
				return "", fmt.Errorf("extension %s: copying its root filesystem: %w", spec.Name, err)
			}
		}
	}

	return dir, nil
}

// serviceConfigVersion identifies the ExtensionServiceConfig named name in
// cfg (its files and environment); empty when there is none.
func serviceConfigVersion(cfg config.Config, name string) string {
	sc := serviceConfig(cfg, name)
	if sc == nil {
		return ""
	}

	h := sha256.New()

	for _, f := range sc.ConfigFiles() {
		fmt.Fprintf(h, "file %q %q\n", f.MountPath(), f.Content())
	}

	for _, e := range sc.Environment() {
		fmt.Fprintf(h, "env %q\n", e)
	}

	return hex.EncodeToString(h.Sum(nil))
}

func serviceConfig(cfg config.Config, name string) config.ExtensionServiceConfig {
	if cfg == nil {
		return nil
	}

	for _, sc := range cfg.ExtensionServiceConfigs() {
		if sc.Name() == name {
			return sc
		}
	}

	return nil
}

// configChanged restarts the service when its ExtensionServiceConfig
// changed (ExtensionServiceController.handleRestart).
func (e *extService) configChanged(cfg talosconfig.Provider) {
	v := serviceConfigVersion(cfg, e.spec.Name)

	e.b.mu.Lock()
	changed := v != e.version
	e.version = v
	e.b.mu.Unlock()

	if !changed {
		return
	}

	e.log.Warn("extension service config changed, restarting")

	select {
	case e.restart <- struct{}{}:
	default:
	}
}

// stop ends the service (SIGTERM, then SIGKILL) and waits for it.
func (e *extService) stop() {
	select {
	case <-e.stopCh:
	default:
		close(e.stopCh)
	}

	<-e.done
}

// run runs the service for the boot: it waits for its dependencies, starts
// it, and restarts it as its restart policy says.
func (e *extService) run() {
	defer close(e.done)

	for {
		if !e.waitDependencies() {
			return
		}

		code, why := e.runOnce()

		switch why {
		case exitStopped:
			return
		case exitRestart:
			continue
		}

		switch e.spec.Restart {
		case extservices.RestartNever:
			return
		case extservices.RestartUntilSuccess:
			if code == 0 {
				return
			}
		}

		select {
		case <-e.stopCh:
			return
		case <-time.After(e.b.m.cfg.RestartInterval):
		}
	}
}

// waitDependencies waits until the service's conditions hold; false means
// the boot ended first.
func (e *extService) waitDependencies() bool {
	logged := false

	for {
		missing := e.unmet()
		if len(missing) == 0 {
			return true
		}

		if !logged {
			e.log.Info("waiting for extension service dependencies", zap.Strings("missing", missing))

			logged = true
		}

		select {
		case <-e.stopCh:
			return false
		case <-e.restart:
		case <-time.After(dependencyPoll):
		}
	}
}

// unmet lists the dependencies that do not hold: a path that does not
// exist on the machine, an ExtensionServiceConfig that is not in the
// configuration. The network, time and services are up once the
// simulated machine runs.
func (e *extService) unmet() []string {
	var missing []string

	if f := e.spec.Container.EnvironmentFile; f != "" {
		if _, err := os.Stat(e.b.rootPath(f)); err != nil {
			missing = append(missing, "file "+f)
		}
	}

	for _, dep := range e.spec.Depends {
		switch {
		case dep.Path != "":
			if _, err := os.Stat(e.b.rootPath(dep.Path)); err != nil {
				missing = append(missing, "path "+dep.Path)
			}
		case dep.Configuration:
			if serviceConfig(e.b.config(), e.spec.Name) == nil {
				missing = append(missing, "configuration "+e.spec.Name)
			}
		}
	}

	return missing
}

type exitReason int

const (
	exitExited exitReason = iota
	exitStopped
	exitRestart
)

// runOnce starts the service's container and waits until it exits, the
// boot ends or its configuration changes.
func (e *extService) runOnce() (int, exitReason) {
	cmd, err := e.command()
	if err != nil {
		e.log.Error("starting the extension service", zap.Error(err))

		return -1, exitExited
	}

	out, err := os.OpenFile(e.logf, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		e.log.Error("opening the extension service log", zap.Error(err))

		return -1, exitExited
	}
	defer out.Close() //nolint:errcheck

	cmd.Stdout, cmd.Stderr = out, out

	if err := cmd.Start(); err != nil {
		e.log.Error("starting the extension service", zap.Error(err))

		return -1, exitExited
	}

	e.log.Info(MsgExtStarted, zap.Int("pid", cmd.Process.Pid), zap.String("log", e.logf))

	exited := make(chan error, 1)

	go func() { exited <- cmd.Wait() }()

	var (
		reason exitReason
		err2   error
	)

	select {
	case err2 = <-exited:
		reason = exitExited
	case <-e.stopCh:
		err2, reason = e.terminate(cmd, exited), exitStopped
	case <-e.restart:
		err2, reason = e.terminate(cmd, exited), exitRestart
	}

	code := 0

	var exitErr *exec.ExitError
	if errors.As(err2, &exitErr) {
		code = exitErr.ExitCode()
	}

	e.log.Info(MsgExtExited, zap.Int("exit_code", code), zap.Error(err2))

	return code, reason
}

// terminate stops the process: SIGTERM, then SIGKILL after the graceful
// shutdown timeout.
func (e *extService) terminate(cmd *exec.Cmd, exited <-chan error) error {
	_ = cmd.Process.Signal(syscall.SIGTERM) //nolint:errcheck

	select {
	case err := <-exited:
		return err
	case <-time.After(e.b.m.cfg.StopTimeout):
		e.log.Warn("extension service did not stop in time: killing it")

		_ = cmd.Process.Kill() //nolint:errcheck

		return <-exited
	}
}

// command is the container of the service under the configuration in
// force (Extension.Runner and getOCIOptions).
func (e *extService) command() (*exec.Cmd, error) {
	b := e.b
	cfg := b.config()
	c := e.spec.Container

	var mounts []specs.Mount

	if st, err := os.Stat(e.ext.Rootfs); err == nil && !st.IsDir() {
		mounts = append(mounts, specs.Mount{Type: "bind", Source: e.ext.Rootfs, Destination: filepath.Join("/", c.Entrypoint), Options: []string{"bind", "ro"}})
	}

	for _, f := range kernelFiles {
		mounts = append(mounts, specs.Mount{Type: "bind", Source: b.rootPath(f), Destination: f, Options: []string{"bind", "ro"}})
	}

	for _, mnt := range c.Mounts {
		src := b.rootPath(mnt.Source)

		if _, err := os.Stat(src); errors.Is(err, os.ErrNotExist) {
			if err := os.MkdirAll(src, 0o700); err != nil {
				return nil, fmt.Errorf("creating the source of mount %s: %w", mnt.Destination, err)
			}
		}

		mnt.Source = src
		mounts = append(mounts, mnt)
	}

	env := b.m.environment(cfg)

	if c.EnvironmentFile != "" {
		fileEnv, err := readEnvFile(b.rootPath(c.EnvironmentFile))
		if err != nil {
			return nil, err
		}

		env = mergeEnv(env, fileEnv...)
	}

	env = mergeEnv(env, c.Environment...)

	if sc := serviceConfig(cfg, e.spec.Name); sc != nil {
		dir := b.rootPath(filepath.Join(configFilesDir, e.spec.Name))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, err
		}

		for _, f := range sc.ConfigFiles() {
			src := filepath.Join(dir, strings.ReplaceAll(strings.TrimPrefix(f.MountPath(), "/"), "/", "-"))
			if err := os.WriteFile(src, []byte(f.Content()), 0o644); err != nil { //nolint:gosec // as Talos writes them
				return nil, fmt.Errorf("writing config file %s: %w", f.MountPath(), err)
			}

			mounts = append(mounts, specs.Mount{Type: "bind", Source: src, Destination: f.MountPath(), Options: []string{"ro", "bind"}})
		}

		env = mergeEnv(env, sc.Environment()...)
	}

	spec := container.Spec{
		ID:             "ext-" + e.spec.Name,
		Rootfs:         e.rootfs,
		WritableRootfs: c.Security.WriteableRootfs,
		WritableSysfs:  c.Security.WriteableSysfs,
		Args:           append([]string{c.Entrypoint}, c.Args...),
		Env:            env,
		Mounts:         mounts,
		MaskedPaths:    c.Security.MaskedPaths,
		ReadonlyPaths:  c.Security.ReadonlyPaths,
		Warnings:       e.logf,
	}

	return container.Command(b.m.cfg.Self, filepath.Join(b.dir, "ext-"+e.spec.Name+".json"), spec)
}

// environment is environment.Get: the talos.environment= kernel arguments,
// machine.env and the EnvironmentConfig document.
func (m *Machine) environment(cfg config.Config) []string {
	env := slices.Clone(m.cfg.Environment)

	if cfg == nil {
		return env
	}

	if cfg.Machine() != nil {
		env = append(env, sortedEnv(cfg.Machine().Env())...)
	}

	if cfg.Environment() != nil {
		env = append(env, sortedEnv(cfg.Environment().Variables())...)
	}

	return env
}

func sortedEnv(vars map[string]string) []string {
	env := make([]string, 0, len(vars))
	for k, v := range vars {
		env = append(env, k+"="+v)
	}

	sort.Strings(env)

	return env
}

// mergeEnv is oci.WithEnv: a variable set again replaces the earlier value.
func mergeEnv(env []string, more ...string) []string {
	out := slices.Clone(env)

	for _, kv := range more {
		key, _, _ := strings.Cut(kv, "=")

		i := slices.IndexFunc(out, func(e string) bool { k, _, _ := strings.Cut(e, "="); return k == key })
		if i >= 0 {
			out[i] = kv
		} else {
			out = append(out, kv)
		}
	}

	return out
}

// readEnvFile reads KEY=VALUE lines (the simple part of envparse).
func readEnvFile(path string) ([]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("failed to parse environment file %q: %w", path, err)
	}

	var env []string

	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") || !strings.Contains(line, "=") {
			continue
		}

		env = append(env, strings.TrimPrefix(line, "export "))
	}

	return env, nil
}
