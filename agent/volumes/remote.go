package volumes

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/grpc"

	"github.com/sovra-dev/sovra/internal/volumeapi"
)

// volumeKeyLen is the length of a volume key the daemon releases.
const volumeKeyLen = 32

// ErrNoCredential: the node has no credential yet (it has not passed an
// attestation in this boot), so it asks for no key.
var ErrNoCredential = errors.New("no node credential: attest first")

// Conn is the connection to the daemon's key service that Remote needs:
// *daemonconn.Conn, which presents the node credential of this boot's last
// passing attestation and bounds each call.
type Conn interface {
	grpc.ClientConnInterface
	// HasCredential reports whether a call now presents a node credential.
	HasCredential() bool
}

// Remote is the KeySource on the daemon's volume key API.
type Remote struct {
	// Conn is the connection to the daemon's key service.
	Conn Conn
}

// VolumeKey implements KeySource.
func (r *Remote) VolumeKey(ctx context.Context, id string, version uint32) ([]byte, uint32, error) {
	if r.Conn == nil || !r.Conn.HasCredential() {
		return nil, 0, ErrNoCredential
	}

	resp, err := volumeapi.NewVolumeKeyServiceClient(r.Conn).GetVolumeKey(ctx, &volumeapi.GetVolumeKeyRequest{VolumeId: id, KeyVersion: version})
	if err != nil {
		return nil, 0, fmt.Errorf("asking the daemon for the key of volume %s: %w", id, err)
	}

	if len(resp.GetKey()) != volumeKeyLen || resp.GetKeyVersion() == 0 {
		return nil, 0, fmt.Errorf("the daemon sent a malformed key for volume %s", id)
	}

	return resp.GetKey(), resp.GetKeyVersion(), nil
}
