package machines

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	kmsapi "github.com/siderolabs/kms-client/api/kms"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"k8s.io/apimachinery/pkg/types"

	"github.com/sovra-dev/sovra/daemon/nodeauth"
	"github.com/sovra-dev/sovra/internal/hostapi"
	"github.com/sovra-dev/sovra/internal/testutil"
	"github.com/sovra-dev/sovra/tests/sovradtest"
	"github.com/sovra-dev/sovra/tests/swtpmlab"
	"github.com/sovra-dev/sovra/tests/talosfake/bootsimtest"
)

const (
	// nsPrefix names the story's network namespaces; the test binary's pid
	// follows, so stale ones of a dead run are recognised and removed.
	nsPrefix = "sovra-mc-"
	// legHost is the test's own address on the bridge (sovrad, swtpm);
	// machines are .10 and up, the attacker .99.
	legHost      = 1
	firstMachine = 10
	attackerHost = 99
	// callTimeout bounds one call to sovrad from the test.
	callTimeout = 15 * time.Second
	// credentialTTL is the lifetime of the credentials the test signs.
	credentialTTL = time.Hour
	pollInterval  = 250 * time.Millisecond
)

var nsCounter atomic.Int64

func TestMain(m *testing.M) {
	code := m.Run()

	bootsimtest.Cleanup()
	os.Exit(code)
}

// network is a bridge in its own namespace, a leg from the test's network
// namespace onto it, and a namespace per machine.
type network struct {
	t      testing.TB
	id     string
	bridge string
	// prefix is the /24's first three octets, unique per test binary so
	// that stories of other packages running at once do not collide.
	prefix string
	legs   int
	// leg is the test's own interface on the bridge.
	leg string
}

func newNetwork(t testing.TB) *network {
	t.Helper()
	testutil.RequireRoot(t)
	testutil.Require(t, "ip")
	sweepStale(t)

	n := &network{
		t:      t,
		id:     fmt.Sprintf("%s%d-%d", nsPrefix, os.Getpid(), nsCounter.Add(1)),
		prefix: fmt.Sprintf("10.69.%d", 10+os.Getpid()%200),
	}
	n.bridge = n.id + "-br"

	t.Cleanup(func() { exec.Command("ip", "netns", "del", n.bridge).Run() }) //nolint:errcheck

	n.ip("netns", "add", n.bridge)
	n.ip("-n", n.bridge, "link", "add", "br0", "type", "bridge")
	n.ip("-n", n.bridge, "link", "set", "br0", "up")

	// The leg: the test's own namespace on the bridge.
	leg := fmt.Sprintf("svm%d-%d", os.Getpid()%1_000_000, nsCounter.Add(1))
	n.ip("link", "add", leg, "type", "veth", "peer", "name", "leg0", "netns", n.bridge)
	t.Cleanup(func() { exec.Command("ip", "link", "del", leg).Run() }) //nolint:errcheck
	n.ip("-n", n.bridge, "link", "set", "leg0", "master", "br0")
	n.ip("-n", n.bridge, "link", "set", "leg0", "up")
	n.ip("addr", "add", n.addr(legHost).String()+"/24", "dev", leg)
	n.ip("link", "set", leg, "up")
	n.leg = leg

	return n
}

// addr is host number i of the network.
func (n *network) addr(i int) netip.Addr {
	return netip.MustParseAddr(n.prefix + "." + strconv.Itoa(i))
}

// addNamespace makes a namespace with address number i on the bridge.
func (n *network) addNamespace(i int) string {
	n.t.Helper()

	ns := fmt.Sprintf("%s-h%d", n.id, i)
	peer := fmt.Sprintf("p%d", i)

	n.t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() }) //nolint:errcheck
	n.ip("netns", "add", ns)
	n.ip("netns", "exec", ns, "sh", "-c",
		"echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6")
	n.ip("-n", ns, "link", "set", "lo", "up")
	n.ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", peer, "netns", n.bridge)
	n.ip("-n", n.bridge, "link", "set", peer, "master", "br0")
	n.ip("-n", n.bridge, "link", "set", peer, "up")
	n.ip("-n", ns, "addr", "add", n.addr(i).String()+"/24", "dev", "eth0")
	n.ip("-n", ns, "link", "set", "eth0", "up")

	return ns
}

func (n *network) ip(args ...string) {
	n.t.Helper()

	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		n.t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// sweepStale deletes namespaces of test binaries that died before their
// cleanup ran.
func sweepStale(t testing.TB) {
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		return
	}

	var stale []string

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

		exec.Command("ip", "netns", "del", name).Run() //nolint:errcheck
		stale = append(stale, name)
	}

	// One line: a benchmark's log keeps only its first lines.
	if len(stale) > 0 {
		t.Logf("removed stale namespaces %s", strings.Join(stale, " "))
	}
}

// dialIn returns a dialer whose connections start in network namespace ns:
// a socket stays in the namespace it was made in, so the connection comes
// from that namespace's address (as the machine's own calls do). The
// thread goes back to its namespace afterwards: a locked thread that
// exits would take with it the processes it started (their parent-death
// signal is the thread's).
func dialIn(ns string) func(ctx context.Context, addr string) (net.Conn, error) {
	return func(ctx context.Context, addr string) (net.Conn, error) {
		runtime.LockOSThread()

		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()

			return nil, err
		}
		defer orig.Close()

		target, err := os.Open(filepath.Join("/var/run/netns", ns))
		if err != nil {
			runtime.UnlockOSThread()

			return nil, err
		}
		defer target.Close()

		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()

			return nil, fmt.Errorf("entering namespace %s: %w", ns, err)
		}

		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)

		if restore := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); restore != nil {
			panic(fmt.Sprintf("leaving namespace %s: %v", ns, restore)) // the thread must not be reused
		}

		runtime.UnlockOSThread()

		if err != nil {
			return nil, fmt.Errorf("making a socket in %s: %w", ns, err)
		}

		return connect(ctx, fd, addr)
	}
}

// connect connects the socket fd to addr (an IPv4 host:port).
func connect(ctx context.Context, fd int, addr string) (net.Conn, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		unix.Close(fd) //nolint:errcheck

		return nil, err
	}

	if deadline, ok := ctx.Deadline(); ok {
		tv := unix.NsecToTimeval(time.Until(deadline).Nanoseconds())
		_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv) //nolint:errcheck
	}

	if err := unix.Connect(fd, &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}); err != nil {
		unix.Close(fd) //nolint:errcheck

		return nil, fmt.Errorf("connecting to %s: %w", addr, err)
	}

	f := os.NewFile(uintptr(fd), "socket")
	defer f.Close()

	return net.FileConn(f)
}

// daemon is the built sovrad with its node API, KMS and boot server on the
// leg.
type daemon struct {
	*sovradtest.Daemon
	// NodeAddr is the node API (and KMS), BootAddr the boot server.
	NodeAddr, BootAddr string
	// NodeCA is node-ca.crt's path and PEM; caKey signs test credentials.
	NodeCAFile string
	NodeCA     []byte
	roots      *x509.CertPool
	caCert     *x509.Certificate
	caKey      *ecdsa.PrivateKey
}

// startDaemon starts the built sovrad with its node API and boot server on
// the leg, trusting the EK certificates of lab's TPMs (none when lab is nil).
func startDaemon(t testing.TB, n *network, lab *swtpmlab.Lab, extra ...string) *daemon {
	t.Helper()

	leg := n.addr(legHost).String()
	nodeAddr := net.JoinHostPort(leg, strconv.Itoa(testutil.FreePort(t)))
	bootAddr := net.JoinHostPort(leg, strconv.Itoa(testutil.FreePort(t)))
	keyFile := filepath.Join(t.TempDir(), "secrets", "master.key")

	args := []string{
		"--master-key-file", keyFile,
		"--node-listen", nodeAddr, "--node-endpoint", nodeAddr, "--tls-san", leg,
		"--boot-listen", bootAddr,
	}
	if lab != nil { // nil: no TPM enrolls (the pool benchmark's records are written, not enrolled)
		args = append(args, "--ek-roots", lab.Roots(), "--ek-intermediates", lab.Intermediates())
	}

	args = append(args, extra...)

	d := &daemon{Daemon: sovradtest.Start(t, filepath.Join(t.TempDir(), "data"), args...), NodeAddr: nodeAddr, BootAddr: bootAddr}
	d.NodeCAFile = filepath.Join(d.DataDir, "node-ca.crt")

	var err error
	if d.NodeCA, err = os.ReadFile(d.NodeCAFile); err != nil {
		t.Fatal(err)
	}

	d.roots = x509.NewCertPool()
	d.roots.AppendCertsFromPEM(d.NodeCA)
	d.caCert, d.caKey = readCA(t, d.NodeCA, filepath.Join(d.DataDir, "node-ca.key"))

	return d
}

func readCA(t testing.TB, certPEM []byte, keyFile string) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()

	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		t.Fatal(err)
	}

	cb, _ := pem.Decode(certPEM)
	kb, _ := pem.Decode(keyPEM)

	if cb == nil || kb == nil {
		t.Fatal("node CA files are not PEM")
	}

	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		t.Fatal(err)
	}

	var key *ecdsa.PrivateKey
	if k, err := x509.ParsePKCS8PrivateKey(kb.Bytes); err == nil {
		key, _ = k.(*ecdsa.PrivateKey)
	} else if key, err = x509.ParseECPrivateKey(kb.Bytes); err != nil {
		t.Fatal(err)
	}

	if key == nil {
		t.Fatal("node CA key is not ECDSA")
	}

	return cert, key
}

// bootArgument runs `sovrad hosts boot-config` as an operator does and
// returns the talos.config= value it prints.
func (d *daemon) bootArgument(t testing.TB) string {
	t.Helper()

	out, err := exec.Command(testutil.Bin(t, "sovrad"), "hosts", "boot-config",
		"--server", "https://"+d.BootAddr, "--data-dir", d.DataDir).CombinedOutput()
	if err != nil {
		t.Fatalf("sovrad hosts boot-config: %v\n%s", err, out)
	}

	for _, f := range strings.Fields(string(out)) {
		if v, ok := strings.CutPrefix(strings.Trim(f, "'"), "talos.config="); ok {
			return v
		}
	}

	t.Fatalf("sovrad hosts boot-config printed no talos.config= argument:\n%s", out)

	return ""
}

// credential signs a node credential as the attestation service does after
// a passing attestation: the stand-in for a stolen or replayed one.
func (d *daemon) credential(t testing.TB, node string, uid types.UID, boot string) tls.Certificate {
	t.Helper()

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}

	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62)) //nolint:errcheck
	tmpl := nodeauth.Template(nodeauth.Credential{Node: node, UID: uid, Boot: boot}, serial, time.Now(), credentialTTL)

	der, err := x509.CreateCertificate(rand.Reader, tmpl, d.caCert, &key.PublicKey, d.caKey)
	if err != nil {
		t.Fatal(err)
	}

	return tls.Certificate{Certificate: [][]byte{der, d.caCert.Raw}, PrivateKey: key}
}

// sync calls HostService.Sync with cert from namespace ns (empty: the
// leg), as the agent of a machine there would.
func (d *daemon) sync(t testing.TB, ns string, cert tls.Certificate, req *hostapi.SyncRequest) (*hostapi.SyncResponse, error) {
	t.Helper()

	host, _, _ := net.SplitHostPort(d.NodeAddr)
	opts := []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		RootCAs: d.roots, ServerName: host, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12,
	}))}

	if ns != "" {
		opts = append(opts, grpc.WithContextDialer(dialIn(ns)))
	}

	conn, err := grpc.NewClient(d.NodeAddr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()

	return hostapi.NewHostServiceClient(conn).Sync(ctx, req)
}

// kms calls the KMS as Talos does (a fresh connection, the node CA as
// root, no client certificate) from namespace ns.
func (d *daemon) kms(t testing.TB, ns string, seal bool, uuid string, data []byte) ([]byte, error) {
	t.Helper()

	host, _, _ := net.SplitHostPort(d.NodeAddr)

	conn, err := grpc.NewClient(d.NodeAddr,
		grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: d.roots, ServerName: host, MinVersion: tls.VersionTLS12})),
		grpc.WithContextDialer(dialIn(ns)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()

	c := kmsapi.NewKMSServiceClient(conn)

	var resp *kmsapi.Response
	if seal {
		resp, err = c.Seal(ctx, &kmsapi.Request{NodeUuid: uuid, Data: data})
	} else {
		resp, err = c.Unseal(ctx, &kmsapi.Request{NodeUuid: uuid, Data: data})
	}

	if err != nil {
		return nil, err
	}

	return resp.GetData(), nil
}

// fetchBootConfig fetches the enrollment configuration for uuid from
// namespace ns, as a machine there would.
func (d *daemon) fetchBootConfig(t testing.TB, ns, uuid string) (int, []byte) {
	t.Helper()

	host, _, _ := net.SplitHostPort(d.BootAddr)
	dial := dialIn(ns)
	client := &http.Client{Timeout: callTimeout, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: d.roots, ServerName: host, MinVersion: tls.VersionTLS12},
		DialContext:     func(ctx context.Context, _, addr string) (net.Conn, error) { return dial(ctx, addr) },
	}}

	resp, err := client.Get("https://" + d.BootAddr + "/boot/config?uuid=" + uuid)
	if err != nil {
		t.Fatalf("fetching the enrollment configuration: %v", err)
	}
	defer resp.Body.Close()

	var body strings.Builder
	buf := make([]byte, 32<<10)

	for {
		n, err := resp.Body.Read(buf)
		body.Write(buf[:n])

		if err != nil {
			break
		}
	}

	return resp.StatusCode, []byte(body.String())
}

// get reads one object as JSON with kubectl into out.
func (d *daemon) get(t testing.TB, out any, args ...string) {
	t.Helper()

	if err := json.Unmarshal([]byte(d.Kubectl(append([]string{"get", "-o", "json"}, args...)...)), out); err != nil {
		t.Fatalf("decoding kubectl get %v: %v", args, err)
	}
}

// jsonpath reads fields with kubectl; empty on error.
func (d *daemon) jsonpath(args ...string) string {
	out, err := d.TryKubectl(args...)
	if err != nil {
		return ""
	}

	return strings.TrimSpace(out)
}

// waitFor polls cond until it holds, failing the test after timeout with
// the last state cond described.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()

	deadline := time.Now().Add(timeout)

	var state string

	for time.Now().Before(deadline) {
		var ok bool
		if ok, state = cond(); ok {
			return
		}

		time.Sleep(pollInterval)
	}

	t.Fatalf("timed out after %s waiting for %s; last state: %s", timeout, what, state)
}
