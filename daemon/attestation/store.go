package attestation

import (
	"context"
	"time"

	"k8s.io/apimachinery/pkg/runtime"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
)

// Store is where the Service keeps nodes, used nonces, UUID claims and
// policies. Every replica of the daemon shares it, so a nonce used at one is
// refused by another, and a UUID is bound once.
type Store interface {
	// CreateNonce records a used nonce, or returns ErrNonce when it is
	// recorded already: the single-use guarantee across replicas.
	CreateNonce(ctx context.Context, n *v1alpha1.AttestationNonce) error
	// DeleteExpiredNonces removes the markers of nonces that expired before t.
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

	// GetClaim returns the claim of a UUID, or ErrClaimNotFound.
	GetClaim(ctx context.Context, uuid string) (*v1alpha1.UUIDClaim, error)
	// CreateClaim creates a claim, or returns ErrConflict when the UUID is
	// claimed already: the atomic step of binding a UUID.
	CreateClaim(ctx context.Context, c *v1alpha1.UUIDClaim) error
	// UpdateClaim writes c if its resourceVersion is current, or ErrConflict.
	UpdateClaim(ctx context.Context, c *v1alpha1.UUIDClaim) error
	// DeleteClaim removes exactly this claim (UID and resourceVersion), or
	// returns ErrConflict when it changed.
	DeleteClaim(ctx context.Context, c *v1alpha1.UUIDClaim) error

	// ListPolicies returns every AttestationPolicy.
	ListPolicies(ctx context.Context) ([]v1alpha1.AttestationPolicy, error)

	// Event records a decision about obj (a node or a would-be node).
	Event(ctx context.Context, obj runtime.Object, warning bool, reason, message string)
}
