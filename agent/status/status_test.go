package status

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

var t0 = time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)

// fakeClock is a clock that tests advance.
type fakeClock struct {
	mu  sync.Mutex // guards now
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()

	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()

	c.now = c.now.Add(d)
}

// runAgent plays what a control-plane agent records on its way to Ready.
func runAgent(t *testing.T, dir string, clock *fakeClock) {
	t.Helper()

	r := NewRecorder(dir, "v0.1.0", "cp-1", clock.Now)

	steps := []func() error{
		func() error { return r.SetPhase(PhaseEnrolling, "sending EK and AK to the daemon") },
		func() error {
			return r.Update(func(d *Document) {
				d.Phase = PhaseAttesting
				d.Attestation.Enrolled = true
				d.Attestation.Daemon = "10.0.0.5:7443"
			})
		},
		func() error { return r.RecordError(errors.New("quoting PCRs: TPM busy")) },
		func() error {
			return r.Update(func(d *Document) {
				d.Attestation.State = AttestationPassed
				d.Attestation.PCRs = []int{0, 1, 2, 3, 4, 5, 6, 7, 11}
				d.Attestation.LastAttempt = clock.Now()
				d.Attestation.LastSuccess = clock.Now()
				d.Attestation.CertificateExpiry = clock.Now().Add(time.Hour)
				d.Phase = PhaseElecting
			})
		},
		func() error {
			return r.Update(func(d *Document) {
				d.Election = Election{
					Role:         RoleLeader,
					Leader:       "10.0.0.11",
					Candidates:   []string{"10.0.0.11", "10.0.0.12", "10.0.0.13"},
					Expected:     3,
					Quorum:       2,
					StableRounds: 3,
					Bootstrapped: true,
					DecidedAt:    clock.Now(),
				}
				d.Volumes = []Volume{
					{Name: "data", Device: "/dev/nvme0n1p6", State: VolumeUnlocked, UpdatedAt: clock.Now()},
					{Name: "scratch", State: VolumeWaiting, Message: "waiting for a fresh attestation"},
				}
			})
		},
		func() error { return r.SetPhase(PhaseReady, "attested; re-attesting every 10m") },
	}

	for _, step := range steps {
		clock.Advance(5 * time.Second)

		if err := step(); err != nil {
			t.Fatal(err)
		}
	}
}

func TestCommandPrintsWhatTheAgentRecorded(t *testing.T) {
	dir := t.TempDir()
	clock := &fakeClock{now: t0}

	runAgent(t, dir, clock)

	var stdout, stderr bytes.Buffer

	now := func() time.Time { return clock.Now().Add(time.Minute) }
	if code := command([]string{"--state-dir", dir}, nil, &stdout, &stderr, now); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}

	out := stdout.String()
	t.Logf("sovra-agent status:\n%s", out)

	for _, want := range []string{
		"Node:", "cp-1",
		"Phase:", "Ready (attested; re-attesting every 10m)",
		"Enrolled:", "State:", "Passed", "PCRs:", "0,1,2,3,4,5,6,7,11",
		"Last success:", "2026-11-21T12:00:20Z (1m10s ago)",
		"Role:", "Leader", "Leader:", "10.0.0.11", "3 seen, quorum 2 of 3 expected",
		"Bootstrapped:", "yes",
		"data", "Unlocked on /dev/nvme0n1p6",
		"scratch", "Waiting: waiting for a fresh attestation",
		"Last error", "quoting PCRs: TPM busy", "Attesting",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}
}

func TestCommandReadsStdinAndPrintsJSON(t *testing.T) {
	dir := t.TempDir()
	clock := &fakeClock{now: t0}

	runAgent(t, dir, clock)

	b, err := os.ReadFile(Path(dir))
	if err != nil {
		t.Fatal(err)
	}

	var stdout, stderr bytes.Buffer
	if code := command([]string{"--file", "-", "--json"}, bytes.NewReader(b), &stdout, &stderr, time.Now); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}

	doc, err := Decode(stdout.Bytes())
	if err != nil {
		t.Fatal(err)
	}

	if doc.Phase != PhaseReady || doc.Election.Role != RoleLeader || len(doc.Volumes) != 2 {
		t.Fatalf("round trip lost data: %+v", doc)
	}
}

func TestCommandErrors(t *testing.T) {
	var stdout, stderr bytes.Buffer

	if code := Command([]string{"--state-dir", t.TempDir()}, &stdout, &stderr); code != exitError {
		t.Fatalf("missing document: exit %d, want %d", code, exitError)
	}

	if !strings.Contains(stderr.String(), "has the agent started") {
		t.Errorf("missing document: unhelpful message %q", stderr.String())
	}

	if code := Command([]string{"extra"}, &stdout, &stderr); code != exitUsage {
		t.Fatalf("extra argument: exit %d, want %d", code, exitUsage)
	}

	if code := command([]string{"--file", "-"}, strings.NewReader(`{"schemaVersion": 99}`), &stdout, &stderr, time.Now); code != exitError {
		t.Fatalf("newer schema: exit %d, want %d", code, exitError)
	}
}

func TestWriteIsAtomicAndPrivate(t *testing.T) {
	dir := t.TempDir()

	if err := Write(dir, Document{Phase: PhaseStarting}); err != nil {
		t.Fatal(err)
	}

	// Readers racing with writers always see a whole document.
	var wg sync.WaitGroup

	stop := make(chan struct{})

	wg.Add(1)

	go func() {
		defer wg.Done()

		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}

			phase := PhaseAttesting
			if i%2 == 0 {
				phase = PhaseReady
			}

			if err := Write(dir, Document{Phase: phase, Message: strings.Repeat("x", 4096)}); err != nil {
				t.Error(err)

				return
			}
		}
	}()

	for range 200 {
		if _, err := Read(Path(dir)); err != nil {
			t.Fatalf("torn read: %v", err)
		}
	}

	close(stop)
	wg.Wait()

	st, err := os.Stat(Path(dir))
	if err != nil {
		t.Fatal(err)
	}

	if st.Mode().Perm() != fileMode {
		t.Errorf("mode %v, want %v", st.Mode().Perm(), os.FileMode(fileMode))
	}

	left, err := filepath.Glob(filepath.Join(dir, ".*"))
	if err != nil {
		t.Fatal(err)
	}

	if len(left) != 0 {
		t.Errorf("temporary files left behind: %v", left)
	}
}

// TestWriteCreatesTheStateDirectory: off Talos, nothing creates the state
// directory before the agent's first write.
func TestWriteCreatesTheStateDirectory(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state", "agent")

	if err := Write(dir, Document{Phase: PhaseStarting}); err != nil {
		t.Fatal(err)
	}

	st, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}

	if st.Mode().Perm() != 0o700 {
		t.Errorf("state directory mode %v, want 0700", st.Mode().Perm())
	}

	if _, err := Read(Path(dir)); err != nil {
		t.Fatal(err)
	}
}

func TestPrintZeroDocument(t *testing.T) {
	var out bytes.Buffer
	if err := Print(&out, Document{}, t0); err != nil {
		t.Fatal(err)
	}

	for _, want := range []string{"Phase:", "-", "never", "none (worker, or no election yet)", "no agent-managed volumes"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
}

func TestPrintHost(t *testing.T) {
	var out bytes.Buffer
	doc := Document{Host: &Host{Phase: "applied", Mode: "enrollment", AppliedGeneration: 2, LastAction: "apply",
		Message: "apply the configuration of prod/w-0", LastSync: t0, Architecture: "amd64", CPUs: 8, MemoryBytes: 32 << 30, Disks: 1}}
	if err := Print(&out, doc, t0); err != nil {
		t.Fatal(err)
	}

	for _, want := range []string{"Host\n", "applied", "enrollment, generation 0", "generation 2 in this boot", "amd64, 8 CPUs, 32768 MiB, 1 disks"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}

	if err := Print(&out, Document{}, t0); err != nil || strings.Count(out.String(), "Host\n") != 1 {
		t.Fatalf("a document without host mode prints a Host section:\n%s", out.String())
	}
}
