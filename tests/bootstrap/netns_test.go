package bootstrap

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/internal/testutil"
	"github.com/sovra-dev/sovra/tests/talosfake"
)

// Network of the stories: every namespace set has its own bridge, so the
// range is only ever used inside namespaces the test creates.
const (
	netPrefix      = "10.66.0"
	netCIDR        = netPrefix + ".0/24"
	nsPrefix       = "sovra-bs-"
	waitFinal      = 90 * time.Second
	processStopMax = 5 * time.Second
)

// Agent log messages the stories wait for (see agent/controllers/bootstrap).
const (
	msgBootstrapped  = "bootstrapped etcd on this node"
	msgJoined        = "etcd is up on the leader: this node joins; bootstrap path done"
	msgEtcdExists    = "etcd already exists in the cluster: not bootstrapping"
	msgWorker        = "worker node: leaving the bootstrap path"
	msgUnverified    = "ignoring host without a valid certificate from the cluster's Talos CA"
	msgLeaderElected = "elected this node to bootstrap etcd"
)

var nsCounter atomic.Int64

// fakeDir holds the talosfake binary built for this test binary; TestMain
// removes it.
var fakeDir = filepath.Join(os.TempDir(), fmt.Sprintf("sovra-talosfake-%d", os.Getpid()))

func TestMain(m *testing.M) {
	code := m.Run()

	os.RemoveAll(fakeDir) //nolint:errcheck
	os.Exit(code)
}

// fakeBinary builds tests/talosfake/cmd/talosfake once per test binary.
var fakeBinary = sync.OnceValues(func() (string, error) {
	dir := fakeDir
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}

	out := filepath.Join(dir, "talosfake")
	cmd := exec.Command("go", "build", "-o", out, "github.com/sovra-dev/sovra/tests/talosfake/cmd/talosfake")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")

	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("building talosfake: %v\n%s", err, b)
	}

	return out, nil
})

// cluster is one set of network namespaces on a shared bridge.
type cluster struct {
	t      testing.TB
	id     string
	bridge string
	dir    string
	pki    *talosfake.PKI
	nodes  []*host
}

// host is one namespace: a fake Talos node and, usually, the real agent.
type host struct {
	c     *cluster
	index int
	ns    string
	addr  netip.Addr
	dir   string // PKI for the fake, its state directory and logs
	fake  *exec.Cmd
	agent *exec.Cmd
	// agentDone is closed when the agent exits; agentErr is its result.
	agentDone chan struct{}
	agentErr  error
}

// newCluster creates the bridge namespace and the cluster's PKI. Everything
// is removed when the test ends, whatever its outcome.
func newCluster(t testing.TB) *cluster {
	t.Helper()
	testutil.RequireRoot(t)
	testutil.Require(t, "ip")
	sweepStale(t)

	pki, err := talosfake.NewPKI("sovra-test")
	if err != nil {
		t.Fatal(err)
	}

	c := &cluster{
		t:   t,
		id:  fmt.Sprintf("%s%d-%d", nsPrefix, os.Getpid(), nsCounter.Add(1)),
		dir: t.TempDir(),
		pki: pki,
	}
	c.bridge = c.id + "-br"

	if err := pki.Write(c.dir); err != nil {
		t.Fatal(err)
	}

	t.Cleanup(c.close)

	c.ip("netns", "add", c.bridge)
	c.ip("-n", c.bridge, "link", "add", "br0", "type", "bridge")
	c.ip("-n", c.bridge, "link", "set", "br0", "up")
	c.ip("-n", c.bridge, "link", "set", "lo", "up")

	return c
}

// sweepStale deletes namespaces left by test binaries that died before their
// cleanup ran (their pid is in the name).
func sweepStale(t testing.TB) {
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		return
	}

	for _, line := range strings.Split(string(out), "\n") {
		name, _, _ := strings.Cut(strings.TrimSpace(line), " ")
		if !strings.HasPrefix(name, nsPrefix) {
			continue
		}

		pidText, _, _ := strings.Cut(strings.TrimPrefix(name, nsPrefix), "-")

		pid, err := strconv.Atoi(pidText)
		if err != nil || pid == os.Getpid() || syscall.Kill(pid, 0) == nil {
			continue
		}

		t.Logf("removing stale namespace %s", name)
		exec.Command("ip", "netns", "del", name).Run() //nolint:errcheck
	}
}

func (c *cluster) ip(args ...string) {
	c.t.Helper()

	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		c.t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// addHost creates a namespace with one veth into the bridge and an address.
func (c *cluster) addHost() *host {
	c.t.Helper()

	i := len(c.nodes)
	h := &host{
		c:     c,
		index: i,
		ns:    fmt.Sprintf("%s-n%d", c.id, i),
		addr:  netip.MustParseAddr(fmt.Sprintf("%s.%d", netPrefix, 10+i)),
		dir:   filepath.Join(c.dir, fmt.Sprintf("node%d", i)),
	}

	if err := os.MkdirAll(h.dir, 0o700); err != nil {
		c.t.Fatal(err)
	}

	c.nodes = append(c.nodes, h)
	peer := fmt.Sprintf("b%d", i)

	c.ip("netns", "add", h.ns)
	// IPv4 only: no IPv6 neighbour discovery chatter on the links.
	c.ip("netns", "exec", h.ns, "sh", "-c",
		"echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6")
	c.ip("-n", h.ns, "link", "set", "lo", "up")
	c.ip("-n", h.ns, "link", "add", "eth0", "type", "veth", "peer", "name", peer, "netns", c.bridge)
	c.ip("-n", c.bridge, "link", "set", peer, "master", "br0")
	c.ip("-n", c.bridge, "link", "set", peer, "up")
	c.ip("-n", h.ns, "addr", "add", h.addr.String()+"/24", "dev", "eth0")
	c.ip("-n", h.ns, "link", "set", "eth0", "up")

	return h
}

// setLink takes a host's link on the bridge down (a partition) or up.
func (h *host) setLink(up bool) {
	state := "down"
	if up {
		state = "up"
	}

	h.c.ip("-n", h.c.bridge, "link", "set", fmt.Sprintf("b%d", h.index), state)
}

// fakeOptions describe the fake Talos node of a host.
type fakeOptions struct {
	machineType string
	bootTime    int64
	// pkiDir holds the CA the fake's certificate comes from; empty means
	// the cluster's.
	pkiDir string
}

// startFake starts the fake Talos node in the host's namespace and waits
// until it listens.
func (h *host) startFake(o fakeOptions) {
	t := h.c.t
	t.Helper()

	bin, err := fakeBinary()
	if err != nil {
		t.Fatal(err)
	}

	if o.pkiDir == "" {
		o.pkiDir = h.c.dir
	}

	if o.machineType == "" {
		o.machineType = "controlplane"
	}

	log, err := os.Create(filepath.Join(h.dir, "talosfake.log"))
	if err != nil {
		t.Fatal(err)
	}

	h.fake = exec.Command("ip", "netns", "exec", h.ns, bin,
		"--pki-dir", o.pkiDir, "--address", h.addr.String(), "--machine-type", o.machineType,
		"--boot-time", strconv.FormatInt(o.bootTime, 10), "--state-dir", h.dir)
	h.fake.Stdout, h.fake.Stderr = log, log
	h.fake.SysProcAttr = dieWithTest()

	if err := h.fake.Start(); err != nil {
		t.Fatal(err)
	}

	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(readFile(filepath.Join(h.dir, "talosfake.log")), "fake Talos node serving") {
		if time.Now().After(deadline) {
			t.Fatalf("talosfake on %s did not start:\n%s", h.addr, readFile(filepath.Join(h.dir, "talosfake.log")))
		}

		time.Sleep(20 * time.Millisecond)
	}
}

// agentEnv is the environment of the agent in the stories: short intervals.
func (h *host) agentEnv(expected int, extra ...string) []string {
	return append([]string{
		"PATH=" + os.Getenv("PATH"),
		"SOVRA_LOG_LEVEL=info",
		"SOVRA_TALOSCONFIG=" + filepath.Join(h.c.dir, talosfake.TalosconfigFile),
		"KOMMODITY_AUTOBOOTSTRAP_NETWORK_CIDR=" + netCIDR,
		"SOVRA_BOOTSTRAP_EXPECTED_CONTROL_PLANES=" + strconv.Itoa(expected),
		"SOVRA_BOOTSTRAP_SCAN_INTERVAL=1s",
		"SOVRA_BOOTSTRAP_POLL_INTERVAL=500ms",
		"SOVRA_BOOTSTRAP_CONNECT_TIMEOUT=300ms",
		"SOVRA_STATE_DIR=" + h.stateDir(),
	}, extra...)
}

// startAgent starts the real agent binary in the host's namespace.
func (h *host) startAgent(expected int, extra ...string) {
	h.c.t.Helper()
	h.startAgentEnv(h.agentEnv(expected, extra...))
}

// startAgentEnv starts the real agent binary in the host's namespace with
// exactly env.
func (h *host) startAgentEnv(env []string) {
	h.c.t.Helper()
	h.startAgentArgv(env, testutil.Bin(h.c.t, "sovra-agent"), "run")
}

// startAgentArgv starts argv, which runs the agent, in the host's namespace
// with exactly env.
func (h *host) startAgentArgv(env []string, argv ...string) {
	t := h.c.t
	t.Helper()

	log, err := os.Create(h.agentLog())
	if err != nil {
		t.Fatal(err)
	}

	h.agent = exec.Command("ip", append([]string{"netns", "exec", h.ns}, argv...)...)
	h.agent.Env = env
	h.agent.Stdout, h.agent.Stderr = log, log
	h.agent.SysProcAttr = dieWithTest()
	h.agentDone = make(chan struct{})

	if err := h.agent.Start(); err != nil {
		t.Fatal(err)
	}

	go func() {
		h.agentErr = h.agent.Wait()
		close(h.agentDone)
	}()
}

func (h *host) agentLog() string { return filepath.Join(h.dir, "agent.log") }

// stateDir is the agent's state directory (its status document).
func (h *host) stateDir() string { return filepath.Join(h.dir, "state") }

// logHas reports whether the agent logged msg.
func (h *host) logHas(msg string) bool {
	return strings.Contains(readFile(h.agentLog()), `"msg":"`+msg+`"`)
}

// final reports whether the agent reached the end of the bootstrap path.
func (h *host) final() bool {
	return h.logHas(msgBootstrapped) || h.logHas(msgJoined) || h.logHas(msgEtcdExists) || h.logHas(msgWorker)
}

// acceptedBootstraps counts the Bootstrap calls the host's fake accepted.
func (h *host) acceptedBootstraps() int {
	n := 0

	sc := bufio.NewScanner(bytes.NewReader([]byte(readFile(filepath.Join(h.dir, talosfake.BootstrapLogFile)))))
	for sc.Scan() {
		if strings.Contains(sc.Text(), " accepted ") {
			n++
		}
	}

	return n
}

// bootstraps counts the accepted Bootstrap calls cluster-wide.
func (c *cluster) bootstraps() int {
	n := 0
	for _, h := range c.nodes {
		n += h.acceptedBootstraps()
	}

	return n
}

// waitFinal waits until every given host's agent ended its bootstrap path.
func (c *cluster) waitFinal(hosts ...*host) {
	c.t.Helper()

	deadline := time.Now().Add(waitFinal)

	for {
		done := true
		for _, h := range hosts {
			done = done && h.final()
		}

		if done {
			return
		}

		if time.Now().After(deadline) {
			c.dumpLogs()
			c.t.Fatal("agents did not finish the bootstrap path in time")
		}

		time.Sleep(100 * time.Millisecond)
	}
}

func (c *cluster) dumpLogs() {
	for _, h := range c.nodes {
		c.t.Logf("--- %s (%s) agent log:\n%s", h.ns, h.addr, tail(readFile(h.agentLog()), 40))
	}
}

// close stops every process and removes every namespace.
func (c *cluster) close() {
	for _, h := range c.nodes {
		h.stopAgent()
		stop(h.fake)
	}

	if c.t.Failed() {
		c.dumpLogs()
	}

	for _, h := range c.nodes {
		exec.Command("ip", "netns", "del", h.ns).Run() //nolint:errcheck
	}

	exec.Command("ip", "netns", "del", c.bridge).Run() //nolint:errcheck
}

// dieWithTest makes a child process get SIGKILL if the test binary dies
// before its cleanup runs, so no fake node or agent outlives a test.
func dieWithTest() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}

// stopAgent ends the host's agent, if it runs, and waits for it.
func (h *host) stopAgent() {
	if h.agent == nil || h.agent.Process == nil {
		return
	}

	h.agent.Process.Signal(syscall.SIGTERM) //nolint:errcheck

	select {
	case <-h.agentDone:
	case <-time.After(processStopMax):
		h.agent.Process.Kill() //nolint:errcheck
		<-h.agentDone
	}
}

// stop ends a process the test started, by its pid, and waits for it.
func stop(cmd *exec.Cmd) {
	if cmd == nil || cmd.Process == nil {
		return
	}

	cmd.Process.Signal(syscall.SIGTERM) //nolint:errcheck

	done := make(chan struct{})

	go func() {
		cmd.Wait() //nolint:errcheck
		close(done)
	}()

	select {
	case <-done:
	case <-time.After(processStopMax):
		cmd.Process.Kill() //nolint:errcheck
	}
}

func readFile(p string) string {
	b, _ := os.ReadFile(p)

	return string(b)
}

func tail(s string, lines int) string {
	parts := strings.Split(s, "\n")
	if len(parts) > lines {
		parts = parts[len(parts)-lines:]
	}

	return strings.Join(parts, "\n")
}

// runIn runs a command in a namespace and returns its output.
func runIn(ctx context.Context, ns string, env []string, name string, args ...string) ([]byte, []byte, error) {
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns, name}, args...)...)
	cmd.Env = env

	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()

	return stdout.Bytes(), stderr.Bytes(), err
}
