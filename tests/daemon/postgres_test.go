package daemon_test

import (
	"bytes"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sovra-dev/sovra/tests/pgtest"
	"github.com/sovra-dev/sovra/tests/sovradtest"
)

// sharedKeys are the files every replica of one deployment must hold: the
// CA (each replica issues its own serving certificate from it), the
// service-account signing key, the Secret encryption key and the node CA.
var sharedKeys = []string{"ca.crt", "ca.key", "sa.key", "sa.pub", "encryption-config.yaml", "node-ca.crt", "node-ca.key"}

// TestStoryOnPostgres runs the same story on PostgreSQL, then a second
// replica on the same database: both serve reads and writes, a watch on one
// sees the other's writes, and the database holds no plaintext secret.
func TestStoryOnPostgres(t *testing.T) {
	pg := pgtest.Start(t)
	dsn := pg.DSN("sovra")
	dirA := filepath.Join(t.TempDir(), "a")
	a := sovradtest.Start(t, dirA, "--datastore", dsn)

	token := coreStory(t, a)
	a.Restart()
	assertStoryState(t, a)
	if strings.Contains(a.Tail(10000), pgtest.Password) {
		t.Fatal("the daemon logged the datastore password")
	}

	dirB := filepath.Join(t.TempDir(), "b")
	if err := os.Mkdir(dirB, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, name := range sharedKeys {
		if err := os.WriteFile(filepath.Join(dirB, name), mustRead(t, filepath.Join(dirA, name)), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	b := sovradtest.Start(t, dirB, "--datastore", dsn)

	assertStoryState(t, b)
	if out := kubectlAs(t, b, "--token", token, "-n", "story", "get", "configmap", "cfg", "-o", "name"); out != "configmap/cfg\n" {
		t.Fatalf("replica B rejected a token issued by replica A: %q", out)
	}
	watch := startWatch(t, b, "-n", "story", "get", "configmaps", "--watch", "--output-watch-events")
	a.Kubectl("-n", "story", "create", "configmap", "from-a", "--from-literal=k=a")
	watch.expect(t, "ADDED", "from-a")
	b.Kubectl("-n", "story", "create", "configmap", "from-b", "--from-literal=k=b")
	waitFor(t, func() bool {
		out, err := a.TryKubectl("-n", "story", "get", "configmap", "from-b", "-o", "jsonpath={.data.k}")
		return err == nil && out == "b"
	})
	b.Kubectl("-n", "story", "create", "secret", "generic", "from-b", "--from-literal=password="+secretValue+"-b")
	if out := a.Kubectl("-n", "story", "get", "secret", "from-b", "-o", "jsonpath={.data.password}"); out == "" {
		t.Fatal("replica A cannot read a secret replica B wrote")
	}

	dump := pg.Dump("sovra")
	if !bytes.Contains(dump, []byte("/registry/secrets/story/creds")) {
		t.Fatal("the secret is not in the database dump: the check below would prove nothing")
	}
	// pg_dump writes kine's bytea values in hex.
	if !bytes.Contains(dump, []byte(hex.EncodeToString([]byte("k8s:enc:secretbox:v1:key1")))) {
		t.Fatal("no secretbox-encrypted value in the database dump")
	}
	for _, form := range [][]byte{[]byte(secretValue), []byte(hex.EncodeToString([]byte(secretValue)))} {
		if bytes.Contains(dump, form) {
			t.Fatal("the database holds a secret's value in plaintext")
		}
	}
}
