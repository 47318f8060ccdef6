package attestation

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/internal/attest"
	"github.com/sovra-dev/sovra/internal/claims"
)

// maxCSRLen bounds a node's certificate request.
const maxCSRLen = 4096

// AttestRequest is what a node sends to attest.
type AttestRequest struct {
	Node      string
	Nonce     []byte
	Claims    []byte
	Quote     []byte
	Signature []byte
	PCRHash   uint16
	PCRs      map[int][]byte
	EventLog  []byte
	CSR       []byte
}

// AttestResult is a passing attestation.
type AttestResult struct {
	// Chain is the node certificate (DER) then the node CA.
	Chain    [][]byte
	Expires  time.Time
	Warnings []string
}

// Attest judges an attestation. Order: request shape, node record, nonce
// (checked statelessly), evidence against the pinned AK, then the nonce's use
// is recorded (only a quote the node's TPM signed consumes a nonce), the
// node key binding, the reported boot, the policies, the verdict in the
// record, and only then the credential. Evidence that fails before it is
// authenticated by the pinned AK changes nothing; authenticated evidence that
// fails (event log, policy) marks the node not attested. A verdict that cannot
// be recorded issues no credential.
func (s *Service) Attest(ctx context.Context, req AttestRequest) (*AttestResult, error) {
	if err := checkNodeName(req.Node); err != nil {
		return nil, err
	}
	if len(req.CSR) == 0 || len(req.CSR) > maxCSRLen {
		return nil, fmt.Errorf("%w: certificate request of %d bytes, want 1 to %d", ErrInvalid, len(req.CSR), maxCSRLen)
	}
	node, err := s.store.GetNode(ctx, req.Node)
	if err != nil {
		return nil, fmt.Errorf("attesting node %s: %w", req.Node, err)
	}
	if len(node.Spec.AKPublic) == 0 {
		// Pre-registered by an operator: the agent enrolls on NotFound.
		return nil, fmt.Errorf("attesting node %s: %w: the record was created before the node enrolled; enroll first", req.Node, ErrNodeNotFound)
	}
	exp, err := s.checkNonce(req.Node, req.Nonce)
	if err != nil {
		s.deny(req.Node, v1alpha1.ReasonEvidenceRejected, err)
		return nil, err
	}
	v, err := attest.Verify(attest.Evidence{
		AKPublic: node.Spec.AKPublic, Nonce: req.Nonce, Claims: req.Claims,
		Quote: req.Quote, Signature: req.Signature, PCRHash: req.PCRHash,
		PCRs: req.PCRs, EventLog: req.EventLog,
	})
	switch {
	case errors.Is(err, attest.ErrEventLog):
		// The quote is the TPM's, fresh and bound: the boot it describes is
		// not the one the log claims.
		if err := s.useNonce(ctx, req.Node, req.Nonce, exp); err != nil {
			return nil, err
		}
		if err := s.fail(ctx, node, nil, v1alpha1.ReasonEventLogMismatch, err.Error()); err != nil {
			return nil, err
		}
		return nil, fmt.Errorf("%w: %w", ErrRefused, err)
	case errors.Is(err, attest.ErrMalformed):
		s.deny(req.Node, v1alpha1.ReasonEvidenceRejected, err)
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	case err != nil:
		s.deny(req.Node, v1alpha1.ReasonEvidenceRejected, err)
		return nil, fmt.Errorf("%w: %w", ErrRefused, err)
	}
	if err := s.useNonce(ctx, req.Node, req.Nonce, exp); err != nil {
		s.deny(req.Node, v1alpha1.ReasonEvidenceRejected, err)
		return nil, err
	}
	csr, err := checkCSR(req.CSR, v.Claims)
	if err != nil {
		s.deny(req.Node, v1alpha1.ReasonEvidenceRejected, err)
		return nil, err
	}
	boot, err := reportedBoot(v.Claims, s.clock.Now())
	if err != nil {
		s.deny(req.Node, v1alpha1.ReasonEvidenceRejected, err)
		return nil, err
	}
	policies, err := s.policiesFor(ctx, node)
	if err != nil {
		return nil, err
	}
	out := attest.Evaluate(v, policies...)
	if !out.Passed() {
		msg := strings.Join(out.Of(attest.Enforce), "; ")
		if err := s.fail(ctx, node, boot, v1alpha1.ReasonPolicyViolation, msg); err != nil {
			return nil, err
		}
		return nil, fmt.Errorf("%w: policy violated: %s", ErrRefused, msg)
	}
	names := make([]string, 0, len(policies))
	for _, p := range policies {
		names = append(names, p.Name)
	}
	if err := s.pass(ctx, node, boot, v, out.Of(attest.Warn), names); err != nil {
		return nil, err
	}
	chain, exp, err := s.issue(node, boot.ID, csr)
	if err != nil {
		return nil, err
	}
	return &AttestResult{Chain: chain, Expires: exp, Warnings: out.Of(attest.Warn)}, nil
}

// Limits on a reported boot.
const (
	maxBootIDLen = 64
	// bootSkew tolerates a node clock ahead of the daemon's.
	bootSkew = 5 * time.Minute
)

// reportedBoot reads the boot the quoted claims report.
func reportedBoot(cs claims.Set, now time.Time) (*v1alpha1.Boot, error) {
	id, ok := cs.Value(claims.BootID)
	if !ok || id == "" || len(id) > maxBootIDLen {
		return nil, fmt.Errorf("%w: the attestation reports no boot (claim %s); update the agent", ErrInvalid, claims.BootID)
	}
	started, ok := cs.Value(claims.BootStarted)
	sec, err := strconv.ParseInt(started, 10, 64)
	if !ok || err != nil || sec <= 0 || time.Unix(sec, 0).After(now.Add(bootSkew)) {
		return nil, fmt.Errorf("%w: the attestation reports no valid boot start (claim %s); update the agent or fix the node's clock", ErrInvalid, claims.BootStarted)
	}
	return &v1alpha1.Boot{ID: id, Started: metav1.NewTime(time.Unix(sec, 0))}, nil
}

// policiesFor returns the policies that apply to node. A policy whose
// selector does not parse applies to every node, and a policy that cannot be
// evaluated fails every node it applies to: a broken policy fails closed.
func (s *Service) policiesFor(ctx context.Context, node *v1alpha1.SovraNode) ([]attest.Policy, error) {
	list, err := s.store.ListPolicies(ctx)
	if err != nil {
		return nil, fmt.Errorf("listing attestation policies: %w", err)
	}
	var out []attest.Policy
	for _, p := range list {
		var broken error
		if p.Spec.NodeSelector != nil {
			sel, err := metav1.LabelSelectorAsSelector(p.Spec.NodeSelector.LabelSelector())
			switch {
			case err != nil:
				broken = fmt.Errorf("its node selector does not parse: %w", err)
			case !sel.Matches(labels.Set(node.Labels)):
				continue
			}
		}
		ap, err := convertPolicy(p)
		if broken == nil {
			broken = err
		}
		if broken != nil {
			s.logger.Warn("attestation policy cannot be evaluated; it fails every node it may select until fixed",
				zap.String("policy", p.Name), zap.Error(broken))
			ap = attest.Policy{Name: p.Name, Claims: []attest.ClaimRule{{
				Name: "policy-valid", Values: []string{"-"}, Mode: attest.Enforce,
			}}}
		}
		out = append(out, ap)
	}
	return out, nil
}

func convertPolicy(p v1alpha1.AttestationPolicy) (attest.Policy, error) {
	out := attest.Policy{Name: p.Name}
	for _, r := range p.Spec.PCRs {
		pr := attest.PCRRule{Index: r.Index, Mode: mode(r.Mode)}
		for _, v := range r.Values {
			d, err := hex.DecodeString(strings.TrimPrefix(strings.ToLower(v), "0x"))
			if err != nil || len(d) != 32 {
				return attest.Policy{}, fmt.Errorf("PCR %d value %q is not a hex SHA-256 digest", r.Index, v)
			}
			pr.Values = append(pr.Values, d)
		}
		out.PCRs = append(out.PCRs, pr)
	}
	for _, r := range p.Spec.Claims {
		out.Claims = append(out.Claims, attest.ClaimRule{Name: r.Name, Values: r.Values, Mode: mode(r.Mode)})
	}
	return out, nil
}

func mode(m v1alpha1.Mode) attest.Mode {
	if m == v1alpha1.ModeWarn {
		return attest.Warn
	}
	return attest.Enforce
}

// pass records a passing attestation of boot.
func (s *Service) pass(ctx context.Context, node *v1alpha1.SovraNode, boot *v1alpha1.Boot, v *attest.Verified, warnings, policies []string) error {
	now := metav1.NewTime(s.clock.Now())
	msg := "quote verified with the pinned AK, event log replayed, policy passed"
	if len(warnings) > 0 {
		msg += " with warnings: " + strings.Join(warnings, "; ")
	}
	err := s.updateStatus(ctx, node, func(n *v1alpha1.SovraNode) {
		n.Status.LastAttestationTime = &now
		n.Status.LastAttestationResult = v1alpha1.ResultPassed
		n.Status.Reason, n.Status.Message, n.Status.Warnings = v1alpha1.ReasonAttestationPassed, msg, warnings
		n.Status.Policies = policies
		n.Status.PCRs = map[string]string{}
		for i, d := range v.PCRs {
			n.Status.PCRs[strconv.Itoa(i)] = hex.EncodeToString(d)
		}
		n.Status.Claims = map[string]string{}
		for name, c := range v.Claims {
			if name == claims.NodeKeySHA256 {
				continue
			}
			if c.Err != "" {
				n.Status.Claims[name] = "error: " + c.Err
			} else {
				n.Status.Claims[name] = c.Value
			}
		}
		recordBoot(n, boot, v1alpha1.ResultPassed, now)
		meta.SetStatusCondition(&n.Status.Conditions, metav1.Condition{
			Type: v1alpha1.ConditionAttested, Status: metav1.ConditionTrue,
			Reason: v1alpha1.ReasonAttestationPassed, Message: msg, LastTransitionTime: now,
		})
	})
	if err != nil {
		return err
	}
	reason := v1alpha1.ReasonAttestationPassed
	if len(warnings) > 0 {
		reason = reasonPolicyWarnings
	}
	countVerdict(resultPassed, reason)
	s.store.Event(ctx, node, false, v1alpha1.ReasonAttestationPassed, msg+"; boot "+boot.ID)
	s.logger.Info("attested", zap.String("node", node.Name), zap.String("boot", boot.ID), zap.Strings("warnings", warnings))
	return nil
}

// fail records an authenticated attestation that failed; boot is nil when
// the evidence could not say which boot it was.
func (s *Service) fail(ctx context.Context, node *v1alpha1.SovraNode, boot *v1alpha1.Boot, reason, msg string) error {
	now := metav1.NewTime(s.clock.Now())
	err := s.updateStatus(ctx, node, func(n *v1alpha1.SovraNode) {
		n.Status.LastAttestationTime = &now
		n.Status.LastAttestationResult = v1alpha1.ResultFailed
		n.Status.Reason, n.Status.Message, n.Status.Warnings = reason, msg, nil
		if boot != nil {
			recordBoot(n, boot, v1alpha1.ResultFailed, now)
		}
		meta.SetStatusCondition(&n.Status.Conditions, metav1.Condition{
			Type: v1alpha1.ConditionAttested, Status: metav1.ConditionFalse,
			Reason: reason, Message: msg, LastTransitionTime: now,
		})
	})
	if err != nil {
		return err
	}
	countVerdict(resultFailed, reason)
	s.store.Event(ctx, node, true, reason, msg)
	s.logger.Warn("attestation failed", zap.String("node", node.Name), zap.String("reason", reason), zap.String("message", msg))
	return nil
}

// recordBoot puts boot first in n's boots (updating it when known) and
// keeps at most MaxBoots.
func recordBoot(n *v1alpha1.SovraNode, boot *v1alpha1.Boot, result string, now metav1.Time) {
	b := *boot
	b.FirstAttested, b.LastAttested, b.Result, b.Passed = now, now, result, nil
	if result == v1alpha1.ResultPassed {
		b.Passed = &now
	}
	boots := []v1alpha1.Boot{b}
	for _, old := range n.Status.Boots {
		if old.ID == b.ID {
			boots[0].FirstAttested = old.FirstAttested
			if old.Passed != nil {
				boots[0].Passed = old.Passed
			}
			continue
		}
		if len(boots) < v1alpha1.MaxBoots {
			boots = append(boots, old)
		}
	}
	n.Status.Boots = boots
}

// statusAttempts bounds the retries of a verdict write on conflicts.
const statusAttempts = 5

// updateStatus applies mutate to the freshest copy of the node, retrying on
// conflicts with other replicas, and returns an error when the verdict could
// not be recorded (the caller then issues nothing).
func (s *Service) updateStatus(ctx context.Context, node *v1alpha1.SovraNode, mutate func(*v1alpha1.SovraNode)) error {
	n := node
	for range statusAttempts {
		mutate(n)
		err := s.store.UpdateNodeStatus(ctx, n)
		if err == nil {
			*node = *n
			return nil
		}
		if !errors.Is(err, ErrConflict) {
			s.logger.Error("recording attestation result", zap.String("node", node.Name), zap.Error(err))
			return fmt.Errorf("recording the verdict of node %s: %w", node.Name, err)
		}
		fresh, err := s.store.GetNode(ctx, node.Name)
		if err != nil {
			s.logger.Error("recording attestation result", zap.String("node", node.Name), zap.Error(err))
			return fmt.Errorf("recording the verdict of node %s: %w", node.Name, err)
		}
		if fresh.UID != node.UID || !bytes.Equal(fresh.Spec.AKPublic, node.Spec.AKPublic) {
			// Revoked and enrolled again, or a new AK: this verdict is not
			// about the record that is there now.
			return fmt.Errorf("%w: the record of node %s changed while it attested; attest again", ErrConflict, node.Name)
		}
		n = fresh
	}
	s.logger.Error("recording attestation result: too many conflicts", zap.String("node", node.Name))
	return fmt.Errorf("%w: recording the verdict of node %s", ErrConflict, node.Name)
}
