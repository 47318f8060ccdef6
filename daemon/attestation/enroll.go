package attestation

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"slices"
	"time"

	goattest "github.com/google/go-attestation/attest"
	"go.uber.org/zap"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/metrics"
	"github.com/sovra-dev/sovra/internal/attest"
)

// Limits on enrollment claims.
const (
	maxHostnameLen = 253
	maxAddresses   = 16
)

// uuidPattern is an SMBIOS UUID in its canonical text form.
var uuidPattern = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)

// EnrollRequest is what a node sends to begin enrollment.
type EnrollRequest struct {
	EKCertificate, EKPublic []byte
	AK                      goattest.AttestationParameters
	UUID, Hostname          string
	Addresses               []string
	// Peer is the address the request came from, recorded with the claims.
	Peer string
}

// Enrollment is a challenge in flight. It lives only in the memory of the
// replica that made it and holds the secret the node must return.
type Enrollment struct {
	req    EnrollRequest
	ek     *attest.EK
	secret []byte
	// Node is the name the node will have.
	Node string
}

// BeginEnrollment admits the EK by policy and returns a credential
// activation challenge for the AK. Nothing is stored.
func (s *Service) BeginEnrollment(ctx context.Context, req EnrollRequest) (_ *Enrollment, _ *goattest.EncryptedCredential, err error) {
	method := methodNone // until the EK is admitted
	defer func() {
		if err != nil {
			countEnrollment(method, err)
		}
	}()
	if err := checkEnrollClaims(req); err != nil {
		return nil, nil, err
	}
	ek, err := attest.ParseEK(req.EKCertificate, req.EKPublic)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	name := NodeName(ek.Hash)
	if err := s.cfg.EK.Admit(ek, s.clock.Now()); err != nil {
		return nil, nil, s.refuseEnrollment(ctx, req, name, err)
	}
	method = ek.Method
	if ek.Method == attest.EKByTOFU {
		s.logger.Warn("EK admitted by trust on first use", zap.String("node", name), zap.String("ek_hash", ek.Hash))
	}
	secret, ec, err := attest.Challenge(ek, req.AK, nil)
	if err != nil {
		if errors.Is(err, attest.ErrAKMalformed) {
			return nil, nil, s.refuseEnrollment(ctx, req, name, err)
		}
		return nil, nil, fmt.Errorf("challenging AK of node %s: %w", name, err)
	}
	return &Enrollment{req: req, ek: ek, secret: secret, Node: name}, ec, nil
}

// refuseEnrollment refuses the TPM of req (node is the name its EK would
// have): a log line, and an event on the pending record of the machine that
// asked.
func (s *Service) refuseEnrollment(ctx context.Context, req EnrollRequest, node string, err error) error {
	s.deny(node, "EnrollmentDenied", err)
	s.auditPending(ctx, req, err)
	return fmt.Errorf("%w: %w", ErrRefused, err)
}

// auditPending records a refused enrollment as a Warning event on the
// pending record of the machine that asked: the record its fetch of the
// enrollment configuration made for the UUID (package kms), when the
// request comes from the address that fetched. The operator who booted the
// machine sees there why it never becomes a host; the log line alone names
// only the EK. A refusal makes no other state, and this much is bounded: it
// needs a pending record (the boot server bounds them) and its address, and
// makes at most one event per UUID and pendingDenialEvery.
func (s *Service) auditPending(ctx context.Context, req EnrollRequest, err error) {
	host, _, perr := net.SplitHostPort(req.Peer)
	from, aerr := netip.ParseAddr(host)
	if req.UUID == "" || perr != nil || aerr != nil || !s.pendingDenials.Allow(req.UUID, s.clock.Now()) {
		return
	}
	c, cerr := s.store.GetClaim(ctx, req.UUID)
	if cerr != nil {
		return
	}
	rec, gerr := s.store.GetNode(ctx, c.Spec.Node)
	if gerr != nil || !isLabRecord(rec) || rec.UID != c.Spec.NodeUID || !slices.Contains(rec.Spec.Addresses, from.Unmap().String()) {
		return
	}
	s.store.Event(ctx, rec, true, "EnrollmentDenied", fmt.Sprintf(
		"the machine that fetched the enrollment configuration from %s was refused enrollment: %v; it gets no configuration and will not become a host",
		from.Unmap(), err))
}

// FinishEnrollment checks the node's answer and, when it matches, binds its
// UUID (a UUIDClaim, created atomically) and pins the AK to the EK in the
// node's record (creating it, or replacing the AK of an existing record,
// which resets its attestation). A record that never sealed gets a sealing
// window, so the node may format its volumes now.
func (s *Service) FinishEnrollment(ctx context.Context, e *Enrollment, answer []byte) (_ *v1alpha1.SovraNode, err error) {
	defer func() { countEnrollment(e.ek.Method, err) }()
	if err := attest.CheckActivation(e.secret, answer); err != nil {
		s.deny(e.Node, "EnrollmentDenied", err)
		return nil, fmt.Errorf("%w: %w", ErrRefused, err)
	}
	now := metav1.NewTime(s.clock.Now())
	ekPub, err := ekPKIX(e.ek)
	if err != nil {
		return nil, err
	}
	spec := v1alpha1.SovraNodeSpec{
		EKHash:    e.ek.Hash,
		EKPublic:  ekPub,
		AKPublic:  e.req.AK.Public,
		UUID:      e.req.UUID,
		Hostname:  e.req.Hostname,
		Addresses: addresses(e.req),
	}
	if e.ek.Certificate != nil {
		spec.EKCertificate = e.ek.Certificate.Raw
	}
	if err := s.checkUUIDFree(ctx, e); err != nil {
		return nil, err
	}
	if err := s.claimUUID(ctx, e); err != nil {
		return nil, err
	}
	node, err := s.store.GetNode(ctx, e.Node)
	window := false // the enrollment opened a sealing window
	switch {
	case errors.Is(err, ErrNodeNotFound):
		node = &v1alpha1.SovraNode{ObjectMeta: metav1.ObjectMeta{Name: e.Node}, Spec: spec}
		setUUIDLabel(node)
		window = s.setEnrolled(node, e.ek.Method, now)
		if err := s.store.CreateNode(ctx, node); err != nil {
			return nil, fmt.Errorf("creating record of node %s: %w", e.Node, err)
		}
	case err != nil:
		return nil, fmt.Errorf("reading record of node %s: %w", e.Node, err)
	default:
		if node.Spec.EKHash != e.ek.Hash {
			err := fmt.Errorf("record %s belongs to another EK", e.Node)
			s.deny(e.Node, "EnrollmentDenied", err)
			return nil, fmt.Errorf("%w: %w", ErrRefused, err)
		}
		node.Spec = spec
		setUUIDLabel(node)
		if err := s.store.UpdateNode(ctx, node); err != nil {
			return nil, fmt.Errorf("pinning new AK of node %s: %w", e.Node, err)
		}
		window = s.setEnrolled(node, e.ek.Method, now)
		if err := s.store.UpdateNodeStatus(ctx, node); err != nil {
			return nil, fmt.Errorf("recording enrollment of node %s: %w", e.Node, err)
		}
	}
	if err := s.bindClaim(ctx, e.req.UUID, node); err != nil {
		return nil, err
	}
	msg := fmt.Sprintf("AK activated against EK %s (admitted by %s)", e.ek.Hash, e.ek.Method)
	s.store.Event(ctx, node, false, "Enrolled", msg)
	s.logger.Info("enrolled", zap.String("node", e.Node), zap.String("ek_hash", e.ek.Hash),
		zap.String("method", e.ek.Method), zap.String("uuid", e.req.UUID))
	if window {
		metrics.SealingWindowsOpened.WithLabelValues(v1alpha1.WindowEnrollment).Inc()
	}
	return node, nil
}

// checkUUIDFree refuses a UUID that another EK's record claims (a record an
// operator made, which may hold no UUIDClaim): the UUID is how Talos names
// the node to the KMS, so it stays bound to one TPM until that node's record
// is deleted. Lab records (package kms) are adopted, not in the way.
func (s *Service) checkUUIDFree(ctx context.Context, e *Enrollment) error {
	if e.req.UUID == "" {
		return nil
	}
	nodes, err := s.store.NodesByUUID(ctx, e.req.UUID)
	if err != nil {
		return fmt.Errorf("checking UUID of node %s: %w", e.Node, err)
	}
	for _, n := range nodes {
		if n.Spec.EKHash != e.ek.Hash && !isLabRecord(&n) {
			return s.uuidTaken(e, n.Name)
		}
	}
	return nil
}

func (s *Service) uuidTaken(e *Enrollment, holder string) error {
	err := fmt.Errorf("UUID %s is bound to node %s (another EK); delete that SovraNode to bind it to this TPM", e.req.UUID, holder)
	s.deny(e.Node, "EnrollmentDenied", err)
	return fmt.Errorf("%w: %w", ErrRefused, err)
}

// claimAttempts bounds the compare-and-swap rounds of claimUUID.
const claimAttempts = 5

// claimUUID makes the UUIDClaim of the enrollment's UUID name its record.
// Creating the claim is atomic, so of two TPMs enrolling with one UUID at
// once, on one replica or two, one wins and the other is refused. A claim of
// a record that is gone, or of a lab record, passes to the enrolling node; a
// fresh claim whose record does not exist yet is another enrollment in
// flight, and this one is asked to retry.
func (s *Service) claimUUID(ctx context.Context, e *Enrollment) error {
	uuid := e.req.UUID
	if uuid == "" {
		return nil
	}
	for range claimAttempts {
		c, err := s.store.GetClaim(ctx, uuid)
		switch {
		case errors.Is(err, ErrClaimNotFound):
			err = s.store.CreateClaim(ctx, &v1alpha1.UUIDClaim{
				ObjectMeta: metav1.ObjectMeta{Name: uuid},
				Spec:       v1alpha1.UUIDClaimSpec{Node: e.Node},
			})
			if errors.Is(err, ErrConflict) {
				continue // another enrollment created it first: look at it
			}
			return err
		case err != nil:
			return err
		case c.Spec.Node == e.Node:
			return nil // ours; bindClaim names this record instance
		}
		holder, err := s.store.GetNode(ctx, c.Spec.Node)
		switch {
		case err != nil && !errors.Is(err, ErrNodeNotFound):
			return fmt.Errorf("reading the holder of UUID %s: %w", uuid, err)
		case err == nil && (c.Spec.NodeUID == "" || c.Spec.NodeUID == holder.UID) && !isLabRecord(holder):
			return s.uuidTaken(e, holder.Name)
		case err == nil && isLabRecord(holder):
			// A lab record sealed for this UUID before the node enrolled:
			// the node takes the claim, the KMS moves the salt.
			c.Spec = v1alpha1.UUIDClaimSpec{Node: e.Node}
			c.OwnerReferences = nil
			if err := s.store.UpdateClaim(ctx, c); errors.Is(err, ErrConflict) {
				continue
			} else if err != nil {
				return err
			}
			return nil
		case c.Spec.NodeUID == "" && s.clock.Now().Sub(c.CreationTimestamp.Time) < claimInFlight:
			return fmt.Errorf("%w: another enrollment of UUID %s is in progress; retry", ErrConflict, uuid)
		}
		// The holder is gone (or was re-created): the claim is stale.
		if err := s.store.DeleteClaim(ctx, c); err != nil && !errors.Is(err, ErrConflict) {
			return err
		}
	}
	return fmt.Errorf("%w: the claim of UUID %s kept changing; retry", ErrConflict, uuid)
}

// claimInFlight is how long a claim whose record does not exist yet is
// taken for an enrollment in progress: an enrollment's round trip.
const claimInFlight = 2 * time.Minute

// bindClaim names the record instance in the UUID's claim and makes the
// record its owner, so that deleting the record deletes the claim.
func (s *Service) bindClaim(ctx context.Context, uuid string, node *v1alpha1.SovraNode) error {
	if uuid == "" {
		return nil
	}
	for range claimAttempts {
		c, err := s.store.GetClaim(ctx, uuid)
		if err != nil {
			return fmt.Errorf("binding UUID %s to node %s: %w", uuid, node.Name, err)
		}
		if c.Spec.Node != node.Name {
			return fmt.Errorf("%w: UUID %s was claimed by node %s meanwhile", ErrRefused, uuid, c.Spec.Node)
		}
		owner := metav1.OwnerReference{
			APIVersion: v1alpha1.GroupVersion.String(), Kind: "SovraNode", Name: node.Name, UID: node.UID,
		}
		if c.Spec.NodeUID == node.UID && len(c.OwnerReferences) == 1 && c.OwnerReferences[0] == owner {
			return nil
		}
		c.Spec.NodeUID = node.UID
		c.OwnerReferences = []metav1.OwnerReference{owner}
		if err := s.store.UpdateClaim(ctx, c); errors.Is(err, ErrConflict) {
			continue
		} else if err != nil {
			return err
		}
		return nil
	}
	return fmt.Errorf("%w: the claim of UUID %s kept changing; retry", ErrConflict, uuid)
}

func isLabRecord(n *v1alpha1.SovraNode) bool { return n.Labels[v1alpha1.LabelLabPending] == "true" }

func setUUIDLabel(n *v1alpha1.SovraNode) {
	if n.Spec.UUID == "" {
		delete(n.Labels, v1alpha1.LabelUUID)
		return
	}
	if n.Labels == nil {
		n.Labels = map[string]string{}
	}
	n.Labels[v1alpha1.LabelUUID] = n.Spec.UUID
}

// setEnrolled records an enrollment in n's status; a node that never sealed
// gets a sealing window for its first install, and it reports so.
func (s *Service) setEnrolled(n *v1alpha1.SovraNode, method string, now metav1.Time) (window bool) {
	if n.Status.Sealing == nil || n.Status.Sealing.FirstSealed == nil {
		window = true
		if n.Status.Sealing == nil {
			n.Status.Sealing = &v1alpha1.Sealing{}
		}
		n.Status.Sealing.Window = &v1alpha1.SealingWindow{
			Reason: v1alpha1.WindowEnrollment, Opened: now,
			Expires: metav1.NewTime(now.Add(s.cfg.SealWindow)), By: "enrollment",
		}
	}
	n.Status.EnrolledAt = &now
	n.Status.EnrollmentMethod = method
	meta.SetStatusCondition(&n.Status.Conditions, metav1.Condition{
		Type: v1alpha1.ConditionEnrolled, Status: metav1.ConditionTrue,
		Reason: v1alpha1.ReasonActivated, Message: "AK activated against the EK by method " + method,
		LastTransitionTime: now,
	})
	meta.SetStatusCondition(&n.Status.Conditions, metav1.Condition{
		Type: v1alpha1.ConditionAttested, Status: metav1.ConditionFalse,
		Reason: v1alpha1.ReasonNotAttested, Message: "enrolled with a new AK; waiting for an attestation",
		LastTransitionTime: now,
	})
	n.Status.LastAttestationResult, n.Status.Reason, n.Status.Message = "", v1alpha1.ReasonNotAttested, ""
	return window
}

func checkEnrollClaims(r EnrollRequest) error {
	switch {
	case r.UUID != "" && !uuidPattern.MatchString(r.UUID):
		return fmt.Errorf("%w: UUID %q is not a canonical lower-case SMBIOS UUID", ErrInvalid, r.UUID)
	case len(r.Hostname) > maxHostnameLen:
		return fmt.Errorf("%w: hostname of %d bytes, at most %d", ErrInvalid, len(r.Hostname), maxHostnameLen)
	case len(r.Addresses) > maxAddresses:
		return fmt.Errorf("%w: %d addresses, at most %d", ErrInvalid, len(r.Addresses), maxAddresses)
	}
	for _, a := range r.Addresses {
		if net.ParseIP(a) == nil {
			return fmt.Errorf("%w: address %q is not an IP", ErrInvalid, a)
		}
	}
	return nil
}

// addresses are the claimed addresses plus the one the request came from.
func addresses(r EnrollRequest) []string {
	out := slices.Clone(r.Addresses)
	if host, _, err := net.SplitHostPort(r.Peer); err == nil && !slices.Contains(out, host) {
		out = append(out, host)
	}
	return out
}
