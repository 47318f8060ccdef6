// Package nodeauth is the one check behind every node-authenticated call of
// the node API (volume keys, membership, the bootstrap lease, and whatever
// comes next), and the one definition of what a node credential carries.
//
// A node credential is the client certificate a passing attestation earns.
// It names the SovraNode (common name), the instance of that record (its UID)
// and the boot that attested (the kernel boot ID the quote reported). A call
// is authenticated when the certificate chains to the node CA, is valid now,
// is for client authentication, and names the record that exists now under
// that name, with that UID, enrolled, not quarantined and with a passing last
// attestation. A credential issued to an earlier instance of a record (deleted
// and enrolled again) is worthless; calls that need this boot's attestation
// (keys, configuration) also require the credential's boot to be the node's
// latest reported boot.
package nodeauth

import (
	"context"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"
	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/metrics"
	"github.com/sovra-dev/sovra/daemon/ratelimit"
)

const (
	// Organization is the O of every node credential.
	Organization = "sovra:nodes"
	// uriScheme is the scheme of the URI SANs that carry the record UID
	// and the boot ID: sovra:node-uid:<uid> and sovra:boot-id:<id>.
	uriScheme  = "sovra"
	uidPrefix  = "node-uid:"
	bootPrefix = "boot-id:"
	// Backdate tolerates node clocks slightly behind the daemon's.
	Backdate = time.Minute
	// denialLogEvery is the shortest time between two log lines about one
	// peer's refused credential.
	denialLogEvery = 10 * time.Second
)

// Why a node credential was refused: the reason label of its metric and
// the code of its log line.
const (
	refusedNoCertificate   = "NoCertificate"
	refusedInvalid         = "InvalidCredential"
	refusedRecordDeleted   = "RecordDeleted"
	refusedEarlierInstance = "EarlierRecordInstance"
	refusedQuarantined     = "Quarantined"
	refusedNotEnrolled     = "NotEnrolled"
	refusedNotAttested     = "NotAttested"
	refusedUnreadable      = "RecordUnreadable"
)

// ErrNoCredential is what a caller without a usable node credential hears.
const errNoCredential = "present the node credential a passing attestation returned (mutual TLS with the node client certificate)"

// Credential is what a node credential says.
type Credential struct {
	// Node is the SovraNode name.
	Node string
	// UID is the UID of the record instance it was issued to.
	UID types.UID
	// Boot is the boot ID of the attestation that earned it.
	Boot string
	// NotBefore and NotAfter bound its validity.
	NotBefore, NotAfter time.Time
}

// Template returns the certificate template of a node credential issued at
// now for ttl (NotBefore is backdated by Backdate).
func Template(c Credential, serial *big.Int, now time.Time, ttl time.Duration) *x509.Certificate {
	return &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: c.Node, Organization: []string{Organization}},
		NotBefore:    now.Add(-Backdate),
		NotAfter:     now.Add(ttl),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		URIs: []*url.URL{
			{Scheme: uriScheme, Opaque: uidPrefix + string(c.UID)},
			{Scheme: uriScheme, Opaque: bootPrefix + c.Boot},
		},
	}
}

// Parse reads a node credential from a certificate whose chain was verified.
func Parse(leaf *x509.Certificate) (Credential, error) {
	c := Credential{Node: leaf.Subject.CommonName, NotBefore: leaf.NotBefore, NotAfter: leaf.NotAfter}
	if !slices.Contains(leaf.Subject.Organization, Organization) {
		return c, errors.New("the certificate is not a node credential")
	}
	if c.Node == "" {
		return c, errors.New("the certificate names no node")
	}
	for _, u := range leaf.URIs {
		if u.Scheme != uriScheme {
			continue
		}
		switch {
		case strings.HasPrefix(u.Opaque, uidPrefix):
			c.UID = types.UID(strings.TrimPrefix(u.Opaque, uidPrefix))
		case strings.HasPrefix(u.Opaque, bootPrefix):
			c.Boot = strings.TrimPrefix(u.Opaque, bootPrefix)
		}
	}
	if c.UID == "" {
		return c, errors.New("the credential names no record instance (issued by an older daemon): attest again")
	}
	return c, nil
}

// Records reads node records exactly (from the API, not a cache).
type Records interface {
	// Get returns the record name, or ErrNotFound.
	Get(ctx context.Context, name string) (*v1alpha1.SovraNode, error)
}

// ErrNotFound is what Records.Get returns for a missing record.
var ErrNotFound = errors.New("node record not found")

// APIRecords reads records through an API client.
type APIRecords struct{ Client client.Reader }

// Get implements Records.
func (r APIRecords) Get(ctx context.Context, name string) (*v1alpha1.SovraNode, error) {
	var n v1alpha1.SovraNode
	if err := r.Client.Get(ctx, client.ObjectKey{Name: name}, &n); err != nil {
		if apierrors.IsNotFound(err) {
			return nil, ErrNotFound
		}
		return nil, fmt.Errorf("reading node %s: %w", name, err)
	}
	return &n, nil
}

// Clock tells the time; tests advance it.
type Clock interface{ Now() time.Time }

type systemClock struct{}

func (systemClock) Now() time.Time { return time.Now() }

// Identity is an authenticated caller.
type Identity struct {
	Credential
	// Record is the caller's record as read for this call.
	Record *v1alpha1.SovraNode
}

// CurrentBoot reports whether the credential comes from the node's latest
// reported boot.
func (id *Identity) CurrentBoot() bool {
	b := id.Record.CurrentBoot()
	return b != nil && id.Boot != "" && b.ID == id.Boot
}

// Authenticator authenticates node credentials. Create it with New.
type Authenticator struct {
	roots   *x509.CertPool
	records Records
	clock   Clock
	logger  *zap.Logger
	logs    *ratelimit.Keyed
}

// New returns an Authenticator trusting nodeCA as the only issuer of node
// credentials. A nil clock is the system clock; a nil logger discards.
func New(nodeCA *x509.Certificate, records Records, clock Clock, logger *zap.Logger) *Authenticator {
	roots := x509.NewCertPool()
	roots.AddCert(nodeCA)
	if clock == nil {
		clock = systemClock{}
	}
	if logger == nil {
		logger = zap.NewNop()
	}
	for _, code := range []string{refusedNoCertificate, refusedInvalid, refusedRecordDeleted, refusedEarlierInstance,
		refusedQuarantined, refusedNotEnrolled, refusedNotAttested, refusedUnreadable} {
		metrics.NodeCredentialRefusals.WithLabelValues(code) // at zero from the start
	}
	return &Authenticator{roots: roots, records: records, clock: clock, logger: logger,
		logs: ratelimit.New(rate.Every(denialLogEvery), 1, 0, 0)}
}

// Authenticate checks the call's node credential and the record it names.
// Its errors are gRPC statuses with a message that says what to do:
// Unauthenticated without a valid credential, PermissionDenied when the
// record is gone, another instance, quarantined or not attested, and
// Unavailable when the record cannot be read.
func (a *Authenticator) Authenticate(ctx context.Context, call string) (*Identity, error) {
	from, leaf, inter := peerCertificate(ctx)
	if leaf == nil {
		a.deny(from, call, "", refusedNoCertificate, "no client certificate")
		return nil, status.Error(codes.Unauthenticated, errNoCredential)
	}
	_, err := leaf.Verify(x509.VerifyOptions{
		Roots: a.roots, Intermediates: inter, CurrentTime: a.clock.Now(),
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	var cred Credential
	if err == nil {
		cred, err = Parse(leaf)
	}
	if err != nil {
		a.deny(from, call, leaf.Subject.CommonName, refusedInvalid, err.Error())
		return nil, status.Error(codes.Unauthenticated, "the client certificate is not a valid node credential: "+err.Error()+"; "+errNoCredential)
	}
	rec, err := a.records.Get(ctx, cred.Node)
	switch {
	case errors.Is(err, ErrNotFound):
		a.deny(from, call, cred.Node, refusedRecordDeleted, "no such record (revoked)")
		return nil, status.Errorf(codes.PermissionDenied, "node %s is not enrolled (its record was deleted): enroll and attest again", cred.Node)
	case err != nil:
		metrics.NodeCredentialRefusals.WithLabelValues(refusedUnreadable).Inc()
		a.logger.Error("reading the record of a node credential", zap.String("node", cred.Node), zap.Error(err))
		return nil, status.Error(codes.Unavailable, "the daemon could not read the node's record; retry later")
	}
	code, reason := "", ""
	switch {
	case rec.UID != cred.UID:
		code, reason = refusedEarlierInstance, "the credential was issued to an earlier instance of the record: attest again"
	case rec.Quarantined():
		code, reason = refusedQuarantined, "the node is quarantined: an operator must clear it"
	case !rec.Enrolled():
		code, reason = refusedNotEnrolled, "the node is not enrolled: enroll and attest again"
	case !rec.AttestedOK():
		code, reason = refusedNotAttested, "the node's last attestation did not pass: attest again"
	}
	if reason != "" {
		a.deny(from, call, cred.Node, code, reason)
		return nil, status.Errorf(codes.PermissionDenied, "node %s: %s", cred.Node, reason)
	}
	return &Identity{Credential: cred, Record: rec}, nil
}

// deny counts a refused credential by code (refused*) and logs it, at most
// once per peer and denialLogEvery.
func (a *Authenticator) deny(from, call, node, code, reason string) {
	metrics.NodeCredentialRefusals.WithLabelValues(code).Inc()
	if a.logs.Allow(from, a.clock.Now()) {
		a.logger.Warn("denied: node credential refused", zap.String("call", call), zap.String("from", from),
			zap.String("node", node), zap.String("code", code), zap.String("reason", reason))
	}
}

// peerCertificate returns the call's peer address and client certificate
// with its intermediates, if the TLS handshake presented one.
func peerCertificate(ctx context.Context) (string, *x509.Certificate, *x509.CertPool) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return "", nil, nil
	}
	from := ""
	if p.Addr != nil {
		from = p.Addr.String()
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(info.State.PeerCertificates) == 0 {
		return from, nil, nil
	}
	certs := info.State.PeerCertificates
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	return from, certs[0], inter
}

type identityKey struct{}

// FromContext returns the identity the interceptors authenticated, nil when
// the call's service does not require a node credential.
func FromContext(ctx context.Context) *Identity {
	id, _ := ctx.Value(identityKey{}).(*Identity)
	return id
}

// Interceptors returns the unary and stream interceptors that authenticate
// every call of a gRPC server except those of the anonymous services (full
// names, e.g. "sovra.node.v1.NodeService"): a service added later is
// authenticated unless it is named here. A handler finds the identity with
// FromContext or Require.
func (a *Authenticator) Interceptors(anonymous ...string) (grpc.UnaryServerInterceptor, grpc.StreamServerInterceptor) {
	open := func(method string) bool {
		for _, s := range anonymous {
			if strings.HasPrefix(method, "/"+s+"/") {
				return true
			}
		}
		return false
	}
	unary := func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if open(info.FullMethod) {
			return handler(ctx, req)
		}
		id, err := a.Authenticate(ctx, info.FullMethod)
		if err != nil {
			return nil, err
		}
		return handler(context.WithValue(ctx, identityKey{}, id), req)
	}
	stream := func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		if open(info.FullMethod) {
			return handler(srv, ss)
		}
		id, err := a.Authenticate(ss.Context(), info.FullMethod)
		if err != nil {
			return err
		}
		return handler(srv, &identityStream{ServerStream: ss, ctx: context.WithValue(ss.Context(), identityKey{}, id)})
	}
	return unary, stream
}

type identityStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *identityStream) Context() context.Context { return s.ctx }

// Require returns the identity of an authenticated call, or an internal
// error when the service was registered without the interceptors: a
// handler never serves a guarded call unauthenticated.
func Require(ctx context.Context) (*Identity, error) {
	if id := FromContext(ctx); id != nil {
		return id, nil
	}
	return nil, status.Error(codes.Internal, fmt.Sprintf("node credential not checked: %s", errNoCredential))
}
