package attest

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"go.uber.org/zap/zaptest"
	"sigs.k8s.io/yaml"

	agentattest "github.com/sovra-dev/sovra/agent/attest"
	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/internal/testutil"
	"github.com/sovra-dev/sovra/tests/swtpmlab"
)

// captureLabel selects the node under test, as an operator selects a pool.
const captureLabel = "sovra.dev/cluster=capture"

// capture runs the built `sovrad policy capture` with args against d and
// returns stdout, stderr and the exit code.
func capture(t *testing.T, d *daemon, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(testutil.Bin(t, "sovrad"), append([]string{"policy", "capture", "--kubeconfig", d.Kubeconfig()}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		return stdout.String(), stderr.String(), exit.ExitCode()
	case err != nil:
		t.Fatal(err)
	}
	return stdout.String(), stderr.String(), 0
}

// applyPolicy applies a policy document with the built kubectl.
func (d *daemon) applyPolicy(t *testing.T, doc string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "policy.yaml")
	if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	d.kubectl(t, "apply", "-f", path)
}

// TestPolicyCapture: an operator takes a node that attested (swtpm, EK
// certificate) as the reference. `sovrad policy capture` writes a Warn
// policy of its PCRs and claims, without the claims that change every boot,
// which kubectl applies (the CRD's admission accepts it) and under which the
// node attests again and passes with no warning. Captured again in Enforce
// mode with one PCR value altered, the policy fails the node's next
// attestation (PolicyViolation); capturing from the node then is refused
// with exit code 3.
func TestPolicyCapture(t *testing.T) {
	l := newSwtpmLab(t)
	d := startDaemon(t, l.ekFlags(t)...)
	ctx := context.Background()
	tpm, log := l.use(t, 0)
	a := &agentattest.Agent{
		TPM: tpm, Client: d.api, Claims: swtpmlab.NodeRoot(t), EventLogPath: log,
		Node:   agentattest.Node{UUID: newUUID(), Hostname: "reference-1", Addresses: []string{nodeAddr}},
		Logger: zaptest.NewLogger(t),
	}
	if err := a.Enroll(ctx); err != nil {
		t.Fatalf("enroll: %v", err)
	}
	// Not attested yet: no reference.
	if _, stderr, code := capture(t, d, "--from-node", a.NodeName()); code != 3 || !strings.Contains(stderr, "has not attested") {
		t.Fatalf("capture before any attestation: exit %d, %q; want 3", code, stderr)
	}
	if _, err := a.Attest(ctx); err != nil {
		t.Fatalf("attest: %v", err)
	}
	d.kubectl(t, "label", "sovranode", a.NodeName(), captureLabel)

	warn, stderr, code := capture(t, d, "--from-node", a.NodeName(), "--selector", captureLabel)
	if code != 0 {
		t.Fatalf("capture: exit %d: %s", code, stderr)
	}
	t.Logf("captured:\n%s%s", warn, stderr)
	var p v1alpha1.AttestationPolicy
	if err := yaml.Unmarshal([]byte(warn), &p); err != nil {
		t.Fatalf("the output is not an AttestationPolicy: %v", err)
	}
	if len(p.Spec.PCRs) != len(agentattest.QuotedPCRs) || len(p.Spec.Claims) == 0 || p.Spec.NodeSelector == nil {
		t.Fatalf("captured %d PCR rules, %d claim rules, selector %v", len(p.Spec.PCRs), len(p.Spec.Claims), p.Spec.NodeSelector)
	}
	for _, r := range p.Spec.PCRs {
		if r.Mode != v1alpha1.ModeWarn {
			t.Fatalf("PCR %d rule in mode %s, want Warn by default", r.Index, r.Mode)
		}
	}
	for _, forbidden := range []string{"nodekey.sha256", "boot.id", "boot.started"} {
		if strings.Contains(warn, forbidden) {
			t.Fatalf("the policy names the per-boot claim %s", forbidden)
		}
	}
	d.applyPolicy(t, warn)

	if _, err := a.Attest(ctx); err != nil {
		t.Fatalf("attesting under the captured policy: %v\n%s", err, d.Tail(20))
	}
	n := d.node(t, a.NodeName())
	if n.Status.LastAttestationResult != v1alpha1.ResultPassed || len(n.Status.Warnings) != 0 {
		t.Fatalf("under the captured Warn policy: %s, warnings %v", n.Status.LastAttestationResult, n.Status.Warnings)
	}

	// Enforce, with PCR 0 not what the node measures.
	enforce, stderr, code := capture(t, d, "--from-node", a.NodeName(), "--selector", captureLabel, "--mode", "Enforce")
	if code != 0 || !strings.Contains(enforce, "mode: Enforce") {
		t.Fatalf("capture --mode Enforce: exit %d: %s\n%s", code, stderr, enforce)
	}
	pcr0 := regexp.MustCompile(`(?m)^(  - index: 0\n    mode: Enforce\n    values:\n    - )([0-9a-f]{64})$`)
	m := pcr0.FindStringSubmatch(enforce)
	if m == nil {
		t.Fatalf("no PCR 0 rule in:\n%s", enforce)
	}
	altered := strings.Repeat("a", 64) // letters: YAML reads all digits as a number
	if m[2] == altered {
		altered = strings.Repeat("b", 64)
	}
	d.applyPolicy(t, pcr0.ReplaceAllString(enforce, "${1}"+altered))

	_, err := a.Attest(ctx)
	if err == nil {
		t.Fatal("the node passed an Enforce policy with a PCR value it does not measure")
	}
	n = d.node(t, a.NodeName())
	if n.Status.LastAttestationResult != v1alpha1.ResultFailed || n.Status.Reason != v1alpha1.ReasonPolicyViolation || !strings.Contains(n.Status.Message, "pcr[0]") {
		t.Fatalf("after the altered policy: %s %s: %s", n.Status.LastAttestationResult, n.Status.Reason, n.Status.Message)
	}
	t.Logf("refused as it should be: %v; status %s: %s", err, n.Status.Reason, n.Status.Message)

	// A node whose last attestation failed is no reference.
	out, stderr, code := capture(t, d, "--from-node", a.NodeName())
	if code != 3 || out != "" || !strings.Contains(stderr, "did not pass") {
		t.Fatalf("capture from a failed node: exit %d, stdout %q, stderr %q; want 3", code, out, stderr)
	}
	if _, stderr, code := capture(t, d, "--from-node", "ek-nosuchnode"); code != 1 || !strings.Contains(stderr, "no SovraNode") {
		t.Fatalf("capture from a missing node: exit %d, %q; want 1", code, stderr)
	}
}
