package volumes

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/sovra-dev/sovra/internal/volumeapi"
)

// callTimeout bounds one key request.
const callTimeout = 10 * time.Second

// ErrNoCredential: the node has no credential yet (it has not passed an
// attestation in this boot), so it asks for no key.
var ErrNoCredential = errors.New("no node credential: attest first")

// CredentialFunc returns the node credential of this boot's last passing
// attestation, or nil before one (agent/attest's Agent.ClientCertificate).
type CredentialFunc func(*tls.CertificateRequestInfo) (*tls.Certificate, error)

// Remote is the KeySource on the daemon's volume key API over mutual TLS.
type Remote struct {
	// Addr is the daemon's node API address.
	Addr string
	// Roots verify the daemon.
	Roots *x509.CertPool
	// Credential is the node credential.
	Credential CredentialFunc
}

// VolumeKey implements KeySource with a fresh connection per call (a key
// is asked for once per volume per boot).
func (r *Remote) VolumeKey(ctx context.Context, id string, version uint32) ([]byte, uint32, error) {
	if r.Credential == nil {
		return nil, 0, ErrNoCredential
	}
	if c, err := r.Credential(nil); err != nil || c == nil {
		return nil, 0, ErrNoCredential
	}
	conn, err := grpc.NewClient(r.Addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		RootCAs: r.Roots, MinVersion: tls.VersionTLS12, GetClientCertificate: r.Credential,
	})))
	if err != nil {
		return nil, 0, fmt.Errorf("connecting to the daemon: %w", err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	resp, err := volumeapi.NewVolumeKeyServiceClient(conn).GetVolumeKey(ctx, &volumeapi.GetVolumeKeyRequest{VolumeId: id, KeyVersion: version})
	if err != nil {
		return nil, 0, fmt.Errorf("asking the daemon for the key of volume %s: %w", id, err)
	}
	if len(resp.GetKey()) != 32 || resp.GetKeyVersion() == 0 {
		return nil, 0, fmt.Errorf("the daemon sent a malformed key for volume %s", id)
	}
	return resp.GetKey(), resp.GetKeyVersion(), nil
}
