// Package daemon_test holds the end-to-end stories of the daemon foundation:
// the built sovrad on SQLite and on PostgreSQL, driven by the built kubectl.
package daemon_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/internal/testutil"
	"github.com/sovra-dev/sovra/tests/sovradtest"
)

const (
	secretValue = "s3cr3t-value-that-must-never-be-stored-in-plaintext"
	widgetCRD   = `apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.sovra.dev
spec:
  group: example.sovra.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              properties:
                size: {type: integer}
`
	widget = `apiVersion: example.sovra.dev/v1
kind: Widget
metadata: {name: w1, namespace: story}
spec: {size: 3}
`
)

// TestStoryOnSQLite is what a user does on the default datastore: every
// kubectl verb on core objects and a CRD, a restart, and the same state and
// the same service-account token afterwards.
func TestStoryOnSQLite(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	d := sovradtest.Start(t, dir)

	token := coreStory(t, d)

	saKey := mustRead(t, filepath.Join(dir, "sa.key"))
	caCert := mustRead(t, filepath.Join(dir, "ca.crt"))
	d.Restart()
	if !bytes.Equal(saKey, mustRead(t, filepath.Join(dir, "sa.key"))) || !bytes.Equal(caCert, mustRead(t, filepath.Join(dir, "ca.crt"))) {
		t.Fatal("the restart replaced the CA or the service-account signing key")
	}
	assertStoryState(t, d)
	if out := kubectlAs(t, d, "--token", token, "-n", "story", "get", "configmap", "cfg", "-o", "name"); out != "configmap/cfg\n" {
		t.Fatalf("service-account token after restart: got %q", out)
	}

	// The secret's value is in the SQLite database only encrypted.
	db := readAll(t, filepath.Join(dir, "db"))
	if !bytes.Contains(db, []byte("/registry/secrets/story/creds")) {
		t.Fatal("the secret's key is not in the SQLite files: the check below would prove nothing")
	}
	if !bytes.Contains(db, []byte("k8s:enc:secretbox:v1:key1")) {
		t.Fatal("no secretbox-encrypted value in the SQLite files")
	}
	if bytes.Contains(db, []byte(secretValue)) {
		t.Fatal("the secret's value is stored in plaintext")
	}

	// Deleting a namespace empties it and removes it, as in Kubernetes (the
	// upstream namespace controller runs in sovrad).
	d.Kubectl("delete", "namespace", "story", "--timeout=90s")
	if _, err := d.TryKubectl("get", "namespace", "story"); err == nil || !strings.Contains(err.Error(), "NotFound") {
		t.Fatalf("namespace story still there after delete: %v", err)
	}
	if out := d.Kubectl("get", "widgets", "-A", "-o", "name"); out != "" {
		t.Fatalf("the namespace's objects outlived it: %q", out)
	}
}

// coreStory creates, lists, watches and deletes objects through kubectl and
// returns a service-account token that can read configmaps in "story".
func coreStory(t *testing.T, d *sovradtest.Daemon) string {
	t.Helper()
	if out := d.Kubectl("get", "namespaces", "-o", "name"); !strings.Contains(out, "namespace/default") {
		t.Fatalf("namespaces: %q", out)
	}
	d.Kubectl("create", "namespace", "story")
	d.Kubectl("-n", "story", "create", "secret", "generic", "creds", "--from-literal=password="+secretValue)
	d.Kubectl("-n", "story", "create", "configmap", "cfg", "--from-literal=colour=blue")
	apply(t, d, widgetCRD)
	d.WaitEstablished("widgets.example.sovra.dev")
	apply(t, d, widget)

	if out := d.Kubectl("-n", "story", "get", "secret", "creds", "-o", "jsonpath={.data.password}"); out == "" {
		t.Fatal("secret read back empty")
	}
	if out := d.Kubectl("get", "widgets", "-A", "-o", "name"); out != "widget.example.sovra.dev/w1\n" {
		t.Fatalf("widgets: %q", out)
	}

	// Watch: a watcher sees an object created after it started, and its deletion.
	watch := startWatch(t, d, "-n", "story", "get", "configmaps", "--watch", "--output-watch-events")
	d.Kubectl("-n", "story", "create", "configmap", "watched")
	watch.expect(t, "ADDED", "watched")
	d.Kubectl("-n", "story", "delete", "configmap", "watched")
	watch.expect(t, "DELETED", "watched")
	if _, err := d.TryKubectl("-n", "story", "get", "configmap", "watched"); err == nil || !strings.Contains(err.Error(), "NotFound") {
		t.Fatalf("deleted configmap still there: %v", err)
	}

	// A service account allowed to read configmaps, and a token for it.
	d.Kubectl("-n", "story", "create", "serviceaccount", "reader")
	d.Kubectl("-n", "story", "create", "role", "cm-reader", "--verb=get,list", "--resource=configmaps")
	d.Kubectl("-n", "story", "create", "rolebinding", "cm-reader", "--role=cm-reader", "--serviceaccount=story:reader")
	token := strings.TrimSpace(d.Kubectl("-n", "story", "create", "token", "reader", "--duration=2h"))
	if out := kubectlAs(t, d, "--token", token, "-n", "story", "get", "configmap", "cfg", "-o", "name"); out != "configmap/cfg\n" {
		t.Fatalf("service-account token: got %q", out)
	}
	if _, err := tryKubectlAs(t, d, "--token", token, "-n", "story", "get", "secrets"); err == nil || !strings.Contains(err.Error(), "Forbidden") {
		t.Fatalf("service account read secrets without a grant: %v", err)
	}
	return token
}

func assertStoryState(t *testing.T, d *sovradtest.Daemon) {
	t.Helper()
	if out := d.Kubectl("-n", "story", "get", "secret", "creds", "-o", "jsonpath={.data.password}"); out == "" {
		t.Fatal("secret lost")
	}
	if out := d.Kubectl("-n", "story", "get", "configmap", "cfg", "-o", "jsonpath={.data.colour}"); out != "blue" {
		t.Fatalf("configmap: %q", out)
	}
	if out := d.Kubectl("-n", "story", "get", "widget", "w1", "-o", "jsonpath={.spec.size}"); out != "3" {
		t.Fatalf("widget: %q", out)
	}
}

// TestAuthorization: anonymous requests are refused except on health checks,
// and RBAC is enforced for a certificate user until a RoleBinding grants it.
func TestAuthorization(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	d := sovradtest.Start(t, dir)
	d.Kubectl("create", "namespace", "team")
	d.Kubectl("-n", "team", "create", "secret", "generic", "s", "--from-literal=k=v")

	client := anonymousClient(t, dir)
	for path, want := range map[string]int{
		"/api/v1/namespaces":              401,
		"/api/v1/namespaces/team/secrets": 401,
		"/metrics":                        401,
		"/readyz":                         200,
		"/livez":                          200,
	} {
		resp, err := client.Get(d.URL() + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("anonymous GET %s: %d, want %d", path, resp.StatusCode, want)
		}
	}

	// Prometheus metrics, for a credential allowed to read them: the API
	// server's own and kine's datastore metrics.
	metrics := d.Kubectl("get", "--raw", "/metrics")
	for _, m := range []string{"apiserver_request_total", "kine_sql_total"} {
		if !strings.Contains(metrics, m) {
			t.Errorf("/metrics lacks %s", m)
		}
	}

	// A scraper in system:monitoring reads them with nothing but the
	// bootstrap RBAC; a user outside it may not.
	scraper := userKubeconfig(t, d, "prometheus", "system:monitoring")
	if out, err := sovradtest.Kubectl(t, "--kubeconfig", scraper, "get", "--raw", "/metrics"); err != nil || !strings.Contains(out, "apiserver_request_total") {
		t.Errorf("system:monitoring could not read /metrics: %v", err)
	}
	kc := userKubeconfig(t, d, "alice", "developers")
	if _, err := sovradtest.Kubectl(t, "--kubeconfig", kc, "get", "--raw", "/metrics"); err == nil {
		t.Error("a user outside system:monitoring read /metrics")
	}
	_, err := sovradtest.Kubectl(t, "--kubeconfig", kc, "-n", "team", "get", "secrets")
	if err == nil || !strings.Contains(err.Error(), `User "alice" cannot list resource "secrets"`) {
		t.Fatalf("alice listed secrets without a grant: %v", err)
	}
	d.Kubectl("-n", "team", "create", "role", "secret-reader", "--verb=get,list", "--resource=secrets")
	d.Kubectl("-n", "team", "create", "rolebinding", "alice-reads", "--role=secret-reader", "--user=alice")
	waitFor(t, func() bool {
		out, err := sovradtest.Kubectl(t, "--kubeconfig", kc, "-n", "team", "get", "secrets", "-o", "name")
		return err == nil && out == "secret/s\n"
	})
	if _, err := sovradtest.Kubectl(t, "--kubeconfig", kc, "-n", "default", "get", "secrets"); err == nil {
		t.Fatal("the RoleBinding in team granted alice secrets in default")
	}
	if _, err := sovradtest.Kubectl(t, "--kubeconfig", kc, "-n", "team", "delete", "secret", "s"); err == nil {
		t.Fatal("a get/list grant let alice delete")
	}

	// The audit log has the request metadata, never a secret's value.
	audit := mustRead(t, filepath.Join(dir, "audit.log"))
	if !bytes.Contains(audit, []byte(`"resource":"secrets"`)) || !bytes.Contains(audit, []byte(`"username":"alice"`)) {
		t.Fatal("the audit log does not record alice's secret requests")
	}
	if bytes.Contains(audit, []byte(`"data":{"k"`)) {
		t.Fatal("the audit log holds a secret's data")
	}
}

type watcher struct {
	lines chan string
}

func startWatch(t *testing.T, d *sovradtest.Daemon, args ...string) *watcher {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, testutil.Bin(t, "kubectl"), append([]string{"--kubeconfig", d.Kubeconfig()}, args...)...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); _ = cmd.Wait() })
	w := &watcher{lines: make(chan string, 100)}
	go func() {
		s := bufio.NewScanner(out)
		for s.Scan() {
			w.lines <- s.Text()
		}
	}()
	return w
}

func (w *watcher) expect(t *testing.T, parts ...string) {
	t.Helper()
	timeout := time.After(30 * time.Second)
	for {
		select {
		case line := <-w.lines:
			if containsAll(line, parts) {
				return
			}
		case <-timeout:
			t.Fatalf("watch did not report %v", parts)
		}
	}
}

func containsAll(s string, parts []string) bool {
	for _, p := range parts {
		if !strings.Contains(s, p) {
			return false
		}
	}
	return true
}

func apply(t *testing.T, d *sovradtest.Daemon, manifest string) {
	t.Helper()
	f := filepath.Join(t.TempDir(), "manifest.yaml")
	if err := os.WriteFile(f, []byte(manifest), 0o600); err != nil {
		t.Fatal(err)
	}
	d.Kubectl("apply", "-f", f)
}

// kubectlAs runs kubectl against d with the daemon's CA and the given
// credential flags instead of the admin kubeconfig.
func kubectlAs(t *testing.T, d *sovradtest.Daemon, args ...string) string {
	t.Helper()
	out, err := tryKubectlAs(t, d, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func tryKubectlAs(t *testing.T, d *sovradtest.Daemon, args ...string) (string, error) {
	t.Helper()
	base := []string{"--kubeconfig", os.DevNull, "--server", d.URL(), "--certificate-authority", filepath.Join(d.DataDir, "ca.crt")}
	return sovradtest.Kubectl(t, append(base, args...)...)
}

// userKubeconfig issues a client certificate for user in group from the
// daemon's CA, as an operator would for a colleague, and writes a kubeconfig.
func userKubeconfig(t *testing.T, d *sovradtest.Daemon, user, group string) string {
	t.Helper()
	caCert := parseCert(t, mustRead(t, filepath.Join(d.DataDir, "ca.crt")))
	caKey := parseKey(t, mustRead(t, filepath.Join(d.DataDir, "ca.key")))
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: user, Organization: []string{group}},
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, key.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalPKCS8PrivateKey(key)
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, user+".crt"), filepath.Join(dir, user+".key")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600)
	kc := filepath.Join(dir, "kubeconfig")
	for _, args := range [][]string{
		{"config", "set-cluster", "sovra", "--server", d.URL(), "--certificate-authority", filepath.Join(d.DataDir, "ca.crt")},
		{"config", "set-credentials", user, "--client-certificate", certFile, "--client-key", keyFile},
		{"config", "set-context", "sovra", "--cluster", "sovra", "--user", user},
		{"config", "use-context", "sovra"},
	} {
		if _, err := sovradtest.Kubectl(t, append([]string{"--kubeconfig", kc}, args...)...); err != nil {
			t.Fatal(err)
		}
	}
	return kc
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if cond() {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatal("condition not met within 30s")
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// readAll concatenates every file under dir (the SQLite database, its WAL and
// shared-memory files).
func readAll(t *testing.T, dir string) []byte {
	t.Helper()
	var all []byte
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		f, err := os.Open(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		data, _ := io.ReadAll(f)
		f.Close()
		all = append(all, data...)
	}
	return all
}

func parseCert(t *testing.T, data []byte) *x509.Certificate {
	t.Helper()
	block, _ := pem.Decode(data)
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

func parseKey(t *testing.T, data []byte) *ecdsa.PrivateKey {
	t.Helper()
	block, _ := pem.Decode(data)
	key, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return key.(*ecdsa.PrivateKey)
}
