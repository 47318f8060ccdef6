package attestation

import (
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
// (consumed once), evidence against the pinned AK, policy, node key binding,
// then the certificate. Evidence that fails before it is authenticated by
// the pinned AK changes no record; authenticated evidence that fails (event
// log, policy) marks the node not attested.
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
	if err := s.consumeNonce(ctx, req.Node, req.Nonce); err != nil {
		s.deny(ctx, req.Node, v1alpha1.ReasonEvidenceRejected, err)
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
		s.fail(ctx, node, v1alpha1.ReasonEventLogMismatch, err.Error())
		return nil, fmt.Errorf("%w: %w", ErrRefused, err)
	case errors.Is(err, attest.ErrMalformed):
		s.deny(ctx, req.Node, v1alpha1.ReasonEvidenceRejected, err)
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	case err != nil:
		s.deny(ctx, req.Node, v1alpha1.ReasonEvidenceRejected, err)
		return nil, fmt.Errorf("%w: %w", ErrRefused, err)
	}
	csr, err := checkCSR(req.CSR, v.Claims)
	if err != nil {
		s.deny(ctx, req.Node, v1alpha1.ReasonEvidenceRejected, err)
		return nil, err
	}
	policies, err := s.policiesFor(ctx, node)
	if err != nil {
		return nil, err
	}
	out := attest.Evaluate(v, policies...)
	if !out.Passed() {
		msg := strings.Join(out.Of(attest.Enforce), "; ")
		s.fail(ctx, node, v1alpha1.ReasonPolicyViolation, msg)
		return nil, fmt.Errorf("%w: policy violated: %s", ErrRefused, msg)
	}
	chain, exp, err := s.issue(node.Name, csr)
	if err != nil {
		return nil, err
	}
	s.pass(ctx, node, v, out.Of(attest.Warn))
	return &AttestResult{Chain: chain, Expires: exp, Warnings: out.Of(attest.Warn)}, nil
}

func (s *Service) policiesFor(ctx context.Context, node *v1alpha1.SovraNode) ([]attest.Policy, error) {
	list, err := s.store.ListPolicies(ctx)
	if err != nil {
		return nil, fmt.Errorf("listing attestation policies: %w", err)
	}
	var out []attest.Policy
	for _, p := range list {
		if p.Spec.NodeSelector != nil {
			sel, err := metav1.LabelSelectorAsSelector(p.Spec.NodeSelector)
			if err != nil {
				s.logger.Warn("attestation policy has an invalid selector; it enforces nothing until fixed",
					zap.String("policy", p.Name), zap.Error(err))
				continue
			}
			if !sel.Matches(labels.Set(node.Labels)) {
				continue
			}
		}
		ap, err := convertPolicy(p)
		if err != nil {
			// A broken policy must not let nodes pass: enforce a rule no node meets.
			ap = attest.Policy{Name: p.Name, Claims: []attest.ClaimRule{{Name: "policy-valid", Values: []string{"-"}, Mode: attest.Enforce}}}
			s.logger.Warn("attestation policy is invalid; it fails every node it selects", zap.String("policy", p.Name), zap.Error(err))
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

// pass records a passing attestation.
func (s *Service) pass(ctx context.Context, node *v1alpha1.SovraNode, v *attest.Verified, warnings []string) {
	now := metav1.NewTime(s.clock.Now())
	msg := "quote verified with the pinned AK, event log replayed, policy passed"
	if len(warnings) > 0 {
		msg += " with warnings: " + strings.Join(warnings, "; ")
	}
	s.updateStatus(ctx, node, func(n *v1alpha1.SovraNode) {
		n.Status.LastAttestationTime = &now
		n.Status.LastAttestationResult = v1alpha1.ResultPassed
		n.Status.Reason, n.Status.Message, n.Status.Warnings = v1alpha1.ReasonAttestationPassed, msg, warnings
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
		meta.SetStatusCondition(&n.Status.Conditions, metav1.Condition{
			Type: v1alpha1.ConditionAttested, Status: metav1.ConditionTrue,
			Reason: v1alpha1.ReasonAttestationPassed, Message: msg, LastTransitionTime: now,
		})
	})
	s.store.Event(ctx, node, false, v1alpha1.ReasonAttestationPassed, msg)
	s.logger.Info("attested", zap.String("node", node.Name), zap.Strings("warnings", warnings))
}

// fail records an authenticated attestation that failed.
func (s *Service) fail(ctx context.Context, node *v1alpha1.SovraNode, reason, msg string) {
	now := metav1.NewTime(s.clock.Now())
	s.updateStatus(ctx, node, func(n *v1alpha1.SovraNode) {
		n.Status.LastAttestationTime = &now
		n.Status.LastAttestationResult = v1alpha1.ResultFailed
		n.Status.Reason, n.Status.Message, n.Status.Warnings = reason, msg, nil
		meta.SetStatusCondition(&n.Status.Conditions, metav1.Condition{
			Type: v1alpha1.ConditionAttested, Status: metav1.ConditionFalse,
			Reason: reason, Message: msg, LastTransitionTime: now,
		})
	})
	s.store.Event(ctx, node, true, reason, msg)
	s.logger.Warn("attestation failed", zap.String("node", node.Name), zap.String("reason", reason), zap.String("message", msg))
}

// updateStatus applies mutate to the freshest copy of the node, retrying on
// conflicts with other replicas. A record that vanished (revoked) is left so.
func (s *Service) updateStatus(ctx context.Context, node *v1alpha1.SovraNode, mutate func(*v1alpha1.SovraNode)) {
	const attempts = 5
	n := node
	for range attempts {
		mutate(n)
		err := s.store.UpdateNodeStatus(ctx, n)
		if err == nil {
			*node = *n
			return
		}
		if !errors.Is(err, ErrConflict) {
			s.logger.Error("recording attestation result", zap.String("node", node.Name), zap.Error(err))
			return
		}
		if n, err = s.store.GetNode(ctx, node.Name); err != nil {
			s.logger.Error("recording attestation result", zap.String("node", node.Name), zap.Error(err))
			return
		}
	}
	s.logger.Error("recording attestation result: too many conflicts", zap.String("node", node.Name))
}
