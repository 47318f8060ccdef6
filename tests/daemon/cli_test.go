package daemon_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
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

// sovrad runs the built sovrad with args, extra environment and stdin, and
// returns its exit code, stdout and stderr.
func sovrad(t *testing.T, env []string, stdin []byte, args ...string) (int, string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, testutil.Bin(t, "sovrad"), args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdin = bytes.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
		return 0, stdout.String(), stderr.String()
	case errors.As(err, &exit):
		return exit.ExitCode(), stdout.String(), stderr.String()
	}
	t.Fatalf("running sovrad %v: %v", args, err)
	return 0, "", ""
}

// TestHelp: `sovrad --help` exits 0 and lists the subcommands and the
// environment variable of every flag; each subcommand's --help exits 0.
func TestHelp(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"-h"}, {"help"}} {
		code, out, errOut := sovrad(t, nil, nil, args...)
		if code != 0 {
			t.Fatalf("sovrad %v: exit %d\n%s", args, code, errOut)
		}
		for _, want := range []string{
			"sovrad healthcheck", "sovrad keyring init|list|rotate FILE", "sovrad ek-hash", "sovrad version",
			"sovrad policy capture --from-node NAME", "sovrad hosts boot-config",
			"--data-dir string", "[SOVRA_DATA_DIR]", "[SOVRA_LISTEN]", "[SOVRA_NODE_TLS_SAN]", "[SOVRA_MASTER_KEY_FILE]",
			"[SOVRA_BOOT_LISTEN]", "[SOVRA_NODE_ENDPOINT]", "[SOVRA_HOSTS_AUTO_ACCEPT]", "[SOVRA_CONFIG_ATTESTATION_MAX_AGE]", "[SOVRA_BOOT_MAX_PENDING]",
			"A flag on the command line wins over its",
		} {
			if !strings.Contains(out, want) {
				t.Errorf("sovrad %v does not say %q:\n%s", args, want, out)
			}
		}
	}
	for _, args := range [][]string{
		{"keyring", "--help"}, {"keyring", "help"}, {"healthcheck", "--help"}, {"ek-hash", "--help"},
		{"policy", "--help"}, {"policy", "capture", "--help"}, {"hosts", "--help"}, {"hosts", "boot-config", "--help"},
	} {
		if code, out, errOut := sovrad(t, nil, nil, args...); code != 0 || !strings.Contains(out, "usage: sovrad "+args[0]) {
			t.Errorf("sovrad %v: exit %d, stdout %q, stderr %q; want 0 and the usage", args, code, out, errOut)
		}
	}
}

// TestKeyringInitAndRotate: `keyring init` creates the keyring (0600) and
// refuses to replace one; `keyring rotate` on a missing file creates
// nothing and says how to start a keyring.
func TestKeyringInitAndRotate(t *testing.T) {
	path := filepath.Join(t.TempDir(), "master.keys")
	code, _, errOut := sovrad(t, nil, nil, "keyring", "rotate", path)
	if code != 1 || !strings.Contains(errOut, "no keyring at "+path) || !strings.Contains(errOut, "sovrad keyring init "+path) {
		t.Fatalf("rotate of a missing keyring: exit %d, %q", code, errOut)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("rotate created a keyring")
	}
	code, out, errOut := sovrad(t, nil, nil, "keyring", "init", path)
	if code != 0 || !strings.Contains(out, "versions [1]; version 1 seals") {
		t.Fatalf("init: exit %d, %q %q", code, out, errOut)
	}
	if st, err := os.Stat(path); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("keyring after init: %v %v", st.Mode(), err)
	}
	created, _ := os.ReadFile(path)
	if code, _, errOut := sovrad(t, nil, nil, "keyring", "init", path); code != 1 || !strings.Contains(errOut, "exists") {
		t.Fatalf("init over a keyring: exit %d, %q", code, errOut)
	}
	if now, _ := os.ReadFile(path); !bytes.Equal(now, created) {
		t.Fatal("init replaced a keyring")
	}
	if code, out, errOut := sovrad(t, nil, nil, "keyring", "rotate", path); code != 0 || !strings.Contains(out, "versions [1 2]; version 2 seals") {
		t.Fatalf("rotate: exit %d, %q %q", code, out, errOut)
	}
}

// TestConfigErrorsExitTwo: a data directory that cannot be created (in
// /proc) and a bad value from the environment are configuration errors:
// exit code 2, and the message names the variable the value came from.
func TestConfigErrorsExitTwo(t *testing.T) {
	out := mustFail(t, nil, "--data-dir", "/proc/sovra-test")
	wantAll(t, out, "--data-dir /proc/sovra-test: cannot be created")

	dir := filepath.Join(t.TempDir(), "data")
	out = mustFail(t, []string{"SOVRA_LISTEN=localhost:6443", "SOVRA_NODE_TLS_SAN=bad name!"}, "--data-dir", dir)
	wantAll(t, out, `SOVRA_LISTEN "localhost:6443": "localhost" is not an IP address`,
		`SOVRA_NODE_TLS_SAN "bad name!": neither an IP address nor a DNS name`)
	if strings.Contains(out, "--listen") {
		t.Errorf("the error names --listen, which was not given:\n%s", out)
	}
	assertAbsent(t, dir)
}

// TestEKHash: `sovrad ek-hash` prints the SHA-256 of the EK public key's
// PKIX DER and the record name, from a certificate or a public key, PEM or
// DER, a file or standard input; the same EK gives the same answer.
func TestEKHash(t *testing.T) {
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, pub := range []any{&rsaKey.PublicKey, &ecKey.PublicKey} {
		pkix, err := x509.MarshalPKIXPublicKey(pub)
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(pkix)
		hash := hex.EncodeToString(sum[:])
		want := "name: ek-" + hash[:32] + "\nekHash: " + hash + "\n"
		cert := ekCertificate(t, pub)

		files := map[string][]byte{
			"pub.pem":  pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pkix}),
			"pub.der":  pkix,
			"cert.pem": pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert}),
			"cert.der": cert,
		}
		for name, data := range files {
			path := filepath.Join(dir, name)
			if err := os.WriteFile(path, data, 0o600); err != nil {
				t.Fatal(err)
			}
			flag := "--" + strings.TrimSuffix(strings.TrimSuffix(name, ".pem"), ".der")
			if code, out, errOut := sovrad(t, nil, nil, "ek-hash", flag, path); code != 0 || out != want {
				t.Errorf("ek-hash %s %s: exit %d, %q (%s); want %q", flag, name, code, out, errOut, want)
			}
			if code, out, _ := sovrad(t, nil, data, "ek-hash", flag, "-"); code != 0 || out != want {
				t.Errorf("ek-hash %s - < %s: exit %d, %q; want %q", flag, name, code, out, want)
			}
		}
	}
	if code, _, errOut := sovrad(t, nil, nil, "ek-hash"); code != 2 || !strings.Contains(errOut, "give one of --cert and --pub") {
		t.Errorf("ek-hash without input: exit %d, %q", code, errOut)
	}
	junk := filepath.Join(dir, "junk")
	os.WriteFile(junk, []byte("not a key"), 0o600)
	if code, _, errOut := sovrad(t, nil, nil, "ek-hash", "--pub", junk); code != 1 || !strings.Contains(errOut, "malformed EK") {
		t.Errorf("ek-hash of junk: exit %d, %q", code, errOut)
	}
}

// ekCertificate is a self-signed certificate for pub, standing in for a
// manufacturer's EK certificate.
func ekCertificate(t *testing.T, pub any) []byte {
	t.Helper()
	signer, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "test EK"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, pub, signer)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// TestSovraNodeNameMatchesEKHash: a record whose name is not "ek-" and the
// first 32 hex digits of its ekHash (enrollment would never find it) is
// refused at admission, saying why; the record `sovrad ek-hash` describes is
// admitted, and so are sovrad's pending records (kms-lab-UUID, boot-UUID,
// with the all-zero placeholder hash).
func TestSovraNodeNameMatchesEKHash(t *testing.T) {
	d := sovradtest.Start(t, filepath.Join(t.TempDir(), "data"), "--controllers", "none")
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	pubFile := filepath.Join(t.TempDir(), "ek.pem")
	os.WriteFile(pubFile, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o600)
	code, out, errOut := sovrad(t, nil, nil, "ek-hash", "--pub", pubFile)
	if code != 0 {
		t.Fatalf("ek-hash: exit %d: %s", code, errOut)
	}
	var name, hash string
	if _, err := fmt.Sscanf(out, "name: %s\nekHash: %s\n", &name, &hash); err != nil {
		t.Fatalf("ek-hash printed %q: %v", out, err)
	}
	apply := func(name, hash string) error {
		manifest := fmt.Sprintf("apiVersion: sovra.dev/v1alpha1\nkind: SovraNode\nmetadata:\n  name: %s\n  labels: {sovra.dev/cluster: prod}\nspec:\n  ekHash: \"%s\"\n", name, hash)
		p := filepath.Join(t.TempDir(), "node.yaml")
		os.WriteFile(p, []byte(manifest), 0o600)
		_, err := d.TryKubectl("apply", "-f", p)
		return err
	}
	const why = "metadata.name must be ek- and the first 32 hex digits of spec.ekHash"
	const uuid = "5d9a7a0c-2b1e-4f7d-9c3a-0e6f1b2c3d4e"
	placeholder := strings.Repeat("0", 64)
	otherHash := strings.Repeat("0", 64-len(hash[:32])) + hash[:32]
	for what, c := range map[string][2]string{
		"a name of its own":        {"worker-1", hash},
		"the name of another hash": {name, otherHash},
		"ek- and too few digits":   {name[:20], hash},
		"a lab-record-like name":   {"kms-lab", hash},
		// Only sovrad's pending records hold a name of their own, and
		// only with the all-zero placeholder hash.
		"a lab name, a real hash":       {"kms-lab-" + uuid, hash},
		"a boot name, a real hash":      {"boot-" + uuid, hash},
		"another name, the placeholder": {"worker-1", placeholder},
	} {
		err := apply(c[0], c[1])
		if err == nil || !strings.Contains(err.Error(), why) {
			t.Errorf("%s (%s, %s): %v; want refused with %q", what, c[0], c[1], err, why)
		}
	}
	if got := d.Kubectl("get", "sovranodes", "-o", "name"); got != "" {
		t.Fatalf("refused records exist: %q", got)
	}
	if err := apply(name, hash); err != nil {
		t.Fatalf("the record sovrad ek-hash describes was refused: %v", err)
	}
	if got := d.Kubectl("get", "sovranode", name, "-o", "jsonpath={.spec.ekHash}"); got != hash {
		t.Fatalf("record %s holds ekHash %q", name, got)
	}
	// The pending records sovrad makes (lab mode's first Seal, a
	// boot-config fetch) keep their names, with the placeholder hash.
	for _, pending := range []string{"kms-lab-" + uuid, "boot-" + uuid} {
		if err := apply(pending, placeholder); err != nil {
			t.Errorf("pending record %s refused: %v", pending, err)
		}
	}
}
