package kms

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"go.uber.org/zap"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
)

// A machine sovra never saw seals its first volumes before its agent can
// enroll: Talos formats STATE and EPHEMERAL as soon as it has a
// configuration, and the agent runs only after that. The fetch of the
// enrollment configuration (package bootconfig) is what admits those
// Seals: it makes a pending record for the machine's UUID, bound to the
// address that fetched it, with a BootConfig sealing window. The pending
// record may Seal only from that address, and open only what it sealed in
// the last FreshSealWindow, from that address (Talos opens what it
// formatted at once). When the machine's TPM enrolls with that UUID, from
// that address, the enrolled record adopts the pending record's key salt;
// enrolled from anywhere else, the pending record's seals are discarded
// (its salt is not adopted). A UUID any record already holds gets nothing:
// the first fetch wins, and a fetch for a known machine's UUID opens no
// window. A pending record that never sealed goes when its window ends; one
// that sealed and did not enroll within Config.AttestDeadline is
// quarantined, as lab records are.

// Expectation is what a fetch of the enrollment configuration did.
type Expectation string

// Expectations.
const (
	// ExpectCreated: a pending record now admits the machine's first Seals
	// from the source.
	ExpectCreated Expectation = "Created"
	// ExpectPending: the source's pending record for the UUID exists.
	ExpectPending Expectation = "Pending"
	// ExpectKnown: a record holds the UUID (an enrolled or pre-registered
	// machine): nothing was opened.
	ExpectKnown Expectation = "Known"
	// ExpectBoundElsewhere: another source fetched first: nothing opened.
	ExpectBoundElsewhere Expectation = "BoundElsewhere"
	// ExpectFull: MaxPending pending records exist: nothing opened.
	ExpectFull Expectation = "Full"
)

const (
	// pendingNamePrefix prefixes the names of the pending records of
	// enrollment-configuration fetches.
	pendingNamePrefix = "boot-"
	// DefaultBootConfigWindow is how long a pending record may Seal.
	DefaultBootConfigWindow = 30 * time.Minute
	// DefaultMaxPending bounds the pending records that fetches make.
	DefaultMaxPending = 256
)

// ErrInvalidUUID is returned for a UUID that is not one.
var ErrInvalidUUID = errors.New("not a machine UUID")

// Expect admits the first Seals of the machine uuid from src: see the
// comment above. window bounds how long it may Seal (zero:
// DefaultBootConfigWindow); maxPending bounds the pending records (zero:
// DefaultMaxPending).
func (s *Service) Expect(ctx context.Context, uuid string, src netip.Addr, window time.Duration, maxPending int) (Expectation, error) {
	if !validUUID(uuid) {
		return "", ErrInvalidUUID
	}
	if window <= 0 {
		window = DefaultBootConfigWindow
	}
	if maxPending <= 0 {
		maxPending = DefaultMaxPending
	}
	box := s.store.Load()
	if box == nil {
		return "", errUnavailable
	}
	st := box.Store
	uuid = lowerUUID(uuid)
	src = src.Unmap()
	if rec := resolve(st, uuid); rec != nil || st.Claim(uuid) != nil || len(st.ByUUID(uuid)) > 0 {
		return s.expectKnown(rec, uuid, src), nil
	}
	pending := 0
	for _, n := range st.List() {
		if isLab(n) {
			pending++
		}
	}
	if pending >= maxPending {
		s.logger.Warn("enrollment configuration served, but no sealing window opened: too many pending machines",
			zap.String("node_uuid", uuid), zap.Stringer("source", src), zap.Int("pending", pending))
		return ExpectFull, nil
	}
	now := s.clock.Now()
	rec := &v1alpha1.SovraNode{
		ObjectMeta: metav1.ObjectMeta{Name: pendingNamePrefix + uuid, Labels: map[string]string{LabelLabPending: "true"}},
		Spec:       v1alpha1.SovraNodeSpec{EKHash: placeholderEKHash, UUID: uuid, Addresses: []string{src.String()}},
		Status: v1alpha1.SovraNodeStatus{Sealing: &v1alpha1.Sealing{Window: &v1alpha1.SealingWindow{
			Reason: v1alpha1.WindowBootConfig, Opened: metav1.NewTime(now), Expires: metav1.NewTime(now.Add(window)),
			By: "enrollment configuration fetched from " + src.String(),
		}}},
	}
	if err := st.Create(ctx, rec); errors.Is(err, errExists) {
		return ExpectBoundElsewhere, nil // a concurrent fetch won
	} else if err != nil {
		return "", fmt.Errorf("recording the machine %s: %w", uuid, err)
	}
	claim := &v1alpha1.UUIDClaim{
		ObjectMeta: metav1.ObjectMeta{Name: uuid, OwnerReferences: []metav1.OwnerReference{{
			APIVersion: v1alpha1.GroupVersion.String(), Kind: "SovraNode", Name: rec.Name, UID: rec.UID,
		}}},
		Spec: v1alpha1.UUIDClaimSpec{Node: rec.Name, NodeUID: rec.UID},
	}
	if err := st.CreateClaim(ctx, claim); err != nil {
		// An enrollment or another fetch claimed the UUID meanwhile: ours
		// must not stand beside it.
		if derr := st.Delete(ctx, rec); derr != nil {
			s.logger.Error("removing a pending record that lost its UUID", zap.String("node", rec.Name), zap.Error(derr))
		}
		if errors.Is(err, errExists) {
			return ExpectKnown, nil
		}
		return "", fmt.Errorf("claiming the UUID of machine %s: %w", uuid, err)
	}
	s.logger.Info("enrollment configuration fetched by a new machine: it may seal its first volumes from its address",
		zap.String("node", rec.Name), zap.String("node_uuid", uuid), zap.Stringer("source", src),
		zap.Time("window_expires", now.Add(window)))
	s.event(rec, false, "EnrollmentConfigFetched", fmt.Sprintf(
		"a new machine fetched the enrollment configuration from %s: it may seal its first volumes from there until %s, and must enroll with its TPM from there",
		src, now.Add(window).UTC().Format(time.RFC3339)))
	return ExpectCreated, nil
}

// expectKnown audits a fetch for a UUID a record holds.
func (s *Service) expectKnown(rec *v1alpha1.SovraNode, uuid string, src netip.Addr) Expectation {
	switch {
	case rec != nil && isLab(rec) && knowsAddress(rec, src):
		return ExpectPending
	case rec != nil && isLab(rec):
		s.logger.Warn("enrollment configuration fetched for a pending machine from another address: nothing opened",
			zap.String("node", rec.Name), zap.String("node_uuid", uuid), zap.Stringer("source", src),
			zap.String("bound_to", strings.Join(rec.Spec.Addresses, ",")))
		s.event(rec, true, "EnrollmentConfigConflict", fmt.Sprintf(
			"the enrollment configuration of this pending machine was fetched again from %s; it is bound to %s: nothing opened (delete this record if the machine moved)",
			src, strings.Join(rec.Spec.Addresses, ",")))
		return ExpectBoundElsewhere
	case rec != nil:
		s.logger.Info("enrollment configuration fetched for a known machine's UUID: no sealing window opened",
			zap.String("node", rec.Name), zap.String("node_uuid", uuid), zap.Stringer("source", src))
		warning := !knowsAddress(rec, src)
		s.event(rec, warning, "EnrollmentConfigFetched", fmt.Sprintf(
			"the enrollment configuration was fetched for this node's UUID from %s: no sealing window opened (a released host seals under its wipe window)", src))
	default:
		s.logger.Warn("enrollment configuration fetched for a UUID whose claim has no single record: nothing opened",
			zap.String("node_uuid", uuid), zap.Stringer("source", src))
	}
	return ExpectKnown
}

// freshSealFrom reports whether blob (a fingerprint) was sealed for rec from
// src within FreshSealWindow before now: what a pending record may open.
func freshSealFrom(rec *v1alpha1.SovraNode, blob string, src netip.Addr, now time.Time) bool {
	if rec.Status.Sealing == nil {
		return false
	}
	for _, sb := range rec.Status.Sealing.Recent {
		if sb.Blob == blob && sb.Source == src.Unmap().String() && !now.Before(sb.At.Time) && now.Sub(sb.At.Time) <= FreshSealWindow {
			return true
		}
	}
	return false
}
