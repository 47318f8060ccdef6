package attestation

import (
	"errors"
	"fmt"
	"path"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/selection"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/internal/claims"
)

// Capturing a policy: an operator takes a known-good machine as the
// reference for others like it. CapturePolicy writes an AttestationPolicy
// that requires the PCR values and claims of the node's last passing
// attestation (its status.pcrs and status.claims), which the operator
// reviews and applies, in Warn mode first.

// Annotations of a captured policy: where it came from.
const (
	AnnotationCapturedFrom = "sovra.dev/captured-from"
	AnnotationCapturedAt   = "sovra.dev/captured-attestation"
	// capturedPrefix prefixes the default name of a captured policy.
	capturedPrefix = "captured-"
)

// PolicyPCRs are the PCRs a policy may name: the ones the agent quotes
// (the CRD refuses others).
var PolicyPCRs = []int{0, 1, 2, 3, 4, 5, 6, 7, 11}

// DefaultCaptureClaims are the claims a captured policy requires unless
// told otherwise: names, or prefixes ending in "*".
var DefaultCaptureClaims = []string{claims.SecureBoot, claims.Lockdown, "lsm.*", claims.TalosVersion, claims.ExtensionPrefix + "*"}

// perBootClaims differ on every boot of one machine: a rule on them could
// never pass twice, so a captured policy never holds them.
var perBootClaims = []string{claims.NodeKeySHA256, claims.BootID, claims.BootStarted}

var (
	// claimNamePattern is the CRD's pattern of a claim rule's name.
	claimNamePattern = regexp.MustCompile(`^[!#-\[\]-~]+$`)
	// pcrValuePattern is a PCR value as status.pcrs holds it.
	pcrValuePattern = regexp.MustCompile(`^[0-9a-f]{64}$`)
)

// maxClaimNameLen is the CRD's limit on a claim rule's name.
const maxClaimNameLen = 128

// claimErrorPrefix marks a claim the node could not read (see pass).
const claimErrorPrefix = "error: "

// ErrNotReference is what CapturePolicy returns for a node that cannot be a
// reference: its last attestation did not pass, or it is quarantined.
var ErrNotReference = errors.New("the node cannot be a reference")

// CaptureOptions say what CapturePolicy takes from the node.
type CaptureOptions struct {
	// Name is the policy's name; empty means "captured-" and the node's.
	Name string
	// Mode is every rule's mode; empty means ModeWarn.
	Mode v1alpha1.Mode
	// Selector selects the nodes the policy judges; nil selects every node.
	Selector *v1alpha1.NodeSelector
	// Claims are the claims to require: names, or prefixes ending in "*";
	// nil means DefaultCaptureClaims. The per-boot claims (nodekey.sha256,
	// boot.id, boot.started) are never taken.
	Claims []string
	// PCRs are the PCRs to require; nil means every one of PolicyPCRs the
	// node reported.
	PCRs []int
}

// Validate reports every problem of o at once.
func (o CaptureOptions) Validate() error {
	var errs []error
	if o.Name != "" {
		for _, e := range validation.IsDNS1123Subdomain(o.Name) {
			errs = append(errs, fmt.Errorf("policy name %q: %s", o.Name, e))
		}
	}
	if o.Mode != "" && o.Mode != v1alpha1.ModeWarn && o.Mode != v1alpha1.ModeEnforce {
		errs = append(errs, fmt.Errorf("mode %q: use Warn or Enforce", o.Mode))
	}
	for _, c := range o.Claims {
		if slices.Contains(perBootClaims, c) {
			errs = append(errs, fmt.Errorf("claim %s differs on every boot: a rule on it could never pass twice", c))
		} else if _, err := path.Match(c, ""); err != nil || c == "" {
			errs = append(errs, fmt.Errorf("claim pattern %q is not a name or a pattern such as lsm.*", c))
		}
	}
	for _, i := range o.PCRs {
		if !slices.Contains(PolicyPCRs, i) {
			errs = append(errs, fmt.Errorf("PCR %d is not quoted: a policy may name PCRs %v", i, PolicyPCRs))
		}
	}
	return errors.Join(errs...)
}

// CapturePolicy returns the policy that requires node's last verified PCRs
// and claims as o selects them, and notes for the operator (claims left
// out, a selector that does not select the node). It refuses, with
// ErrNotReference, a node whose last attestation did not pass or that is
// quarantined.
func CapturePolicy(node *v1alpha1.SovraNode, o CaptureOptions) (*v1alpha1.AttestationPolicy, []string, error) {
	if err := o.Validate(); err != nil {
		return nil, nil, err
	}
	st := node.Status
	switch {
	case st.LastAttestationResult == "":
		return nil, nil, fmt.Errorf("%w: node %s has not attested since it enrolled", ErrNotReference, node.Name)
	case !node.AttestedOK():
		return nil, nil, fmt.Errorf("%w: the last attestation of node %s did not pass (%s, %s: %s); capture from a node whose last attestation passed",
			ErrNotReference, node.Name, st.LastAttestationResult, st.Reason, st.Message)
	case node.Quarantined():
		return nil, nil, fmt.Errorf("%w: node %s is quarantined; capture from a node nobody suspects", ErrNotReference, node.Name)
	case len(st.PCRs) == 0:
		return nil, nil, fmt.Errorf("%w: node %s's record holds no PCR values", ErrNotReference, node.Name)
	}
	mode := o.Mode
	if mode == "" {
		mode = v1alpha1.ModeWarn
	}
	var notes []string
	p := &v1alpha1.AttestationPolicy{
		TypeMeta: metav1.TypeMeta{APIVersion: v1alpha1.GroupVersion.String(), Kind: "AttestationPolicy"},
		ObjectMeta: metav1.ObjectMeta{Name: o.Name, Annotations: map[string]string{
			AnnotationCapturedFrom: node.Name,
		}},
		Spec: v1alpha1.AttestationPolicySpec{NodeSelector: o.Selector},
	}
	if p.Name == "" {
		p.Name = capturedPrefix + node.Name
	}
	if st.LastAttestationTime != nil {
		p.Annotations[AnnotationCapturedAt] = st.LastAttestationTime.UTC().Format(time.RFC3339)
	}

	pcrs, err := capturePCRs(st.PCRs, o.PCRs, mode)
	if err != nil {
		return nil, nil, err
	}
	p.Spec.PCRs = pcrs
	p.Spec.Claims, notes = captureClaims(st.Claims, o.Claims, mode)

	switch sel := o.Selector.LabelSelector(); {
	case sel == nil:
		notes = append(notes, "no selector: the policy judges every node; add one (e.g. sovra.dev/cluster=prod) to judge only machines like this one")
	default:
		s, err := metav1.LabelSelectorAsSelector(sel)
		if err != nil {
			return nil, nil, fmt.Errorf("selector: %w", err)
		}
		if !s.Matches(labels.Set(node.Labels)) {
			notes = append(notes, fmt.Sprintf("the selector %s does not select node %s itself", s, node.Name))
		}
	}
	return p, notes, nil
}

// capturePCRs returns the rules of the PCRs want names (nil: every one of
// PolicyPCRs reported), each requiring its value.
func capturePCRs(reported map[string]string, want []int, mode v1alpha1.Mode) ([]v1alpha1.PCRRule, error) {
	explicit := want != nil
	if !explicit {
		want = PolicyPCRs
	}
	var rules []v1alpha1.PCRRule
	for _, i := range want {
		v, ok := reported[strconv.Itoa(i)]
		v = strings.ToLower(v)
		switch {
		case !ok && explicit:
			return nil, fmt.Errorf("%w: the node's record holds no value of PCR %d", ErrNotReference, i)
		case !ok:
			continue
		case !pcrValuePattern.MatchString(v):
			return nil, fmt.Errorf("%w: the node's record holds a malformed value of PCR %d", ErrNotReference, i)
		}
		rules = append(rules, v1alpha1.PCRRule{Index: i, Values: []string{v}, Mode: mode})
	}
	if len(rules) == 0 {
		return nil, fmt.Errorf("%w: the node's record holds none of PCRs %v", ErrNotReference, want)
	}
	sort.Slice(rules, func(a, b int) bool { return rules[a].Index < rules[b].Index })
	return rules, nil
}

// captureClaims returns the rules of the reported claims that patterns
// select (nil: DefaultCaptureClaims), sorted by name, and what it left out.
func captureClaims(reported map[string]string, patterns []string, mode v1alpha1.Mode) ([]v1alpha1.ClaimRule, []string) {
	if patterns == nil {
		patterns = DefaultCaptureClaims
	}
	names := make([]string, 0, len(reported))
	for n := range reported {
		names = append(names, n)
	}
	sort.Strings(names)
	var rules []v1alpha1.ClaimRule
	var notes []string
	matched := map[string]bool{}
	for _, n := range names {
		if slices.Contains(perBootClaims, n) || !matchAny(patterns, n, matched) {
			continue
		}
		v := reported[n]
		switch {
		case strings.HasPrefix(v, claimErrorPrefix):
			notes = append(notes, fmt.Sprintf("claim %s left out: the node could not read it (%s)", n, strings.TrimPrefix(v, claimErrorPrefix)))
		case len(n) > maxClaimNameLen || !claimNamePattern.MatchString(n):
			notes = append(notes, fmt.Sprintf("claim %q left out: a policy cannot name it", n))
		default:
			rules = append(rules, v1alpha1.ClaimRule{Name: n, Values: []string{v}, Mode: mode})
		}
	}
	for _, p := range patterns {
		if !matched[p] {
			notes = append(notes, fmt.Sprintf("the node reported no claim %s", p))
		}
	}
	return rules, notes
}

// matchAny reports whether name matches one of patterns, noting which
// patterns matched.
func matchAny(patterns []string, name string, matched map[string]bool) bool {
	hit := false
	for _, p := range patterns {
		if ok, _ := path.Match(p, name); ok {
			matched[p], hit = true, true
		}
	}
	return hit
}

// ParseNodeSelector parses a label selector as kubectl takes it
// ("sovra.dev/cluster=prod,tier in (a,b),!legacy") into a policy's node
// selector; empty selects every node (nil).
func ParseNodeSelector(s string) (*v1alpha1.NodeSelector, error) {
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	reqs, err := labels.ParseToRequirements(s)
	if err != nil {
		return nil, fmt.Errorf("selector %q: %w", s, err)
	}
	out := &v1alpha1.NodeSelector{}
	for _, r := range reqs {
		var values []v1alpha1.LabelValue
		for _, v := range r.Values().List() {
			values = append(values, v1alpha1.LabelValue(v))
		}
		var op metav1.LabelSelectorOperator
		switch r.Operator() {
		case selection.Equals, selection.DoubleEquals:
			if out.MatchLabels == nil {
				out.MatchLabels = map[string]v1alpha1.LabelValue{}
			}
			out.MatchLabels[r.Key()] = values[0]
			continue
		case selection.In:
			op = metav1.LabelSelectorOpIn
		case selection.NotEquals, selection.NotIn:
			op = metav1.LabelSelectorOpNotIn
		case selection.Exists:
			op = metav1.LabelSelectorOpExists
		case selection.DoesNotExist:
			op = metav1.LabelSelectorOpDoesNotExist
		default:
			return nil, fmt.Errorf("selector %q: operator %s: a policy's selector takes =, !=, in, notin, KEY and !KEY", s, r.Operator())
		}
		out.MatchExpressions = append(out.MatchExpressions, v1alpha1.NodeSelectorRequirement{Key: r.Key(), Operator: op, Values: values})
	}
	return out, nil
}
