package auditpolicy

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const header = "apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n"

func TestCheck(t *testing.T) {
	for _, tc := range []struct {
		name  string
		rules string
		// want is a part of the error; empty: the policy passes.
		want string
	}{
		{name: "metadata for everything", rules: `
  - level: Metadata`},
		{name: "fix before a sovra.dev body rule", rules: "\n" + Fix + `
  - level: RequestResponse
    resources:
      - group: "sovra.dev"`},
		{name: "bodies for everything", want: "rule 1 records SovraNodes at level RequestResponse (get sovranodes)", rules: `
  - level: RequestResponse`},
		{name: "group rule without the fix", want: "rule 2 records SovraNodes at level Request", rules: `
  - level: None
    nonResourceURLs: ["/healthz*"]
  - level: Request
    resources:
      - group: "sovra.dev"`},
		{name: "fix after the body rule", want: "rule 1 records", rules: `
  - level: RequestResponse
    resources:
      - group: "sovra.dev"
` + Fix},
		{name: "status only", want: "get sovranodes/status", rules: `
  - level: Metadata
    resources:
      - group: "sovra.dev"
        resources: ["sovranodes"]
  - level: RequestResponse
    resources:
      - group: "sovra.dev"
        resources: ["*/status"]`},
		{name: "writes only", want: "update sovranodes", rules: `
  - level: RequestResponse
    verbs: ["update", "patch"]
  - level: Metadata`},
		{name: "deletes return the record", want: "delete sovranodes", rules: `
  - level: RequestResponse
    verbs: ["delete"]
  - level: Metadata`},
		{name: "one user", want: "by user sovrad-kms", rules: `
  - level: Metadata
    users: ["alice"]
  - level: RequestResponse
    users: ["sovrad-kms", "alice"]
  - level: Metadata`},
		{name: "one group, another group quiet", want: "in group auditors", rules: `
  - level: Metadata
    userGroups: ["system:masters"]
  - level: RequestResponse
    userGroups: ["auditors", "system:masters"]
  - level: Metadata`},
		{name: "one record", want: "get sovranodes node-1", rules: `
  - level: RequestResponse
    resources:
      - group: "sovra.dev"
        resources: ["sovranodes"]
        resourceNames: ["node-1"]
  - level: Metadata`},
		{name: "namespaced rules do not match", rules: `
  - level: RequestResponse
    namespaces: ["kube-system"]
  - level: Metadata`},
		{name: "other groups are fine", rules: `
  - level: RequestResponse
    resources:
      - group: "cluster.x-k8s.io"
  - level: Metadata`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "policy.yaml")
			if err := os.WriteFile(path, []byte(header+strings.TrimPrefix(tc.rules, "\n")+"\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			err := Check(path)
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.want != "" && err == nil:
				t.Fatal("accepted")
			case tc.want != "" && !strings.Contains(err.Error(), tc.want):
				t.Fatalf("error %q lacks %q", err, tc.want)
			case tc.want != "" && !strings.Contains(err.Error(), Fix):
				t.Fatalf("error %q does not say what to add", err)
			}
		})
	}
}

func TestCheckRefusesAnInvalidPolicy(t *testing.T) {
	if err := CheckBytes([]byte(header + "  - level: Loud\n")); err == nil {
		t.Fatal("accepted an invalid level")
	}
	if err := Check(filepath.Join(t.TempDir(), "missing.yaml")); err == nil {
		t.Fatal("accepted a missing file")
	}
}
