// Package kms is the daemon's Talos KMS: the sidero.kms.KMSService (Seal,
// Unseal) that Talos calls, without client credentials, to seal and unseal
// the keys of its STATE and EPHEMERAL volumes. Nobody authenticates a KMS
// call, so every rule holds against a caller who knows a node's UUID:
//
//   - Seal only inside a sealing window: a new record's first window, a
//     window enrollment, an operator or a wipe opened, or lab mode (see
//     window.go). Outside one, Seal answers exactly as for an unknown UUID.
//   - Unseal only for a record that is enrolled, not quarantined and whose
//     last attestation passed; the record is the one the UUID's claim names.
//   - No call creates per-node state or spends a per-node budget: limits are
//     per source address with a global fair share; refused calls are folded
//     into one event per node and reason.
//   - Every release is written to this replica's ledger (in batches, not one
//     API write per call) and attributed to a boot the node reported; a
//     release no boot explains raises UnexpectedUnseal (accounting.go).
//
// Denials are uniform (PermissionDenied); the reason goes to the decision log
// line and the node's events, never key material. Keys are kept by package
// custody.
package kms

import (
	"context"
	"errors"
	"fmt"
	"strings"
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
	reasonNoWindow     = "NoSealingWindow"
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
	// limits bounds calls per source address, with a global fair share.
	limits *ratelimit.Keyed
	// throttled folds the log lines of rate-limited calls per source.
	throttled *throttleLog
	// ledger holds this replica's key releases.
	ledger *ledger

	// store is nil until Run has synced the node cache; calls before that
	// are refused as Unavailable.
	store atomic.Pointer[storeBox]
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
	zeroMetrics()
	if cfg.LabMode {
		logger.Warn("KMS lab mode is ON: any node UUID may Seal; its record is created on first Seal; use it in labs only")
	}
	return &Service{
		cfg: cfg, policy: cfg.policyVersion(), keyring: keyring, clock: clock, logger: logger,
		limits:    ratelimit.New(cfg.SourceRate, cfg.SourceBurst, cfg.GlobalRate, cfg.GlobalBurst),
		throttled: newThrottleLog(logger),
		ledger:    newLedger(cfg.Replica),
	}, nil
}

// Register adds the KMS to a gRPC server (the node API's, or one of its
// own: see Serve).
func (s *Service) Register(g grpc.ServiceRegistrar) { kmsapi.RegisterKMSServiceServer(g, s) }

// Run connects to the API (retrying until it answers), installs the
// sovra.dev CRDs if needed, syncs the caches and loads this replica's
// ledger, and then runs the ledger, the judge of releases and the sweeper
// until ctx ends.
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
		for {
			err := s.ledger.load(ctx, ks)
			if err == nil {
				break
			}
			s.logger.Warn("loading this replica's ledger of key releases; retrying", zap.Error(err))
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(startRetry):
			}
		}
		s.store.Store(&storeBox{ks})
		s.logger.Info("KMS ready", zap.String("policy", s.policy), zap.Uint32("master_key_version", s.keyring.Current()),
			zap.String("replica", s.cfg.Replica))
	}
	st := s.store.Load().Store
	done := make(chan struct{}, 2)
	go func() { s.account(ctx, st); done <- struct{}{} }()
	go func() { s.sweep(ctx, st); done <- struct{}{} }()
	s.throttled.run(ctx)
	<-done
	<-done
	// Write what the last moments released.
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), recordWriteTimeout)
	defer cancel()
	s.flush(fctx, st)
	return nil
}

// Ready reports whether the caches have synced and the ledger is loaded.
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
	// Decide from the cache first, so that a Seal outside a window costs
	// and answers exactly what one for an unknown UUID does.
	rec := resolve(st, c.uuid)
	switch {
	case rec == nil && !s.cfg.LabMode:
		return nil, s.deny(c, reasonUnknown, "no record claims this UUID: enroll or pre-register the node")
	case rec != nil:
		c.record = rec
		if why, open := s.sealWindow(rec, s.clock.Now()); !open {
			return nil, s.deny(c, reasonNoWindow, why)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, sealTimeout)
	defer cancel()
	name := ""
	if rec != nil {
		name = rec.Name
	} else {
		name = labName(c.uuid)
		if err := s.createLabRecord(ctx, st, c, name); err != nil && !errors.Is(err, errExists) {
			return nil, s.deny(c, reasonInternal, err.Error())
		}
	}
	salted, reason, detail := s.ensureSalt(ctx, st, name, c, reasonUnknown, func(rec *v1alpha1.SovraNode) (string, string) {
		if why, open := s.sealWindow(rec, s.clock.Now()); !open {
			return reasonNoWindow, why
		}
		if (s.cfg.BindAddresses || isLab(rec)) && len(rec.Spec.Addresses) > 0 && !knowsAddress(rec, c.src.Addr) {
			return reasonAddress, "source is not a known address of the node"
		}
		return "", ""
	})
	if salted == nil {
		return nil, s.deny(c, reason, detail)
	}
	blob, err := s.keyring.Seal(salted.Status.KeySalt, c.uuid, req.GetData())
	if err != nil {
		return nil, s.deny(c, reasonInternal, err.Error())
	}
	// The Seal is on the record before the blob leaves: the first Unseal
	// of a fresh blob is explained by it.
	if err := s.recordSeal(ctx, st, salted, fingerprint(blob), c); err != nil {
		return nil, s.deny(c, reasonInternal, err.Error())
	}
	detail = fmt.Sprintf("sealed %d bytes with master key version %d; blob %s", len(req.GetData()), s.keyring.Current(), fingerprint(blob))
	s.allow(c, reasonSealed, detail)
	s.event(c.record, false, "KMSSealAllowed", "Seal allowed from "+c.src.String()+": "+detail)
	return &kmsapi.Response{Data: blob}, nil
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
	claim := &v1alpha1.UUIDClaim{
		ObjectMeta: metav1.ObjectMeta{Name: c.uuid, OwnerReferences: []metav1.OwnerReference{{
			APIVersion: v1alpha1.GroupVersion.String(), Kind: "SovraNode", Name: rec.Name, UID: rec.UID,
		}}},
		Spec: v1alpha1.UUIDClaimSpec{Node: rec.Name, NodeUID: rec.UID},
	}
	if err := st.CreateClaim(ctx, claim); err != nil && !errors.Is(err, errExists) {
		return err
	}
	s.logger.Warn("lab mode: created a record for an unknown node on its first Seal; it must enroll within the deadline",
		zap.String("node", name), zap.String("node_uuid", c.uuid), zap.Stringer("source", c.src),
		zap.Duration("deadline", s.cfg.AttestDeadline))
	s.event(rec, false, "LabRecordCreated",
		fmt.Sprintf("lab mode: record created on the first Seal from %s; enroll by %s", c.src,
			s.clock.Now().Add(s.cfg.AttestDeadline).UTC().Format(time.RFC3339)))
	return nil
}

// Unseal implements sidero.kms.KMSService. It reads only the caches and
// writes nothing on the request path: the release goes to the ledger.
func (s *Service) Unseal(ctx context.Context, req *kmsapi.Request) (*kmsapi.Response, error) {
	c, st, err := s.begin(ctx, opUnseal, req)
	if err != nil {
		return nil, err
	}
	rec := resolve(st, c.uuid)
	if rec == nil {
		return nil, s.deny(c, reasonUnknown, "no record claims this UUID (never enrolled, or revoked)")
	}
	c.record = rec
	switch {
	case quarantined(rec):
		return nil, s.deny(c, reasonQuarantined, "record is quarantined; an operator must clear it")
	case isLab(rec) && !freshSealFrom(rec, fingerprint(req.GetData()), c.src.Addr, s.clock.Now()):
		return nil, s.deny(c, reasonNotEnrolled, "node is not enrolled; before it enrolls it may open only what it sealed in the last "+FreshSealWindow.String()+", from the address it sealed from")
	case isLab(rec):
		// A pending machine opens the volume it just formatted.
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
	blob := fingerprint(req.GetData())
	id := s.ledger.add(rec, blob, c.src.Addr.String(), s.clock.Now())
	s.allow(c, reasonReleased, "key released; blob "+blob+"; ledger entry "+id)
	return &kmsapi.Response{Data: data}, nil
}

// begin validates the request's UUID and takes a rate-limit token of the
// call's source.
func (s *Service) begin(ctx context.Context, op string, req *kmsapi.Request) (*call, Store, error) {
	c := &call{start: time.Now(), op: op, src: callSource(ctx, s.cfg.TrustedProxies)}
	if c.src.IgnoredHeader {
		s.logger.Warn("forwarding header ignored: the peer is not a trusted proxy",
			zap.String("op", op), zap.Stringer("peer", c.src.Peer))
	}
	box := s.store.Load()
	if box == nil {
		return nil, nil, errUnavailable
	}
	if !s.limits.Allow(ratelimit.SourceKey(c.src.Addr), s.clock.Now()) {
		countDecision(op, false, reasonRateLimited)
		s.throttled.add(c.src.String(), op)
		return nil, nil, errRateLimited
	}
	if !validUUID(req.GetNodeUuid()) {
		return nil, nil, s.deny(c, reasonInvalid, fmt.Sprintf("node UUID of %d bytes is not a UUID", len(req.GetNodeUuid())))
	}
	c.uuid = lowerUUID(req.GetNodeUuid())
	if len(req.GetData()) > custody.MaxBlob {
		return nil, nil, s.deny(c, reasonInvalid, fmt.Sprintf("data of %d bytes", len(req.GetData())))
	}
	return c, box.Store, nil
}

// deny logs a refusal and folds it into the node's refusal events.
func (s *Service) deny(c *call, reason, detail string) error {
	s.record(c, false, reason, detail)
	if c.record != nil {
		if st := s.store.Load(); st != nil {
			st.Refused(c.record, "KMS"+c.op+"Denied", fmt.Sprintf("%s denied: %s", c.op, reason))
		}
	}
	return errDenied
}

func (s *Service) allow(c *call, reason, detail string) { s.record(c, true, reason, detail) }

// event records a decision or an alarm about a record.
func (s *Service) event(rec *v1alpha1.SovraNode, warning bool, reason, message string) {
	if st := s.store.Load(); st != nil && rec != nil {
		st.Event(rec, warning, reason, message)
	}
}

// record writes the decision to the log (every key decision has its line)
// and counts it.
func (s *Service) record(c *call, allowed bool, reason, detail string) {
	countDecision(c.op, allowed, reason)
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
}
