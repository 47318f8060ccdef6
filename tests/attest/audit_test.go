//go:build tpmsimulator

package attest

import (
	"bufio"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	agentattest "github.com/sovra-dev/sovra/agent/attest"
	"github.com/sovra-dev/sovra/tests/swtpmlab"
)

// auditWait bounds the wait for a component's write to reach the audit log.
const auditWait = 60 * time.Second

// auditEntry is the part of an audit log line the test reads.
type auditEntry struct {
	Level string `json:"level"`
	Verb  string `json:"verb"`
	User  struct {
		Username string   `json:"username"`
		Groups   []string `json:"groups"`
	} `json:"user"`
	UserAgent string `json:"userAgent"`
	ObjectRef struct {
		Resource    string `json:"resource"`
		Subresource string `json:"subresource"`
		Namespace   string `json:"namespace"`
		Name        string `json:"name"`
		APIGroup    string `json:"apiGroup"`
	} `json:"objectRef"`
	ResponseStatus struct {
		Code int `json:"code"`
	} `json:"responseStatus"`
}

// audited is a write the audit log must show, by the user who made it.
type audited struct {
	what                           string
	user                           string
	verbs                          []string
	resource, subresource, ns, obj string
}

func (w audited) matches(e auditEntry) bool {
	return e.User.Username == w.user && slices.Contains(w.verbs, e.Verb) &&
		e.ObjectRef.Resource == w.resource && e.ObjectRef.Subresource == w.subresource &&
		e.ObjectRef.Namespace == w.ns && (w.obj == "" || e.ObjectRef.Name == w.obj) &&
		e.ResponseStatus.Code >= 200 && e.ResponseStatus.Code < 300
}

// TestAuditNamesEachComponent: every in-process component acts as its own
// user, and the audit log shows who did what: the node API's enrollment as
// system:sovra:nodeapi, the KMS's salt write as system:sovra:kms, the
// shredder's scrub of a revoked record as system:sovra:shred, the default ServiceAccount and
// kube-root-ca.crt of a new namespace as system:sovra:controllers, Cluster
// API's finalizer on a Cluster as system:sovra:capi, the host pool's mirror
// of the node's attestation on its Host as system:sovra:hosts, the
// infrastructure provider's finalizer and status on a SovraCluster as
// system:sovra:infrastructure. None of them is refused
// anything it needs (no 403 for a component, from the start), none acts as
// the API server's superuser, and lease renewals are not recorded.
func TestAuditNamesEachComponent(t *testing.T) {
	ctx := context.Background()
	l := newSimLab(t)
	d := startDaemon(t, append(l.ekFlags(t), "--controllers", "all")...)
	auditLog := filepath.Join(d.DataDir, "audit.log")
	from := fileSize(t, auditLog)
	began := time.Now()

	tpm, eventLog := l.use(t, 0)
	a := &agentattest.Agent{
		TPM: tpm, Client: d.api, Claims: swtpmlab.NodeRoot(t), EventLogPath: eventLog,
		Node:   agentattest.Node{UUID: newUUID(), Hostname: "audit-1", Addresses: []string{"10.5.0.9"}},
		Logger: zaptest.NewLogger(t),
	}
	if err := a.Enroll(ctx); err != nil {
		t.Fatalf("enroll: %v", err)
	}
	if _, err := a.Attest(ctx); err != nil {
		t.Fatalf("attest: %v", err)
	}
	if _, err := d.seal(ctx, a.Node.UUID, random(32)); err != nil {
		t.Fatalf("seal: %v", err)
	}
	d.kubectl(t, "create", "namespace", "audited")
	d.WaitEstablished("clusters.cluster.x-k8s.io")
	d.kubectl(t, "-n", "audited", "create", "-f", writeManifest(t, `apiVersion: cluster.x-k8s.io/v1beta1
kind: Cluster
metadata:
  name: audited
  namespace: audited
spec: {}
`))

	node := a.NodeName()
	// A host of the pool for the node: the host pool's reconciler mirrors
	// the node's attestation on it (before the node goes).
	d.kubectl(t, "create", "-f", writeManifest(t, `apiVersion: sovra.dev/v1alpha1
kind: Host
metadata:
  name: `+node+`
spec: {}
`))
	for deadline := time.Now().Add(auditWait); !strings.Contains(d.kubectl(t, "get", "host", node, "-o", "jsonpath={.status.conditions[*].type}"), "Attested"); {
		if time.Now().After(deadline) {
			t.Fatal("the host pool's reconciler did not mirror the node's attestation on its Host")
		}
		time.Sleep(pollPause)
	}
	d.WaitEstablished("sovraclusters.infrastructure.cluster.x-k8s.io")
	d.kubectl(t, "-n", "audited", "create", "-f", writeManifest(t, `apiVersion: infrastructure.cluster.x-k8s.io/v1alpha1
kind: SovraCluster
metadata:
  name: audited
  namespace: audited
spec:
  controlPlaneEndpoint: {host: 10.5.0.100, port: 6443}
`))
	d.kubectl(t, "delete", "sovranode", node, "--wait=false") // a revocation: the shredder scrubs the salt
	want := []audited{
		{"enrollment", "system:sovra:nodeapi", []string{"create"}, "sovranodes", "", "", node},
		{"attestation", "system:sovra:nodeapi", []string{"update", "patch"}, "sovranodes", "status", "", node},
		{"the KMS's salt write", "system:sovra:kms", []string{"update", "patch"}, "sovranodes", "status", "", node},
		{"the shredder's scrub of the salt", "system:sovra:shred", []string{"update"}, "sovranodes", "status", "", node},
		{"the shredder's release of the record", "system:sovra:shred", []string{"update"}, "sovranodes", "", "", node},
		{"the default ServiceAccount", "system:sovra:controllers", []string{"create"}, "serviceaccounts", "", "audited", "default"},
		{"kube-root-ca.crt", "system:sovra:controllers", []string{"create"}, "configmaps", "", "audited", "kube-root-ca.crt"},
		{"Cluster API's finalizer", "system:sovra:capi", []string{"update", "patch"}, "clusters", "", "audited", "audited"},
		{"the host pool's reconciler", "system:sovra:hosts", []string{"update"}, "hosts", "status", "", node},
		{"the infrastructure provider's finalizer", "system:sovra:infrastructure", []string{"update", "patch"}, "sovraclusters", "", "audited", "audited"},
		{"the infrastructure provider's status", "system:sovra:infrastructure", []string{"update", "patch"}, "sovraclusters", "status", "audited", "audited"},
	}
	var seen []auditEntry
	deadline := time.Now().Add(auditWait)
	for {
		seen = readAudit(t, auditLog, from)
		var missing []string
		for _, w := range want {
			found := false
			for _, e := range seen {
				if w.matches(e) {
					found = true
					break
				}
			}
			if !found {
				missing = append(missing, w.what+" as "+w.user)
			}
		}
		if len(missing) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the audit log lacks %s", strings.Join(missing, ", "))
		}
		time.Sleep(pollPause)
	}
	// The Cluster API manager renews its Lease every 2 s: by now, many times.
	if elapsed := time.Since(began); elapsed < 10*time.Second {
		time.Sleep(10*time.Second - elapsed)
	}
	seen = readAudit(t, auditLog, from)
	t.Logf("%d audit entries in %s", len(seen), time.Since(began).Round(time.Second))
	for _, e := range seen {
		switch {
		case e.ObjectRef.Resource == "leases" && e.Verb == "update" && e.ObjectRef.Namespace != "sovra-system":
			t.Errorf("a lease renewal is recorded: %+v", e)
		case e.ObjectRef.Resource == "leases" && e.ObjectRef.Name == "sovrad-controllers" && e.Verb == "update":
			t.Errorf("the controllers' Lease renewal is recorded: %+v", e)
		case e.User.Username == "system:apiserver" && e.Verb != "get" && e.Verb != "list" && e.Verb != "watch" &&
			(e.ObjectRef.APIGroup == "sovra.dev" || strings.HasSuffix(e.ObjectRef.APIGroup, "cluster.x-k8s.io") || e.ObjectRef.Namespace == "audited"):
			t.Errorf("a component wrote as the API server's superuser: %+v", e)
		}
	}
	// From the start: no component was refused anything.
	for _, e := range readAudit(t, auditLog, 0) {
		if strings.HasPrefix(e.User.Username, "system:sovra:") && e.ResponseStatus.Code == 403 {
			t.Errorf("%s was refused %s %s/%s in %q (%s)", e.User.Username, e.Verb, e.ObjectRef.Resource,
				e.ObjectRef.Subresource, e.ObjectRef.Namespace, e.UserAgent)
		}
	}
}

// readAudit parses the audit log from offset.
func readAudit(t *testing.T, path string, offset int64) []auditEntry {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Seek(offset, 0); err != nil {
		t.Fatal(err)
	}
	var out []auditEntry
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		var e auditEntry
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			continue // a line being written
		}
		out = append(out, e)
	}
	return out
}

func fileSize(t *testing.T, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

func writeManifest(t *testing.T, doc string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "manifest.yaml")
	if err := os.WriteFile(p, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}
