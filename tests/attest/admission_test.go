package attest

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sovra-dev/sovra/tests/sovradtest"
)

// policyAdmission: kubectl apply of a malformed AttestationPolicy is
// refused at admission (schema and CEL rules of the CRD) with a message
// that says what is wrong, and creates nothing; a well-formed policy of the
// same shape is accepted, so the refusals are about the malformed parts.
func (s *story) policyAdmission(t *testing.T) {
	hex := strings.Repeat("ab", 32)
	cases := []struct {
		name, spec, want string
	}{
		{"bad operator", "nodeSelector: {matchExpressions: [{key: role, operator: Near, values: [cp]}]}",
			`Unsupported value: "Near"`},
		{"In without values", "nodeSelector: {matchExpressions: [{key: role, operator: In}]}",
			"In and NotIn need values; Exists and DoesNotExist take none"},
		{"bad matchLabels key", `nodeSelector: {matchLabels: {"bad key!": cp}}`,
			"matchLabels: every key must be a label key"},
		{"bad label value", `nodeSelector: {matchLabels: {role: "-cp-"}}`,
			"matchLabels.role in body should match"},
		{"PCR 12", "pcrs: [{index: 12, values: [" + hex + "]}]",
			"only PCRs 0-7 and 11 are quoted"},
		{"PCR value not hex", "pcrs: [{index: 7, values: [" + strings.Repeat("zz", 32) + "]}]",
			"values[0] in body should match"},
		{"claim name with a quote", `claims: [{name: 'secure"boot', values: [enabled]}]`,
			"claims[0].name in body should match"},
	}
	before := s.snapshot(t)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			out, err := s.apply(t, "malformed", c.spec)
			if err == nil {
				s.d.kubectl(t, "delete", "attestationpolicy", "malformed")
				t.Fatalf("admitted: %s", out)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("refused without saying %q: %v", c.want, err)
			}
			t.Logf("refused: %v", err)
			if got := s.d.kubectl(t, "get", "attestationpolicies", "-o", "name"); got != "" {
				t.Fatalf("a refused policy exists: %q", got)
			}
		})
	}
	if after := s.snapshot(t); after.nodes != before.nodes {
		t.Fatal("refused policies changed the records")
	}
	valid := "nodeSelector: {matchLabels: {role: cp}, matchExpressions: [{key: role, operator: In, values: [cp]}]}\n" +
		"  pcrs: [{index: 7, values: [" + hex + "]}]\n" +
		"  claims: [{name: secureboot, values: [enabled]}]"
	if out, err := s.apply(t, "well-formed", valid); err != nil {
		t.Fatalf("a well-formed policy was refused: %v %s", err, out)
	}
	s.d.kubectl(t, "delete", "attestationpolicy", "well-formed")
}

// apply applies an AttestationPolicy with spec (YAML, indented under spec:).
func (s *story) apply(t *testing.T, name, spec string) (string, error) {
	t.Helper()
	manifest := "apiVersion: sovra.dev/v1alpha1\nkind: AttestationPolicy\nmetadata:\n  name: " + name + "\nspec:\n  " + spec + "\n"
	p := filepath.Join(t.TempDir(), "policy.yaml")
	if err := os.WriteFile(p, []byte(manifest), 0o600); err != nil {
		t.Fatal(err)
	}
	return sovradtest.Kubectl(t, "--kubeconfig", s.d.Kubeconfig(), "apply", "-f", p)
}
