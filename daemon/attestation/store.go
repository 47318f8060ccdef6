package attestation

import (
	"context"
	"time"

	"k8s.io/apimachinery/pkg/runtime"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
)

// Store is where the Service keeps nodes, nonces and policies. Every replica
// of the daemon shares it, so a nonce issued by one is accepted by another.
type Store interface {
	// CreateNonce stores an issued nonce.
	CreateNonce(ctx context.Context, n *v1alpha1.AttestationNonce) error
	// GetNonce returns a stored nonce, or ErrNonce when there is none.
	GetNonce(ctx context.Context, name string) (*v1alpha1.AttestationNonce, error)
	// DeleteNonce removes exactly this nonce (by UID), or returns ErrNonce
	// when another caller already did: the single-use guarantee.
	DeleteNonce(ctx context.Context, n *v1alpha1.AttestationNonce) error
	// CountNonces returns how many issued nonces of node are outstanding.
	CountNonces(ctx context.Context, node string) (int, error)
	// DeleteExpiredNonces removes nonces that expired before t.
	DeleteExpiredNonces(ctx context.Context, t time.Time) (int, error)

	// GetNode returns a node record, or ErrNodeNotFound.
	GetNode(ctx context.Context, name string) (*v1alpha1.SovraNode, error)
	// NodesByUUID returns the node records labelled with an SMBIOS UUID.
	NodesByUUID(ctx context.Context, uuid string) ([]v1alpha1.SovraNode, error)
	// CreateNode creates a node record with its status.
	CreateNode(ctx context.Context, n *v1alpha1.SovraNode) error
	// UpdateNode writes the spec (and labels) of n, or ErrConflict.
	UpdateNode(ctx context.Context, n *v1alpha1.SovraNode) error
	// UpdateNodeStatus writes the status of n, or ErrConflict.
	UpdateNodeStatus(ctx context.Context, n *v1alpha1.SovraNode) error

	// ListPolicies returns every AttestationPolicy.
	ListPolicies(ctx context.Context) ([]v1alpha1.AttestationPolicy, error)

	// Event records a decision about obj (a node or a would-be node).
	Event(ctx context.Context, obj runtime.Object, warning bool, reason, message string)
}
