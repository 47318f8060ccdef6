package attestation

import "errors"

// Sentinel errors; the gRPC edge maps them to status codes.
var (
	// ErrInvalid: the request is malformed or oversized.
	ErrInvalid = errors.New("invalid request")
	// ErrNodeNotFound: no SovraNode for the node; it must enroll.
	ErrNodeNotFound = errors.New("node is not enrolled")
	// ErrNonce: the nonce is unknown, used, expired or another node's.
	ErrNonce = errors.New("nonce not accepted")
	// ErrRefused: enrollment or attestation was refused on its merits.
	ErrRefused = errors.New("refused")
	// ErrBusy: the node asked for too much; it should wait and retry.
	ErrBusy = errors.New("too many requests")
	// ErrConflict: a concurrent update won; the caller may retry.
	ErrConflict = errors.New("conflicting update")
	// ErrClaimNotFound: no UUIDClaim for the UUID.
	ErrClaimNotFound = errors.New("UUID is not claimed")
)
