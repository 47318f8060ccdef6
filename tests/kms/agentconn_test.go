package kms

import (
	"crypto/x509"
	"testing"

	"github.com/sovra-dev/sovra/agent/daemonconn"
)

// agentConn is the agent's connection to the daemon's node API at addr
// (agent/daemonconn, as the agent binary opens it): TLS 1.3, roots for the
// daemon's certificate, and the node credential of cred when there is one
// (nil: never).
func agentConn(t testing.TB, addr string, roots *x509.CertPool, cred daemonconn.CredentialFunc) *daemonconn.Conn {
	t.Helper()

	conn, err := daemonconn.New(daemonconn.Config{Endpoint: addr, Roots: roots, Credential: cred})
	if err != nil {
		t.Fatal(err)
	}

	t.Cleanup(func() { _ = conn.Close() })

	return conn
}
