package host_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/sovra-dev/sovra/agent/controllers/ctest"
	hostctrl "github.com/sovra-dev/sovra/agent/controllers/host"
	"github.com/sovra-dev/sovra/agent/daemonconn"
	"github.com/sovra-dev/sovra/agent/resources/attestation"
	"github.com/sovra-dev/sovra/agent/resources/host"
	"github.com/sovra-dev/sovra/agent/runtime/clock"
	"github.com/sovra-dev/sovra/internal/hostapi"
)

// secretConfig stands for a machine configuration: it must reach Talos and
// nothing else.
const secretConfig = "version: v1alpha1\nmachine:\n  token: s3cr3t-bootstrap-token-0123456789\n"

// hostService is a HostService on a loopback listener behind TLS that
// requires a client certificate, as the node API does. It answers with the
// next scripted reply (the last one repeats) and records every request.
type hostService struct {
	hostapi.UnimplementedHostServiceServer

	mu       sync.Mutex // guards the fields below
	replies  []reply
	requests []*hostapi.SyncRequest
}

// reply is one scripted answer: a response or an error.
type reply struct {
	resp *hostapi.SyncResponse
	err  error
}

func (s *hostService) Sync(ctx context.Context, req *hostapi.SyncRequest) (*hostapi.SyncResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()

	s.requests = append(s.requests, req)
	r := s.replies[0]
	if len(s.replies) > 1 {
		s.replies = s.replies[1:]
	}

	return r.resp, r.err
}

func (s *hostService) script(rs ...reply) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.replies = rs
}

func (s *hostService) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.requests)
}

func (s *hostService) last() *hostapi.SyncRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.requests[len(s.requests)-1]
}

// fakeTalos records what the controller asks of the local Talos API.
type fakeTalos struct {
	mu           sync.Mutex // guards the fields below
	applied      [][]byte
	resets       int
	applyFailure int // the next applies that fail
}

func (f *fakeTalos) Hardware(context.Context) (*hostapi.Hardware, error) {
	return &hostapi.Hardware{Architecture: "amd64", Cpus: 4, MemoryBytes: 8 << 30,
		Disks: []*hostapi.Disk{{Name: "vda", SizeBytes: 100 << 30, Model: "QEMU HARDDISK"}}}, nil
}

func (f *fakeTalos) ApplyConfiguration(_ context.Context, config []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.applyFailure > 0 {
		f.applyFailure--
		return status.Error(codes.Unavailable, "machined is busy")
	}
	f.applied = append(f.applied, bytes.Clone(config))
	return nil
}

func (f *fakeTalos) Reset(context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.resets++
	return nil
}

func (f *fakeTalos) counts() (int, int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.applied), f.resets
}

// credential is the node credential the agent presents; it exists once
// issue is called, as after the first passing attestation.
type credential struct {
	mu   sync.Mutex // guards cert
	cert *tls.Certificate
}

func (c *credential) get(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cert == nil {
		return nil, errors.New("no credential")
	}
	return c.cert, nil
}

func (c *credential) issue(cert tls.Certificate) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cert = &cert
}

// selfSigned returns a certificate for 127.0.0.1 and its pool.
func selfSigned(t *testing.T, name string) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, IsCA: true, BasicConstraintsValid: true,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, pool
}

// harness is one controller against a real HostService over TLS.
type harness struct {
	svc   *hostService
	talos *fakeTalos
	cred  *credential
	node  tls.Certificate
	conn  *daemonconn.Conn
	clk   *clock.Fake
	logs  *syncBuffer
}

type syncBuffer struct {
	mu sync.Mutex // guards b
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	serverCert, roots := selfSigned(t, "sovrad")
	nodeCert, _ := selfSigned(t, "node")
	svc := &hostService{}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{serverCert}, ClientAuth: tls.RequireAnyClientCert, MinVersion: tls.VersionTLS13,
	})))
	hostapi.RegisterHostServiceServer(srv, svc)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis) //nolint:errcheck
	t.Cleanup(srv.Stop)

	cred := &credential{}
	conn, err := daemonconn.New(daemonconn.Config{Endpoint: lis.Addr().String(), Roots: roots, Credential: cred.get, CallTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() }) //nolint:errcheck

	return &harness{svc: svc, talos: &fakeTalos{}, cred: cred, node: nodeCert, conn: conn,
		clk: clock.NewFake(time.Date(2026, 11, 26, 5, 0, 0, 0, time.UTC)), logs: &syncBuffer{}}
}

func (h *harness) start(t *testing.T, generation int64, stateDir, bootIDPath string) *ctest.Started {
	t.Helper()
	logger := zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), zapcore.AddSync(h.logs), zap.DebugLevel))
	st := ctest.StartLogged(t, logger, &hostctrl.HostController{
		Conn: h.conn, Talos: h.talos, Generation: generation, Clock: h.clk,
		StateDir: stateDir, BootIDPath: bootIDPath, MinSync: 5 * time.Second, MaxSync: time.Minute, BackoffBase: 2 * time.Second,
	})
	// The runtime's first event has been handled: the next one is ours.
	ctest.WaitFor(t, st, statusMD, func(*host.Status) bool { return true })
	return &ctest.Started{State: st}
}

// attest stands for a passing attestation of this boot: the node
// credential exists and the attestation status says so.
func (h *harness) attest(t *testing.T, s *ctest.Started) {
	t.Helper()
	h.cred.issue(h.node)
	a := attestation.NewStatus()
	a.TypedSpec().Phase, a.TypedSpec().LastAttempt = attestation.PhaseAttested, h.clk.Now().Format(time.RFC3339)
	ctest.Put(t, s.State, a)
}

// advance moves the fake clock by d once the controller waits on it.
func (h *harness) advance(t *testing.T, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for h.clk.Waiters() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the controller is not waiting on the clock")
		}
		time.Sleep(5 * time.Millisecond)
	}
	h.clk.Advance(d)
}

func (h *harness) waitSyncs(t *testing.T, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for h.svc.count() < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d syncs, want %d", h.svc.count(), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func statusIs(phase host.Phase) func(*host.Status) bool {
	return func(s *host.Status) bool { return s.TypedSpec().Phase == phase }
}

var statusMD = host.NewStatus().Metadata()

func TestNoSyncBeforeAttestationThenWaitResyncs(t *testing.T) {
	h := newHarness(t)
	h.svc.script(reply{resp: &hostapi.SyncResponse{Action: hostapi.Action_ACTION_WAIT, Message: "waiting to be accepted", RetrySeconds: 5}})
	s := h.start(t, 0, "", "")

	// Enrolling: no credential, no sync.
	a := attestation.NewStatus()
	a.TypedSpec().Phase = attestation.PhaseEnrolling
	ctest.Put(t, s.State, a)
	ctest.WaitFor(t, s.State, statusMD, statusIs(host.PhaseWaitingAttestation))
	time.Sleep(50 * time.Millisecond)
	if n := h.svc.count(); n != 0 {
		t.Fatalf("%d syncs before attestation", n)
	}

	h.attest(t, s)
	got := ctest.WaitFor(t, s.State, statusMD, statusIs(host.PhaseWaiting))
	if sp := got.TypedSpec(); sp.Message != "waiting to be accepted" || sp.LastAction != "wait" || sp.Mode != host.ModeEnrollment || sp.CPUs != 4 || sp.Disks != 1 {
		t.Fatalf("status after WAIT: %+v", sp)
	}
	req := h.svc.last()
	if req.GetMode() != hostapi.Mode_MODE_ENROLLMENT || req.GetHardware().GetCpus() != 4 || req.GetHardware().GetDisks()[0].GetName() != "vda" {
		t.Fatalf("sync request: %v", req)
	}

	// WAIT: the next sync comes after retry_seconds, not before.
	n := h.svc.count()
	h.clk.Advance(4 * time.Second)
	time.Sleep(50 * time.Millisecond)
	if h.svc.count() != n {
		t.Fatal("synced before retry_seconds")
	}
	h.advance(t, time.Second)
	h.waitSyncs(t, n+1)
}

func TestApplyOnceRetriedAndNeverLogged(t *testing.T) {
	h := newHarness(t)
	h.talos.applyFailure = 1
	apply := &hostapi.SyncResponse{Action: hostapi.Action_ACTION_APPLY, Config: []byte(secretConfig), Generation: 2, Message: "apply the configuration of default/w-0", RetrySeconds: 5}
	h.svc.script(reply{err: status.Error(codes.Unavailable, "the daemon could not complete the host sync; retry later")}, reply{resp: apply})
	dir, bootID := t.TempDir(), filepath.Join(t.TempDir(), "boot_id")
	if err := os.WriteFile(bootID, []byte("boot-1\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	t.Run("first run", func(t *testing.T) {
		s := h.start(t, 0, dir, bootID)
		h.attest(t, s)

		// The sync fails, then the apply fails: both are retried with backoff.
		failed := ctest.WaitFor(t, s.State, statusMD, statusIs(host.PhaseFailed))
		if !strings.Contains(failed.TypedSpec().Error, "syncing with the daemon") {
			t.Fatalf("status after a failed sync: %+v", failed.TypedSpec())
		}
		h.advance(t, 2*time.Second)
		ctest.WaitFor(t, s.State, statusMD, func(st *host.Status) bool {
			return st.TypedSpec().Phase == host.PhaseFailed && strings.Contains(st.TypedSpec().Error, "applying configuration generation 2")
		})
		if applied, _ := h.talos.counts(); applied != 0 {
			t.Fatal("a failed apply was counted")
		}
		h.advance(t, 4*time.Second) // the second failure in a row waits twice as long
		got := ctest.WaitFor(t, s.State, statusMD, statusIs(host.PhaseApplied))
		if sp := got.TypedSpec(); sp.AppliedGeneration != 2 || sp.Error != "" {
			t.Fatalf("status after the apply: %+v", sp)
		}

		// The daemon keeps answering APPLY until the machine runs it: the
		// agent does not apply again in this boot.
		n := h.svc.count()
		h.advance(t, 5*time.Second)
		h.waitSyncs(t, n+1)
		h.advance(t, 5*time.Second)
		h.waitSyncs(t, n+2)
		applied, _ := h.talos.counts()
		if applied != 1 || string(h.talos.applied[0]) != secretConfig {
			t.Fatalf("%d applies, want exactly 1 of the released configuration", applied)
		}
		final := ctest.WaitFor(t, s.State, statusMD, statusIs(host.PhaseApplied))
		for _, where := range []string{h.logs.String(), final.TypedSpec().Message, final.TypedSpec().Error} {
			if strings.Contains(where, "s3cr3t") || strings.Contains(where, "machine:") {
				t.Fatalf("the configuration leaked:\n%s", where)
			}
		}
		if !strings.Contains(h.logs.String(), "machine configuration applied") {
			t.Fatalf("no log line for the apply:\n%s", h.logs.String())
		}
	})

	t.Run("restart in the same boot", func(t *testing.T) {
		s := h.start(t, 0, dir, bootID)
		h.attest(t, s)
		n := h.svc.count()
		h.waitSyncs(t, n+1)
		ctest.WaitFor(t, s.State, statusMD, statusIs(host.PhaseApplied))
		if applied, _ := h.talos.counts(); applied != 1 {
			t.Fatalf("%d applies after a restart in the same boot, want still 1", applied)
		}
	})

	t.Run("a new boot", func(t *testing.T) {
		if err := os.WriteFile(bootID, []byte("boot-2\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		s := h.start(t, 0, dir, bootID)
		h.attest(t, s)
		ctest.WaitFor(t, s.State, statusMD, statusIs(host.PhaseApplied))
		deadline := time.Now().Add(5 * time.Second)
		for applied, _ := h.talos.counts(); applied != 2; applied, _ = h.talos.counts() {
			if time.Now().After(deadline) {
				t.Fatalf("%d applies in a new boot, want 2", applied)
			}
			time.Sleep(5 * time.Millisecond)
		}
	})

	if b, err := os.ReadFile(filepath.Join(dir, hostctrl.MarkerFile)); err != nil || strings.Contains(string(b), "s3cr3t") {
		t.Fatalf("record: %s, %v", b, err)
	}
}

func TestConfiguredAndReset(t *testing.T) {
	h := newHarness(t)
	h.svc.script(reply{resp: &hostapi.SyncResponse{Action: hostapi.Action_ACTION_NONE, Message: "running generation 3", RetrySeconds: 60}})
	s := h.start(t, 3, t.TempDir(), filepath.Join(t.TempDir(), "absent"))
	h.attest(t, s)

	got := ctest.WaitFor(t, s.State, statusMD, statusIs(host.PhaseRunning))
	if sp := got.TypedSpec(); sp.Mode != host.ModeConfigured || sp.Generation != 3 {
		t.Fatalf("status: %+v", sp)
	}
	if req := h.svc.last(); req.GetMode() != hostapi.Mode_MODE_CONFIGURED || req.GetGeneration() != 3 {
		t.Fatalf("sync request: %v", req)
	}

	// NONE with retry_seconds 60: the next sync is a minute later; the
	// machine was released meanwhile.
	h.svc.script(reply{resp: &hostapi.SyncResponse{Action: hostapi.Action_ACTION_RESET, Message: "released: wipe", RetrySeconds: 5}})
	h.advance(t, time.Minute)
	ctest.WaitFor(t, s.State, statusMD, statusIs(host.PhaseReset))
	n := h.svc.count()
	h.advance(t, 5*time.Second)
	h.waitSyncs(t, n+1)
	if _, resets := h.talos.counts(); resets != 1 {
		t.Fatalf("%d resets, want exactly 1", resets)
	}
}
