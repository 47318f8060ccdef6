// Package sovradtest runs the built sovrad binary for end-to-end tests and
// talks to it with the built kubectl: the real daemon and the real client, as
// a user runs them.
package sovradtest

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/internal/testutil"
)

const (
	// componentUsers starts the user names of sovrad's components.
	componentUsers   = "system:sovra:"
	maxRefusalsShown = 5

	readyTimeout = 90 * time.Second
	stopTimeout  = 45 * time.Second
	pollInterval = 50 * time.Millisecond
)

// Daemon is one running sovrad.
type Daemon struct {
	t       testing.TB
	DataDir string
	// Port is the API's port on 127.0.0.1.
	Port int
	// Args are the flags it was started with (without --data-dir and --listen).
	Args []string
	// Log is the file the daemon's stdout and stderr go to.
	Log string
	// StartedAt is when the process was started; ReadyAt when /readyz first said ok.
	StartedAt, ReadyAt time.Time

	cmd  *exec.Cmd
	done chan error
}

// Start starts sovrad on a free loopback port with dataDir and extra flags,
// waits until /readyz answers ok, and stops it when the test ends.
func Start(t testing.TB, dataDir string, args ...string) *Daemon {
	t.Helper()
	d := Launch(t, dataDir, args...)
	d.WaitReady()
	return d
}

// Launch starts sovrad as Start does but returns at once, for tests that
// watch it start; WaitReady waits for it.
func Launch(t testing.TB, dataDir string, args ...string) *Daemon {
	t.Helper()
	d := &Daemon{t: t, DataDir: dataDir, Port: testutil.FreePort(t), Args: args}
	d.launch()
	t.Cleanup(func() { d.Kill() })
	return d
}

func (d *Daemon) start() {
	d.t.Helper()
	d.launch()
	d.WaitReady()
}

func (d *Daemon) launch() {
	d.t.Helper()
	d.Log = filepath.Join(d.t.TempDir(), "sovrad.log")
	logFile, err := os.Create(d.Log)
	if err != nil {
		d.t.Fatal(err)
	}
	// Registered before the test's Kill: it runs once the daemon is gone.
	log := d.Log
	d.t.Cleanup(func() { d.checkRefusals(log) })
	args := append([]string{"--data-dir", d.DataDir, "--listen", "127.0.0.1:" + strconv.Itoa(d.Port)}, d.Args...)
	if !hasFlag(d.Args, "--node-listen") {
		// The node API's default (:7443) would collide between daemons.
		args = append(args, "--node-listen", "127.0.0.1:"+strconv.Itoa(testutil.FreePort(d.t)))
	}
	d.cmd = exec.Command(testutil.Bin(d.t, "sovrad"), args...)
	d.cmd.Stdout, d.cmd.Stderr = logFile, logFile
	d.StartedAt = time.Now()
	if err := d.cmd.Start(); err != nil {
		d.t.Fatalf("starting sovrad: %v", err)
	}
	d.done = make(chan error, 1)
	go func() { d.done <- d.cmd.Wait(); logFile.Close() }()
}

// checkRefusals fails the test when the API refused one of sovrad's own
// components anything (every story then checks that each component's RBAC,
// package identity, grants what the story made it do). The API's refusal
// names the user: ... is forbidden: User "system:sovra:kms" cannot ...
func (d *Daemon) checkRefusals(log string) {
	data, err := os.ReadFile(log)
	if err != nil {
		return
	}
	var refused []string
	for _, line := range strings.Split(string(data), "\n") {
		if strings.Contains(line, "forbidden") && strings.Contains(line, componentUsers) {
			refused = append(refused, line)
		}
	}
	if len(refused) > 0 {
		d.t.Errorf("the API refused sovrad's components %d times, first:\n%s", len(refused), strings.Join(refused[:min(len(refused), maxRefusalsShown)], "\n"))
	}
}

// WaitReady waits until /readyz answers ok, failing the test if sovrad
// exits or takes too long.
func (d *Daemon) WaitReady() {
	d.t.Helper()
	if err := d.waitReady(); err != nil {
		d.t.Fatalf("sovrad did not become ready: %v\n%s", err, d.Tail(40))
	}
	d.ReadyAt = time.Now()
}

func (d *Daemon) waitReady() error {
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		// /readyz is the one path answered without credentials; the CA is
		// checked by every kubectl call afterwards.
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, //nolint:gosec
	}}
	deadline := time.Now().Add(readyTimeout)
	for time.Now().Before(deadline) {
		select {
		case err := <-d.done:
			d.done <- err
			return fmt.Errorf("sovrad exited: %v", err)
		default:
		}
		resp, err := client.Get(d.URL() + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		time.Sleep(pollInterval)
	}
	return errors.New("timed out")
}

// hasFlag reports whether args set flag, as "--flag value" or "--flag=value".
func hasFlag(args []string, flag string) bool {
	for _, a := range args {
		if a == flag || strings.HasPrefix(a, flag+"=") {
			return true
		}
	}
	return false
}

// URL is the API's base URL.
func (d *Daemon) URL() string { return "https://127.0.0.1:" + strconv.Itoa(d.Port) }

// Kubeconfig is the admin kubeconfig sovrad wrote.
func (d *Daemon) Kubeconfig() string { return filepath.Join(d.DataDir, "admin.kubeconfig") }

// PID is the daemon's process ID.
func (d *Daemon) PID() int { return d.cmd.Process.Pid }

// Stop sends SIGTERM and waits for a graceful exit, failing the test if the
// daemon exits non-zero or not in time.
func (d *Daemon) Stop() {
	d.t.Helper()
	if d.cmd == nil {
		return
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-d.done:
		d.cmd = nil
		if err != nil {
			d.t.Fatalf("sovrad exited with %v after SIGTERM\n%s", err, d.Tail(20))
		}
	case <-time.After(stopTimeout):
		d.Kill()
		d.t.Fatalf("sovrad did not stop within %s of SIGTERM", stopTimeout)
	}
}

// Kill kills the daemon at once, as a crash would.
func (d *Daemon) Kill() {
	if d.cmd == nil {
		return
	}
	_ = d.cmd.Process.Kill()
	<-d.done
	d.cmd = nil
}

// Restart stops the daemon gracefully and starts it again on the same port.
func (d *Daemon) Restart() {
	d.t.Helper()
	d.Stop()
	d.start()
}

// LogSize is the size of the daemon's log now: an offset for LogSince.
func (d *Daemon) LogSize() int64 {
	d.t.Helper()
	st, err := os.Stat(d.Log)
	if err != nil {
		d.t.Fatal(err)
	}
	return st.Size()
}

// LogSince is what the daemon logged after offset.
func (d *Daemon) LogSince(offset int64) string {
	d.t.Helper()
	b, err := os.ReadFile(d.Log)
	if err != nil {
		d.t.Fatal(err)
	}
	return string(b[offset:])
}

// Tail returns the last n lines of the daemon's log.
func (d *Daemon) Tail(n int) string {
	data, _ := os.ReadFile(d.Log)
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// WaitEstablished waits until every named CRD is Established. (kubectl wait
// --for=condition=Established fails, rather than waits, while a new CRD has
// no conditions yet.)
func (d *Daemon) WaitEstablished(crds ...string) {
	d.t.Helper()
	deadline := time.Now().Add(readyTimeout)
	for _, crd := range crds {
		for {
			out, err := d.TryKubectl("get", "crd", crd, "-o", `jsonpath={.status.conditions[?(@.type=="Established")].status}`)
			if err == nil && out == "True" {
				break
			}
			if time.Now().After(deadline) {
				d.t.Fatalf("CRD %s not Established within %s: %q %v", crd, readyTimeout, out, err)
			}
			time.Sleep(pollInterval)
		}
	}
}

// Kubectl runs the built kubectl with the admin kubeconfig and fails the test
// on error. It returns stdout.
func (d *Daemon) Kubectl(args ...string) string {
	d.t.Helper()
	out, err := d.TryKubectl(args...)
	if err != nil {
		d.t.Fatalf("kubectl %s: %v", strings.Join(args, " "), err)
	}
	return out
}

// TryKubectl runs kubectl with the admin kubeconfig; the error holds stderr.
func (d *Daemon) TryKubectl(args ...string) (string, error) {
	return Kubectl(d.t, append([]string{"--kubeconfig", d.Kubeconfig()}, args...)...)
}

// Kubectl runs the built kubectl with args and returns stdout; the error
// holds stderr.
func Kubectl(t testing.TB, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, testutil.Bin(t, "kubectl"), args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%w: %s", err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// RSS returns the resident set size of the process in bytes.
func RSS(pid int) (int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, err := strconv.ParseInt(f[1], 10, 64)
			return kb * 1024, err
		}
	}
	return 0, errors.New("no VmRSS")
}
