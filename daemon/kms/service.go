// Package kms is the daemon's Talos KMS: the sidero.kms.KMSService (Seal,
// Unseal) that Talos calls, without client credentials, to seal and unseal
// the keys of its STATE and EPHEMERAL volumes. Every call is judged on the
// node's SovraNode record: Seal only for enrolled or pre-registered nodes
// (any node in lab mode), Unseal only for nodes that are enrolled, not
// revoked, not quarantined and whose last attestation passed. A node that
// unsealed and then fails or misses attestation is quarantined. Denials are
// uniform (PermissionDenied); the reason goes to the audit trail: an event on
// the node's record and a structured log line, never key material. Keys are
// kept by package custody.
package kms

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	kmsapi "github.com/siderolabs/kms-client/api/kms"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/custody"
	"github.com/sovra-dev/sovra/daemon/ratelimit"
)

// Limits and pacing.
const (
	// MaxRequestSize bounds a KMS request on the wire: a UUID and a blob.
	MaxRequestSize = 4 << 10
	// sealTimeout bounds the API calls of one Seal (Talos waits 10 s).
	sealTimeout = 8 * time.Second
	// saltAttempts bounds the optimistic writes of a node's salt.
	saltAttempts = 5
	// startRetry paces Run's wait for the API server.
	startRetry = 500 * time.Millisecond
)

// Decisions and reasons in the audit trail.
const (
	opSeal   = "Seal"
	opUnseal = "Unseal"

	reasonSealed       = "Sealed"
	reasonReleased     = "Released"
	reasonInvalid      = "InvalidRequest"
	reasonRateLimited  = "RateLimited"
	reasonUnknown      = "UnknownNode"
	reasonAmbiguous    = "AmbiguousUUID"
	reasonQuarantined  = "Quarantined"
	reasonNotEnrolled  = "NotEnrolled"
	reasonNotAttested  = "LastAttestationNotPassed"
	reasonAddress      = "AddressMismatch"
	reasonNoSalt       = "NoKeySalt"
	reasonBadSalt      = "MalformedKeySalt"
	reasonBlobFormat   = "BlobMalformed"
	reasonBlobKey      = "BlobUnknownKeyVersion"
	reasonBlobRejected = "BlobRejected"
	reasonInternal     = "InternalError"
)

// The answers a refused caller gets: errDenied for every denial, whatever
// the reason; the other two say when to retry.
var (
	errDenied      = status.Error(codes.PermissionDenied, "permission denied")
	errUnavailable = status.Error(codes.Unavailable, "the KMS is starting; retry")
	errRateLimited = status.Error(codes.ResourceExhausted, "too many requests; retry later")
)

func lowerUUID(u string) string { return strings.ToLower(u) }

// Clock tells the time; tests advance it.
type Clock interface{ Now() time.Time }

type systemClock struct{}

func (systemClock) Now() time.Time { return time.Now() }

// Service is the KMS. Create it with New (or NewWithStore), register it on
// a gRPC server with Register, and Run it.
type Service struct {
	kmsapi.UnimplementedKMSServiceServer

	cfg      Config
	policy   string
	keyring  *custody.Keyring
	loopback *rest.Config
	clock    Clock
	logger   *zap.Logger
	limits   *ratelimit.Keyed
	audit    *auditor
	// pace bounds the rate of writes off the request path.
	pace *pacer

	// store is nil until Run has synced the node cache; calls before that
	// are refused as Unavailable.
	store atomic.Pointer[storeBox]

	// mu guards releases: nodes whose Unseal starts an attestation
	// deadline, to be written to their records by the release writer.
	mu       sync.Mutex
	releases map[string]time.Time
	released chan struct{}
}

type storeBox struct{ Store }

// New returns the KMS over the Kubernetes API at loopback (the daemon's
// privileged loopback config), with the master keyring. A nil logger
// discards. Nothing is contacted until Run.
func New(cfg Config, loopback *rest.Config, keyring *custody.Keyring, logger *zap.Logger) (*Service, error) {
	if loopback == nil {
		return nil, errors.New("creating KMS: no API client configuration")
	}
	s, err := newService(cfg, keyring, nil, logger)
	if err != nil {
		return nil, err
	}
	s.loopback = loopback
	return s, nil
}

// NewWithStore returns a KMS over any Store and Clock (nil is the system
// clock), ready at once; tests use it.
func NewWithStore(cfg Config, store Store, keyring *custody.Keyring, clock Clock, logger *zap.Logger) (*Service, error) {
	s, err := newService(cfg, keyring, clock, logger)
	if err != nil {
		return nil, err
	}
	s.store.Store(&storeBox{store})
	return s, nil
}

func newService(cfg Config, keyring *custody.Keyring, clock Clock, logger *zap.Logger) (*Service, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if keyring == nil {
		return nil, errors.New("creating KMS: no master keyring")
	}
	cfg = cfg.withDefaults()
	if clock == nil {
		clock = systemClock{}
	}
	if logger == nil {
		logger = zap.NewNop()
	}
	logger = logger.Named("kms")
	if cfg.LabMode {
		logger.Warn("KMS lab mode is ON: any node UUID may Seal; its record is created on first Seal; use it in labs only")
	}
	pace := newPacer()
	return &Service{
		cfg: cfg, policy: cfg.policyVersion(), keyring: keyring, clock: clock, logger: logger,
		limits:   ratelimit.New(cfg.NodeRate, cfg.NodeBurst, cfg.GlobalRate, cfg.GlobalBurst),
		audit:    newAuditor(pace, logger),
		pace:     pace,
		releases: map[string]time.Time{},
		released: make(chan struct{}, 1),
	}, nil
}

// Register adds the KMS to a gRPC server (the node API's, or one of its
// own: see Serve).
func (s *Service) Register(g grpc.ServiceRegistrar) { kmsapi.RegisterKMSServiceServer(g, s) }

// Run connects to the API (retrying until it answers), installs the
// sovra.dev CRDs if needed, syncs the node cache, and then runs the audit
// writers, the release writer and the quarantine sweeper until ctx ends.
func (s *Service) Run(ctx context.Context) error {
	if s.store.Load() == nil {
		var ks *kubeStore
		for {
			var err error
			if ks, err = newKubeStore(ctx, s.loopback, s.cfg.InstallCRDs, s.logger); err == nil {
				break
			}
			s.logger.Debug("waiting for the API to start the KMS", zap.Error(err))
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(startRetry):
			}
		}
		if err := ks.start(ctx); err != nil {
			return nil // shutting down before the first sync
		}
		s.store.Store(&storeBox{ks})
		s.logger.Info("KMS ready", zap.String("policy", s.policy), zap.Uint32("master_key_version", s.keyring.Current()))
	}
	st := s.store.Load().Store
	var wg sync.WaitGroup
	wg.Add(3)
	go func() { defer wg.Done(); s.audit.run(ctx, st) }()
	go func() { defer wg.Done(); s.writeReleases(ctx, st) }()
	go func() { defer wg.Done(); s.sweep(ctx, st) }()
	wg.Wait()
	return nil
}

// Ready reports whether the node cache has synced.
func (s *Service) Ready() bool { return s.store.Load() != nil }

// call is one request being judged.
type call struct {
	start  time.Time
	op     string
	uuid   string // as sent, once validated; lower case
	src    source
	record *v1alpha1.SovraNode
}

// Seal implements sidero.kms.KMSService.
func (s *Service) Seal(ctx context.Context, req *kmsapi.Request) (*kmsapi.Response, error) {
	c, st, err := s.begin(ctx, opSeal, req)
	if err != nil {
		return nil, err
	}
	if len(req.GetData()) == 0 || len(req.GetData()) > custody.MaxData {
		return nil, s.deny(c, reasonInvalid, fmt.Sprintf("data of %d bytes", len(req.GetData())))
	}
	ctx, cancel := context.WithTimeout(ctx, sealTimeout)
	defer cancel()
	rec, reason, detail := s.sealRecord(ctx, st, c)
	if rec == nil {
		return nil, s.deny(c, reason, detail)
	}
	c.record = rec
	blob, err := s.keyring.Seal(rec.Status.KeySalt, c.uuid, req.GetData())
	if err != nil {
		return nil, s.deny(c, reasonInternal, err.Error())
	}
	s.allow(c, reasonSealed, fmt.Sprintf("sealed %d bytes with master key version %d", len(req.GetData()), s.keyring.Current()))
	return &kmsapi.Response{Data: blob}, nil
}

// sealRecord finds (in lab mode, creates) the record a Seal is for, judges
// it, and makes sure it has a salt. It reads the API, not the cache: a
// blob sealed under a stale salt would be lost.
func (s *Service) sealRecord(ctx context.Context, st Store, c *call) (*v1alpha1.SovraNode, string, string) {
	var name string
	cands := st.ByUUID(c.uuid)
	switch rec, ok := pick(cands); {
	case len(cands) == 0 && !s.cfg.LabMode:
		return nil, reasonUnknown, "no record claims this UUID: enroll or pre-register the node"
	case len(cands) == 0:
		name = labName(c.uuid)
		if err := s.createLabRecord(ctx, st, c, name); err != nil && !errors.Is(err, errExists) {
			return nil, reasonInternal, err.Error()
		}
	case !ok:
		return nil, reasonAmbiguous, fmt.Sprintf("%d records claim this UUID", len(cands))
	default:
		name = rec.Name
	}
	return s.ensureSalt(ctx, st, name, c, reasonUnknown, func(rec *v1alpha1.SovraNode) (string, string) {
		if s.cfg.BindAddresses && len(rec.Spec.Addresses) > 0 && !knowsAddress(rec, c.src.Addr) {
			return reasonAddress, "source is not a known address of the node"
		}
		return "", ""
	})
}

func (s *Service) createLabRecord(ctx context.Context, st Store, c *call, name string) error {
	rec := &v1alpha1.SovraNode{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{LabelLabPending: "true"}},
		Spec: v1alpha1.SovraNodeSpec{
			EKHash: placeholderEKHash, UUID: c.uuid,
		},
	}
	if c.src.Addr.IsValid() {
		rec.Spec.Addresses = []string{c.src.Addr.String()}
	}
	if err := st.Create(ctx, rec); err != nil {
		return err
	}
	s.logger.Warn("lab mode: created a record for an unknown node on its first Seal; it must enroll within the deadline",
		zap.String("node", name), zap.String("node_uuid", c.uuid), zap.Stringer("source", c.src),
		zap.Duration("deadline", s.cfg.AttestDeadline))
	s.audit.event(rec, false, "LabRecordCreated",
		fmt.Sprintf("lab mode: record created on the first Seal from %s; enroll by %s", c.src,
			s.clock.Now().Add(s.cfg.AttestDeadline).UTC().Format(time.RFC3339)))
	return nil
}

// Unseal implements sidero.kms.KMSService. It reads only the cache.
func (s *Service) Unseal(ctx context.Context, req *kmsapi.Request) (*kmsapi.Response, error) {
	c, st, err := s.begin(ctx, opUnseal, req)
	if err != nil {
		return nil, err
	}
	cands := st.ByUUID(c.uuid)
	rec, ok := pick(cands)
	switch {
	case len(cands) == 0:
		return nil, s.deny(c, reasonUnknown, "no record claims this UUID (never enrolled, or revoked)")
	case !ok:
		return nil, s.deny(c, reasonAmbiguous, fmt.Sprintf("%d records claim this UUID", len(cands)))
	}
	c.record = rec
	switch {
	case quarantined(rec):
		return nil, s.deny(c, reasonQuarantined, "record is quarantined; an operator must clear it")
	case !enrolled(rec):
		return nil, s.deny(c, reasonNotEnrolled, "node is not enrolled")
	case !attestedOK(rec):
		return nil, s.deny(c, reasonNotAttested, fmt.Sprintf("last attestation result %q", rec.Status.LastAttestationResult))
	case s.cfg.BindAddresses && !knowsAddress(rec, c.src.Addr):
		return nil, s.deny(c, reasonAddress, "source is not a known address of the node")
	case len(rec.Status.KeySalt) == 0:
		return nil, s.deny(c, reasonNoSalt, "node never sealed a key (or its record was re-created)")
	}
	data, err := s.keyring.Open(rec.Status.KeySalt, c.uuid, req.GetData())
	if err != nil {
		reason := reasonBlobRejected
		switch {
		case errors.Is(err, custody.ErrMalformed):
			reason = reasonBlobFormat
		case errors.Is(err, custody.ErrUnknownKey):
			reason = reasonBlobKey
		case errors.Is(err, custody.ErrSalt):
			reason = reasonBadSalt
		}
		return nil, s.deny(c, reason, err.Error())
	}
	s.markReleased(rec)
	s.allow(c, reasonReleased, "key released; the node must pass an attestation by "+
		s.clock.Now().Add(s.cfg.AttestDeadline).UTC().Format(time.RFC3339))
	return &kmsapi.Response{Data: data}, nil
}

// begin validates the request's UUID and takes a rate-limit token.
func (s *Service) begin(ctx context.Context, op string, req *kmsapi.Request) (*call, Store, error) {
	c := &call{start: time.Now(), op: op, src: callSource(ctx, s.cfg.TrustedProxies)}
	s.pace.called()
	if c.src.IgnoredHeader {
		s.logger.Warn("forwarding header ignored: the peer is not a trusted proxy",
			zap.String("op", op), zap.Stringer("peer", c.src.Peer))
	}
	box := s.store.Load()
	if box == nil {
		return nil, nil, errUnavailable
	}
	if !validUUID(req.GetNodeUuid()) {
		return nil, nil, s.deny(c, reasonInvalid, fmt.Sprintf("node UUID of %d bytes is not a UUID", len(req.GetNodeUuid())))
	}
	c.uuid = lowerUUID(req.GetNodeUuid())
	if len(req.GetData()) > custody.MaxBlob {
		return nil, nil, s.deny(c, reasonInvalid, fmt.Sprintf("data of %d bytes", len(req.GetData())))
	}
	if !s.limits.Allow(c.uuid, s.clock.Now()) {
		s.record(c, false, reasonRateLimited, "over the per-node or global rate")
		return nil, nil, errRateLimited
	}
	return c, box.Store, nil
}

func (s *Service) deny(c *call, reason, detail string) error {
	s.record(c, false, reason, detail)
	return errDenied
}

func (s *Service) allow(c *call, reason, detail string) { s.record(c, true, reason, detail) }

// record writes the decision to the log and queues its event.
func (s *Service) record(c *call, allowed bool, reason, detail string) {
	decision := "denied"
	if allowed {
		decision = "allowed"
	}
	fields := []zap.Field{
		zap.String("op", c.op), zap.String("decision", decision), zap.String("reason", reason),
		zap.String("node_uuid", c.uuid), zap.Stringer("source", c.src), zap.String("policy", s.policy),
		zap.String("detail", detail), zap.Duration("took", time.Since(c.start)),
	}
	if c.record != nil {
		fields = append(fields, zap.String("node", c.record.Name), zap.String("record_version", c.record.ResourceVersion))
	}
	if allowed {
		s.logger.Info("kms decision", fields...)
	} else {
		s.logger.Warn("kms decision", fields...)
	}
	if c.uuid == "" {
		return // nothing names a record
	}
	ref := c.record
	if ref == nil {
		ref = &v1alpha1.SovraNode{ObjectMeta: metav1.ObjectMeta{Name: "uuid-" + c.uuid}}
	}
	s.audit.event(ref, !allowed, "KMS"+c.op+strings.ToUpper(decision[:1])+decision[1:],
		fmt.Sprintf("%s %s: %s (%s); source %s; policy %s", c.op, decision, reason, detail, c.src, s.policy))
}
