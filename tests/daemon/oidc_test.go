package daemon_test

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/tests/sovradtest"
)

// TestOIDC: people log in with tokens from an OpenID Connect provider; the
// configured admin group gets cluster-admin, other users get what RBAC grants
// them (nothing), and a token for another audience, from another key,
// expired, or with a group Kubernetes reserves (system:) is refused. An
// email user name is not prefixed, as in kube-apiserver.
func TestOIDC(t *testing.T) {
	idp := newIssuer(t)
	dir := filepath.Join(t.TempDir(), "data")
	d := sovradtest.Start(t, dir,
		"--oidc-issuer-url", idp.URL,
		"--oidc-client-id", "sovra",
		"--oidc-username-claim", "email",
		"--oidc-groups-claim", "groups",
		"--oidc-ca-file", idp.caFile,
		"--admin-group", "platform-team")

	admin := idp.token(t, idp.key, map[string]any{"email": "alice@example.org", "groups": []string{"platform-team"}})
	waitFor(t, func() bool {
		_, err := tryKubectlAs(t, d, "--token", admin, "get", "secrets", "-A")
		return err == nil
	})
	if out := kubectlAs(t, d, "--token", admin, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"); out != "alice@example.org" {
		t.Fatalf("whoami: %q", out)
	}

	dev := idp.token(t, idp.key, map[string]any{"email": "bob@example.org", "groups": []string{"developers"}})
	if _, err := tryKubectlAs(t, d, "--token", dev, "get", "secrets", "-A"); err == nil || !strings.Contains(err.Error(), `User "bob@example.org" cannot list resource "secrets"`) {
		t.Fatalf("a user outside the admin group: %v", err)
	}

	// A group Kubernetes reserves, from the identity provider, refuses the
	// token: system:masters would otherwise be cluster-admin.
	for _, groups := range [][]string{{"system:masters"}, {"platform-team", "system:nodes"}} {
		tok := idp.token(t, idp.key, map[string]any{"email": "mallory@example.org", "groups": groups})
		if _, err := tryKubectlAs(t, d, "--token", tok, "get", "secrets", "-A"); err == nil || !strings.Contains(err.Error(), "Unauthorized") {
			t.Errorf("a token with groups %q: %v", groups, err)
		}
	}

	other, _ := rsa.GenerateKey(rand.Reader, 2048)
	for name, tok := range map[string]string{
		"another audience": idp.token(t, idp.key, map[string]any{"email": "alice@example.org", "groups": []string{"platform-team"}, "aud": "someone-else"}),
		"another key":      idp.token(t, other, map[string]any{"email": "alice@example.org", "groups": []string{"platform-team"}}),
		"expired":          idp.token(t, idp.key, map[string]any{"email": "alice@example.org", "groups": []string{"platform-team"}, "exp": time.Now().Add(-time.Hour).Unix()}),
	} {
		if _, err := tryKubectlAs(t, d, "--token", tok, "get", "namespaces"); err == nil || !strings.Contains(err.Error(), "Unauthorized") {
			t.Errorf("token from %s: %v", name, err)
		}
	}
}

// TestOIDCPrefixes: with kube-apiserver's defaults, a user name from any
// claim but email is prefixed with the issuer URL and "#"; with a groups
// prefix, every group is prefixed, so a group named system:masters in the
// token is only oidc:system:masters, which RBAC grants nothing.
func TestOIDCPrefixes(t *testing.T) {
	idp := newIssuer(t)
	d := sovradtest.Start(t, filepath.Join(t.TempDir(), "data"),
		"--oidc-issuer-url", idp.URL,
		"--oidc-client-id", "sovra",
		"--oidc-groups-claim", "groups",
		"--oidc-groups-prefix", "oidc:",
		"--oidc-ca-file", idp.caFile,
		"--admin-group", "oidc:platform-team")

	admin := idp.token(t, idp.key, map[string]any{"sub": "alice", "groups": []string{"platform-team"}})
	waitFor(t, func() bool {
		_, err := tryKubectlAs(t, d, "--token", admin, "get", "secrets", "-A")
		return err == nil
	})
	if out := kubectlAs(t, d, "--token", admin, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username} {.status.userInfo.groups}"); out != idp.URL+`#alice ["oidc:platform-team","system:authenticated"]` {
		t.Fatalf("whoami: %q", out)
	}

	mallory := idp.token(t, idp.key, map[string]any{"sub": "mallory", "groups": []string{"system:masters"}})
	if out := kubectlAs(t, d, "--token", mallory, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username} {.status.userInfo.groups}"); out != idp.URL+`#mallory ["oidc:system:masters","system:authenticated"]` {
		t.Fatalf("whoami: %q", out)
	}
	if _, err := tryKubectlAs(t, d, "--token", mallory, "get", "secrets", "-A"); err == nil || !strings.Contains(err.Error(), `cannot list resource "secrets"`) {
		t.Fatalf("a token with group system:masters: %v", err)
	}
}

type issuer struct {
	*httptest.Server
	key    *rsa.PrivateKey
	caFile string
}

// newIssuer serves an OpenID Connect discovery document and its signing key
// over TLS on loopback.
func newIssuer(t *testing.T) *issuer {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	is := &issuer{key: key}
	mux := http.NewServeMux()
	mux.HandleFunc("/.well-known/openid-configuration", func(w http.ResponseWriter, _ *http.Request) {
		json.NewEncoder(w).Encode(map[string]any{
			"issuer": is.URL, "jwks_uri": is.URL + "/keys",
			"id_token_signing_alg_values_supported": []string{"RS256"},
			"response_types_supported":              []string{"id_token"},
			"subject_types_supported":               []string{"public"},
		})
	})
	mux.HandleFunc("/keys", func(w http.ResponseWriter, _ *http.Request) {
		json.NewEncoder(w).Encode(map[string]any{"keys": []map[string]string{{
			"kty": "RSA", "kid": "k1", "use": "sig", "alg": "RS256",
			"n": b64(key.PublicKey.N.Bytes()), "e": b64(big.NewInt(int64(key.PublicKey.E)).Bytes()),
		}}})
	})
	is.Server = httptest.NewTLSServer(mux)
	t.Cleanup(is.Close)
	is.caFile = filepath.Join(t.TempDir(), "idp-ca.crt")
	os.WriteFile(is.caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: is.Certificate().Raw}), 0o600)
	return is
}

// token signs an ID token for audience "sovra", valid for an hour, with the
// given claims added or overriding the defaults.
func (is *issuer) token(t *testing.T, key *rsa.PrivateKey, claims map[string]any) string {
	t.Helper()
	now := time.Now()
	all := map[string]any{"iss": is.URL, "aud": "sovra", "sub": "user-1", "iat": now.Unix(), "exp": now.Add(time.Hour).Unix(), "email_verified": true}
	for k, v := range claims {
		all[k] = v
	}
	header, _ := json.Marshal(map[string]string{"alg": "RS256", "kid": "k1", "typ": "JWT"})
	payload, _ := json.Marshal(all)
	signed := b64(header) + "." + b64(payload)
	sum := sha256.Sum256([]byte(signed))
	sig, err := rsa.SignPKCS1v15(rand.Reader, key, crypto.SHA256, sum[:])
	if err != nil {
		t.Fatal(err)
	}
	return signed + "." + b64(sig)
}

func b64(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }
