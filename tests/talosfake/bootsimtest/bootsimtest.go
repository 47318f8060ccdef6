// Package bootsimtest runs simulated Talos machines (cmd/talosmachine, the
// boot simulator of package bootsim) for end-to-end stories: each machine
// is a process, optionally inside a network namespace, that the story
// starts, watches (its phase, its log, its extension services' logs),
// switches off or kills.
package bootsimtest

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/tests/talosfake/bootsim"
)

const (
	pollInterval = 50 * time.Millisecond
	stopTimeout  = 30 * time.Second
	// LogFile is the machine's log in its directory.
	LogFile = "machine.log"
)

// buildDir holds the binary built for this test binary; Cleanup removes it.
var buildDir = filepath.Join(os.TempDir(), fmt.Sprintf("sovra-talosmachine-%d", os.Getpid()))

// binary builds cmd/talosmachine once per test binary.
var binary = sync.OnceValues(func() (string, error) {
	if err := os.MkdirAll(buildDir, 0o700); err != nil {
		return "", err
	}

	out := filepath.Join(buildDir, "talosmachine")
	cmd := exec.Command("go", "build", "-o", out, "github.com/sovra-dev/sovra/tests/talosfake/cmd/talosmachine")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")

	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("building talosmachine: %v\n%s", err, b)
	}

	return out, nil
})

// Binary returns the simulator's binary, built on first use.
func Binary(t testing.TB) string {
	t.Helper()

	bin, err := binary()
	if err != nil {
		t.Fatal(err)
	}

	return bin
}

// Cleanup removes the built binary; call it from TestMain after m.Run.
func Cleanup() { os.RemoveAll(buildDir) } //nolint:errcheck

// Options describe a machine; zero values are the simulator's defaults.
type Options struct {
	// Dir is the machine's state directory; empty means a new temporary one.
	Dir string
	// UUID is the SMBIOS UUID; empty means a random one.
	UUID string
	// Netns runs the machine inside this network namespace.
	Netns string
	// Args are the simulator's flags other than --dir and --uuid
	// (talosmachine -help lists them).
	Args []string
}

// Machine is a running simulated machine.
type Machine struct {
	t    testing.TB
	Dir  string
	UUID string
	// Log is the simulator's log (one JSON line per step).
	Log  string
	opts Options

	cmd  *exec.Cmd
	done chan error
}

// Start starts a machine and stops it (SIGTERM, then SIGKILL) when the test
// ends.
func Start(t testing.TB, opts Options) *Machine {
	t.Helper()

	if opts.Dir == "" {
		opts.Dir = t.TempDir()
	}

	if opts.UUID == "" {
		opts.UUID = NewUUID(t)
	}

	m := &Machine{t: t, Dir: opts.Dir, UUID: opts.UUID, Log: filepath.Join(opts.Dir, LogFile), opts: opts}
	m.start()

	t.Cleanup(m.Stop)

	return m
}

// NewUUID returns a random SMBIOS-style UUID.
func NewUUID(t testing.TB) string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}

	h := hex.EncodeToString(b)

	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}

func (m *Machine) start() {
	t := m.t
	t.Helper()

	log, err := os.OpenFile(m.Log, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		t.Fatal(err)
	}

	args := append([]string{Binary(t), "--dir", m.Dir, "--uuid", m.UUID}, m.opts.Args...)
	if m.opts.Netns != "" {
		args = append([]string{"ip", "netns", "exec", m.opts.Netns}, args...)
	}

	m.cmd = exec.Command(args[0], args[1:]...)
	m.cmd.Stdout, m.cmd.Stderr = log, log
	m.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}

	if err := m.cmd.Start(); err != nil {
		log.Close()
		t.Fatalf("starting the simulated machine: %v", err)
	}

	m.done = make(chan error, 1)

	go func() {
		m.done <- m.cmd.Wait()
		log.Close()
	}()
}

// Restart powers the machine on again after Stop or Kill, from its disks.
func (m *Machine) Restart() {
	m.t.Helper()
	m.start()
}

// Stop switches the machine off: SIGTERM (services stop), then SIGKILL.
func (m *Machine) Stop() {
	if m.cmd == nil {
		return
	}

	_ = m.cmd.Process.Signal(syscall.SIGTERM) //nolint:errcheck

	select {
	case <-m.done:
	case <-time.After(stopTimeout):
		_ = m.cmd.Process.Kill() //nolint:errcheck
		<-m.done
	}

	m.cmd = nil
}

// Kill kills the machine at once, as a power cut does.
func (m *Machine) Kill() {
	if m.cmd == nil {
		return
	}

	_ = m.cmd.Process.Kill() //nolint:errcheck
	<-m.done
	m.cmd = nil
}

// Exited reports whether the simulator process has ended.
func (m *Machine) Exited() bool {
	if m.cmd == nil {
		return true
	}

	select {
	case err := <-m.done:
		m.done <- err

		return true
	default:
		return false
	}
}

// Status reads the machine's status; the zero Status before its first boot.
func (m *Machine) Status() bootsim.Status {
	var st bootsim.Status

	b, err := os.ReadFile(filepath.Join(m.Dir, bootsim.StatusFile))
	if err == nil {
		_ = json.Unmarshal(b, &st) //nolint:errcheck
	}

	return st
}

// WaitPhase waits until boot number boot (0: any) is in phase and returns
// the status; it fails the test at timeout or if the machine exits.
func (m *Machine) WaitPhase(boot int, phase bootsim.Phase, timeout time.Duration) bootsim.Status {
	m.t.Helper()

	deadline := time.Now().Add(timeout)

	for {
		st := m.Status()
		if st.Phase == phase && (boot == 0 || st.Boot == boot) {
			return st
		}

		if phase != bootsim.PhasePoweredOff && m.Exited() {
			m.t.Fatalf("machine %s exited in %+v waiting for boot %d %s\n%s", m.UUID, st, boot, phase, m.Tail(30))
		}

		if time.Now().After(deadline) {
			m.t.Fatalf("machine %s is %+v after %s, want boot %d %s\n%s", m.UUID, st, timeout, boot, phase, m.Tail(30))
		}

		time.Sleep(pollInterval)
	}
}

// LogSize is the size of the machine's log now: an offset for LogSince and
// WaitLog.
func (m *Machine) LogSize() int64 {
	st, err := os.Stat(m.Log)
	if err != nil {
		return 0
	}

	return st.Size()
}

// LogSince is what the machine logged after offset.
func (m *Machine) LogSince(offset int64) string {
	b, _ := os.ReadFile(m.Log) //nolint:errcheck
	if offset > int64(len(b)) {
		return ""
	}

	return string(b[offset:])
}

// Entry is one line of the machine's log.
type Entry map[string]any

// Msg is the entry's message.
func (e Entry) Msg() string { s, _ := e["msg"].(string); return s }

// Str is a string field.
func (e Entry) Str(key string) string { s, _ := e[key].(string); return s }

// Entries parses the log after offset; lines that are not JSON are skipped.
func (m *Machine) Entries(offset int64) []Entry {
	var entries []Entry

	sc := bufio.NewScanner(strings.NewReader(m.LogSince(offset)))
	sc.Buffer(make([]byte, 0, 1<<20), 1<<20)

	for sc.Scan() {
		var e Entry
		if json.Unmarshal(sc.Bytes(), &e) == nil {
			entries = append(entries, e)
		}
	}

	return entries
}

// Find returns the entries after offset with message msg whose fields
// include every key=value of match.
func (m *Machine) Find(offset int64, msg string, match ...string) []Entry {
	var found []Entry

	for _, e := range m.Entries(offset) {
		if e.Msg() != msg {
			continue
		}

		ok := true

		for _, kv := range match {
			k, v, _ := strings.Cut(kv, "=")
			if fmt.Sprint(e[k]) != v {
				ok = false
			}
		}

		if ok {
			found = append(found, e)
		}
	}

	return found
}

// WaitLog waits until an entry after offset has message msg and the fields
// of match (key=value), and returns it.
func (m *Machine) WaitLog(offset int64, timeout time.Duration, msg string, match ...string) Entry {
	m.t.Helper()

	deadline := time.Now().Add(timeout)

	for {
		if found := m.Find(offset, msg, match...); len(found) > 0 {
			return found[0]
		}

		if time.Now().After(deadline) {
			m.t.Fatalf("machine %s did not log %q %v within %s\n%s", m.UUID, msg, match, timeout, m.Tail(30))
		}

		time.Sleep(pollInterval)
	}
}

// Tail returns the last n lines of the machine's log.
func (m *Machine) Tail(n int) string {
	b, _ := os.ReadFile(m.Log) //nolint:errcheck
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")

	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}

	return strings.Join(lines, "\n")
}

// ExtensionLog is what extension service name wrote in boot n.
func (m *Machine) ExtensionLog(boot int, name string) string {
	b, _ := os.ReadFile(bootsim.ExtensionLog(m.Dir, boot, name)) //nolint:errcheck

	return string(b)
}

// StoredConfig is the configuration in the machine's STATE; nil when none.
func (m *Machine) StoredConfig() []byte {
	b, err := os.ReadFile(filepath.Join(bootsim.StatePartition(m.Dir), "data", bootsim.ConfigFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}

	return b
}

// Pid is the simulator's process ID (0 when it does not run).
func (m *Machine) Pid() int {
	if m.cmd == nil || m.cmd.Process == nil {
		return 0
	}

	return m.cmd.Process.Pid
}

// Flag formats a repeatable flag's values: Flag("--disk", "a", "b") is
// --disk a --disk b.
func Flag(name string, values ...string) []string {
	var out []string
	for _, v := range values {
		out = append(out, name, v)
	}

	return out
}
