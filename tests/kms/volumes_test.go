package kms

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/sovra-dev/sovra/agent/daemonconn"
	"github.com/sovra-dev/sovra/agent/volumes"
	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/nodeauth"
	"github.com/sovra-dev/sovra/internal/testutil"
)

const (
	// volumeSize is a file-backed volume: LUKS2's 16 MiB header and data.
	volumeSize = 32 << 20
	certTTL    = time.Hour
)

// pki is a CA that signs the node API's serving certificate and the node
// credentials, as the daemon's attestation service does after a passing
// attestation (CN = node name, O = sovra:nodes, client auth, backdated).
type pki struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newPKI(t *testing.T) *pki {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "sovra node CA (test)"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &pki{cert: cert, key: key, pool: pool}
}

func (p *pki) issue(t *testing.T, tmpl *x509.Certificate) tls.Certificate {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl.SerialNumber = serial
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.cert, &key.PublicKey, p.key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	return tls.Certificate{Certificate: [][]byte{der, p.cert.Raw}, PrivateKey: key, Leaf: leaf}
}

// credential is the node credential of a passing attestation of the
// record's current boot, for this instance of the record.
func (p *pki) credential(t *testing.T, rec *v1alpha1.SovraNode) daemonconn.CredentialFunc {
	boot := ""
	if b := rec.CurrentBoot(); b != nil {
		boot = b.ID
	}
	cert := p.issue(t, nodeauth.Template(nodeauth.Credential{Node: rec.Name, UID: rec.UID, Boot: boot}, nil, time.Now(), certTTL))
	return func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }
}

// daemonNodeCA is sovrad's node CA, read from its data directory: the test
// signs node credentials with it as the attestation service does after a
// passing attestation.
func daemonNodeCA(t *testing.T, d *kmsDaemon) *pki {
	t.Helper()
	certPEM, err := os.ReadFile(filepath.Join(d.DataDir, "node-ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	keyPEM, err := os.ReadFile(filepath.Join(d.DataDir, "node-ca.key"))
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
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &pki{cert: cert, key: key, pool: pool}
}

// newVolume is a file-backed raw volume (there is no device-mapper here).
func newVolume(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "data.img")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, volumeSize); err != nil {
		t.Fatal(err)
	}
	return path
}

// testPassphrase runs `cryptsetup open --test-passphrase` with key on stdin.
func testPassphrase(t *testing.T, device string, key []byte) error {
	t.Helper()
	cmd := exec.Command("cryptsetup", "open", "--test-passphrase", "--key-file=-", device)
	cmd.Stdin = bytes.NewReader(key)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return errors.New(string(out))
	}
	return nil
}

// TestAgentVolumes: an attested node's agent fetches its data volume's key
// over mutual TLS with its node credential, formats the file-backed volume
// as LUKS2, and the key it was released opens it (cryptsetup open
// --test-passphrase); the next boot checks it with the same key. Nodes that
// are not attested, revoked, or hold no credential get no key.
func TestAgentVolumes(t *testing.T) {
	testutil.Require(t, "cryptsetup")
	d := startKMS(t)
	ca := daemonNodeCA(t, d)
	addr := d.KMSAddr // sovrad serves volume keys beside the KMS, with mutual TLS
	ctx := context.Background()

	n := newNode(t)
	if err := d.createNode(ctx, n, attestedNode); err != nil {
		t.Fatal(err)
	}
	remote := &volumes.Remote{Conn: agentConn(t, addr, ca.pool, ca.credential(t, d.getNode(ctx, n)))}
	m := &volumes.Manager{Keys: remote}
	vol := volumes.Volume{ID: "data", Device: newVolume(t)}
	var outcome volumes.Outcome
	var err error
	for deadline := time.Now().Add(converge); ; { // the KMS cache sees the record within ms
		if outcome, _, err = m.Prepare(ctx, vol, ""); err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil || outcome != volumes.Formatted {
		t.Fatalf("first boot: %s, %v", outcome, err)
	}
	// The released key (asked again, as on the next boot) opens the volume.
	released, version, err := remote.VolumeKey(ctx, vol.ID, 1)
	if err != nil || version != 1 {
		t.Fatalf("VolumeKey: %d, %v", version, err)
	}
	if err := testPassphrase(t, vol.Device, released); err != nil {
		t.Fatalf("cryptsetup refused the released key: %v", err)
	}
	if err := testPassphrase(t, vol.Device, key(t)); err == nil {
		t.Fatal("cryptsetup took a random key")
	}
	image, _ := os.ReadFile(vol.Device)
	if enc, ok := findSecret(image, released); ok {
		t.Fatalf("the volume holds its key (%s)", enc)
	}
	if outcome, _, err := m.Prepare(ctx, vol, ""); err != nil || outcome != volumes.Verified {
		t.Fatalf("next boot: %s, %v", outcome, err)
	}
	// Another volume gets another key.
	other, _, err := remote.VolumeKey(ctx, "logs", 0)
	if err != nil || bytes.Equal(other, released) {
		t.Fatalf("second volume: %v", err)
	}

	parent := t // what outlives a subtest
	denied := func(t *testing.T, m *volumes.Manager, device string) {
		t.Helper()
		_, _, err := m.Prepare(ctx, volumes.Volume{ID: "data", Device: device}, "")
		if err == nil {
			t.Fatal("a denied node got its volume ready")
		}
		if !errors.Is(err, volumes.ErrNoCredential) && codeOf(err) != codes.PermissionDenied {
			t.Fatalf("unexpected refusal: %v", err)
		}
		if head, _ := os.ReadFile(device); bytes.HasPrefix(head, []byte("LUKS")) {
			t.Fatal("a denied node formatted its volume")
		}
	}
	t.Run("node whose last attestation failed", func(t *testing.T) {
		f := newNode(t)
		if err := d.createNode(ctx, f, nodeState{Enrolled: true, Attested: false, Result: v1alpha1.ResultFailed, Addresses: attestedNode.Addresses}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Second)
		denied(t, &volumes.Manager{Keys: &volumes.Remote{Conn: agentConn(t, addr, ca.pool, ca.credential(t, d.getNode(ctx, f)))}}, newVolume(t))
	})
	t.Run("credential of an earlier boot", func(t *testing.T) {
		// The node rebooted and attested again: the credential of its
		// previous boot gets no key.
		old := ca.credential(t, d.getNode(ctx, n))
		st := attestedNode
		st.Boot = "boot-2"
		d.setNodeState(ctx, n, st)
		_, _, err := (&volumes.Remote{Conn: agentConn(t, addr, ca.pool, old)}).VolumeKey(ctx, "data", 1)
		if codeOf(err) != codes.PermissionDenied {
			t.Fatalf("credential of an earlier boot: %v, want PermissionDenied", err)
		}
		waitLog(t, d, "CredentialNotOfCurrentBoot")
		remote.Conn = agentConn(parent, addr, ca.pool, ca.credential(t, d.getNode(ctx, n)))
	})
	t.Run("node without a credential (not attested in this boot)", func(t *testing.T) {
		none := func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return nil, errors.New("no valid node credential: the node has not passed attestation")
		}
		denied(t, &volumes.Manager{Keys: &volumes.Remote{Conn: agentConn(t, addr, ca.pool, none)}}, newVolume(t))
	})
	t.Run("credential from another CA", func(t *testing.T) {
		rogue := newPKI(t)
		_, _, err := (&volumes.Remote{Conn: agentConn(t, addr, ca.pool, rogue.credential(t, d.getNode(ctx, n)))}).VolumeKey(ctx, "data", 1)
		if err == nil {
			t.Fatal("a rogue credential got a key")
		}
	})
	t.Run("revoked node", func(t *testing.T) {
		d.Kubectl("delete", "sovranode", n.Name)
		deadline := time.Now().Add(converge)
		for {
			_, _, err := remote.VolumeKey(ctx, vol.ID, 1)
			if err != nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("a revoked node still gets its key")
			}
			time.Sleep(50 * time.Millisecond)
		}
		// Re-created with the same name and UUID (the same TPM enrolled
		// again): the credential of the deleted record gets nothing...
		if err := d.createNode(ctx, n, attestedNode); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Second)
		if _, _, err := remote.VolumeKey(ctx, vol.ID, 1); codeOf(err) != codes.PermissionDenied {
			t.Fatalf("credential of the deleted record: %v, want PermissionDenied", err)
		}
		// ...and the new record's own credential a new salt's key: the old
		// volume stays closed.
		remote.Conn = agentConn(parent, addr, ca.pool, ca.credential(t, d.getNode(ctx, n)))
		var fresh []byte
		for deadline := time.Now().Add(converge); ; {
			if fresh, _, err = remote.VolumeKey(ctx, vol.ID, 1); err == nil || time.Now().After(deadline) {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Equal(fresh, released) {
			t.Fatal("the re-created record released the old key")
		}
		if err := testPassphrase(t, vol.Device, fresh); err == nil {
			t.Fatal("the old volume opened after revocation")
		}
	})
}
