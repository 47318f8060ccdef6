package kms

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/metrics"
)

const (
	// SweepInterval is how often records are checked for operator
	// annotations, lab records and unclaimed UUIDs.
	SweepInterval = time.Second
	// throttleLogInterval is how often the refusals of rate-limited calls
	// are logged, one line per source.
	throttleLogInterval = 10 * time.Second
	// maxThrottledSources bounds the sources counted between two lines.
	maxThrottledSources = 10_000
	// otherSources counts the refusals past maxThrottledSources.
	otherSources = "other sources"
)

// sweep checks every record each SweepInterval until ctx ends.
func (s *Service) sweep(ctx context.Context, st Store) {
	tick := time.NewTicker(SweepInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			s.SweepOnce(ctx, st)
		}
	}
}

// SweepOnce applies the operators' annotations (clear a quarantine or an
// unexpected release, open a sealing window), claims the UUIDs of records
// an operator made, and moves lab records' salts to the enrolled records
// (or quarantines lab records past the deadline).
func (s *Service) SweepOnce(ctx context.Context, st Store) {
	now := s.clock.Now()
	all := st.List()
	for _, n := range all {
		if err := s.sweepNode(ctx, st, n, all, now); err != nil && !errors.Is(err, errConflict) && !errors.Is(err, errNotFound) {
			s.logger.Warn("sweeping node", zap.String("node", n.Name), zap.Error(err))
		}
	}
}

func (s *Service) sweepNode(ctx context.Context, st Store, n *v1alpha1.SovraNode, all []*v1alpha1.SovraNode, now time.Time) error {
	ctx, cancel := context.WithTimeout(ctx, recordWriteTimeout)
	defer cancel()
	if _, ok := n.Annotations[AnnotationClearQuarantine]; ok {
		return s.clearQuarantine(ctx, st, n, now)
	}
	if _, ok := n.Annotations[AnnotationClearUnexpectedUnseal]; ok {
		return s.clearUnexpected(ctx, st, n.Name, now)
	}
	if v, ok := n.Annotations[AnnotationSealingWindow]; ok {
		return s.operatorWindow(ctx, st, n, v)
	}
	if isLab(n) {
		if quarantined(n) {
			return nil
		}
		return s.sweepLab(ctx, st, n, all, now)
	}
	if n.Spec.UUID != "" && n.DeletionTimestamp == nil {
		return s.claimFor(ctx, st, n, now)
	}
	return nil
}

// operatorWindow opens the sealing window an operator asked for with
// AnnotationSealingWindow, or says why not, and removes the annotation.
func (s *Service) operatorWindow(ctx context.Context, st Store, n *v1alpha1.SovraNode, v string) error {
	d, err := time.ParseDuration(strings.TrimSpace(v))
	switch {
	case err != nil || d <= 0:
		s.logger.Warn("sealing window not opened: the annotation is not a positive duration", zap.String("node", n.Name), zap.String("value", v))
		s.event(n, true, "SealingWindowRefused", fmt.Sprintf("%s=%q is not a positive duration (e.g. 30m); no window opened", AnnotationSealingWindow, v))
	default:
		if d > MaxSealingWindow {
			s.event(n, true, "SealingWindowShortened", fmt.Sprintf("a sealing window lasts at most %s; opening one of %s", MaxSealingWindow, MaxSealingWindow))
		}
		if err := s.openWindow(ctx, st, n.Name, v1alpha1.WindowOperator, "operator ("+AnnotationSealingWindow+"="+v+")", d); err != nil {
			return err
		}
	}
	return st.Annotate(ctx, n.Name, map[string]*string{AnnotationSealingWindow: nil})
}

// claimInFlight is how long a claim whose record does not exist yet is
// taken for an enrollment in progress (package attestation).
const claimInFlight = 2 * time.Minute

// claimFor makes the UUID n names claimed by n when nobody holds it: no
// claim (an operator made the record, or an older sovrad did), or a stale
// one (its record was deleted, and no garbage collector removed the claim).
// The KMS finds records by their claims. A UUID several records name goes to
// none of them until an operator decides.
func (s *Service) claimFor(ctx context.Context, st Store, n *v1alpha1.SovraNode, now time.Time) error {
	uuid := lowerUUID(n.Spec.UUID)
	c := st.Claim(uuid)
	ours := c != nil && c.Spec.Node == n.Name && (c.Spec.NodeUID == "" || c.Spec.NodeUID == n.UID)
	if ours || (c != nil && !staleClaim(st, c, now)) {
		return nil
	}
	if len(st.ByUUID(uuid)) != 1 {
		return nil
	}
	want := v1alpha1.UUIDClaim{
		ObjectMeta: metav1.ObjectMeta{Name: uuid, OwnerReferences: []metav1.OwnerReference{{
			APIVersion: v1alpha1.GroupVersion.String(), Kind: "SovraNode", Name: n.Name, UID: n.UID,
		}}},
		Spec: v1alpha1.UUIDClaimSpec{Node: n.Name, NodeUID: n.UID},
	}
	var err error
	if c == nil {
		err = st.CreateClaim(ctx, &want)
	} else {
		c = c.DeepCopy()
		c.OwnerReferences, c.Spec = want.OwnerReferences, want.Spec
		err = st.UpdateClaim(ctx, c)
	}
	if errors.Is(err, errExists) || errors.Is(err, errConflict) {
		return nil // someone else moved first; look again next sweep
	}
	if err == nil {
		s.logger.Info("UUID claimed for a record that names it", zap.String("node", n.Name), zap.String("node_uuid", uuid))
	}
	return err
}

// staleClaim reports whether c's record is gone (or is another instance).
func staleClaim(st Store, c *v1alpha1.UUIDClaim, now time.Time) bool {
	rec := st.Node(c.Spec.Node)
	switch {
	case rec == nil:
		return c.Spec.NodeUID != "" || now.Sub(c.CreationTimestamp.Time) > claimInFlight
	case c.Spec.NodeUID != "":
		return rec.UID != c.Spec.NodeUID
	}
	return false
}

// enrollBy is when a node that sealed under the pending or lab record rec
// must have enrolled: a machine that fetched the enrollment configuration
// has its window (it installs and reboots first); a lab record has the
// attestation deadline from its first Seal.
func enrollBy(rec *v1alpha1.SovraNode, attestDeadline time.Duration) (time.Time, string) {
	if !expected(rec) {
		return rec.CreationTimestamp.Add(attestDeadline), "lab mode"
	}
	if w := windowOf(rec); w != nil && w.Reason == v1alpha1.WindowBootConfig {
		return w.Expires.Time, "enrollment configuration"
	}
	return rec.CreationTimestamp.Add(DefaultBootConfigWindow), "enrollment configuration"
}

// sweepLab moves a lab record's salt to the node's enrolled record, or
// quarantines it when the node did not enroll in time.
func (s *Service) sweepLab(ctx context.Context, st Store, lab *v1alpha1.SovraNode, all []*v1alpha1.SovraNode, now time.Time) error {
	var target *v1alpha1.SovraNode
	for _, n := range all {
		if n != lab && !isLab(n) && enrolled(n) && strings.EqualFold(n.Spec.UUID, lab.Spec.UUID) {
			if target != nil {
				return nil // ambiguous: leave it to an operator
			}
			target = n
		}
	}
	if target == nil {
		if w := windowOf(lab); len(lab.Status.KeySalt) == 0 && w != nil && w.Reason == v1alpha1.WindowBootConfig && !now.Before(w.Expires.Time) {
			s.logger.Info("pending machine removed: it never sealed in its window", zap.String("node", lab.Name), zap.String("node_uuid", lab.Spec.UUID))
			return st.Delete(ctx, lab)
		}
		if deadline, what := enrollBy(lab, s.cfg.AttestDeadline); now.After(deadline) {
			return s.quarantine(ctx, st, lab.Name, ReasonEnrollmentMissed,
				fmt.Sprintf("%s: the node sealed and did not enroll by %s", what, deadline.UTC().Format(time.RFC3339)), now)
		}
		return nil
	}
	if len(lab.Status.KeySalt) == 0 {
		return st.Delete(ctx, lab)
	}
	if len(lab.Spec.Addresses) > 0 && !sharesAddress(lab, target) {
		// Whoever sealed under the pending record is not shown to be this
		// machine: the enrolled record starts with no salt, and the blobs
		// sealed before open no more.
		s.logger.Warn("pending record not adopted: the node enrolled from other addresses than the one that sealed; its seals are discarded",
			zap.String("pending_record", lab.Name), zap.String("node", target.Name),
			zap.Strings("sealed_from", lab.Spec.Addresses), zap.Strings("node_addresses", target.Spec.Addresses))
		s.event(target, true, "PendingSealsDiscarded", fmt.Sprintf(
			"the UUID's pending record %s sealed from %s, not an address this node enrolled with: its blobs were discarded; the node must seal its volumes anew (open a sealing window)",
			lab.Name, strings.Join(lab.Spec.Addresses, ",")))
		return st.Delete(ctx, lab)
	}
	fresh, err := st.Get(ctx, target.Name)
	if err != nil {
		return err
	}
	switch {
	case len(fresh.Status.KeySalt) == 0:
		if !slices.Contains(fresh.Finalizers, v1alpha1.FinalizerShred) {
			fresh.Finalizers = append(fresh.Finalizers, v1alpha1.FinalizerShred)
			if err := st.Update(ctx, fresh); err != nil {
				return err
			}
		}
		fresh.Status.KeySalt = bytes.Clone(lab.Status.KeySalt)
		fresh.Status.Sealing = lab.Status.Sealing.DeepCopy()
		if fresh.Status.Sealing == nil {
			fresh.Status.Sealing = &v1alpha1.Sealing{}
		}
		// The pending record's key releases are this node's (accounting.go).
		fresh.Status.Sealing.AdoptedFrom = &v1alpha1.AdoptedRecord{Name: lab.Name, UID: lab.UID, At: metav1.NewTime(now)}
		if err := st.UpdateStatus(ctx, fresh); err != nil {
			return err
		}
	case !bytes.Equal(fresh.Status.KeySalt, lab.Status.KeySalt):
		s.logger.Warn("lab record and enrolled record of one UUID both hold salts; leaving both to an operator",
			zap.String("lab_record", lab.Name), zap.String("node", fresh.Name))
		return nil
	}
	if c := st.Claim(lowerUUID(lab.Spec.UUID)); c != nil && (c.Spec.Node != fresh.Name || c.Spec.NodeUID != fresh.UID) {
		c = c.DeepCopy()
		c.Spec = v1alpha1.UUIDClaimSpec{Node: fresh.Name, NodeUID: fresh.UID}
		c.OwnerReferences = []metav1.OwnerReference{{APIVersion: v1alpha1.GroupVersion.String(), Kind: "SovraNode", Name: fresh.Name, UID: fresh.UID}}
		if err := st.UpdateClaim(ctx, c); err != nil {
			return err
		}
	}
	if err := st.Delete(ctx, lab); err != nil {
		return err
	}
	s.logger.Info("lab record adopted by the enrolled node", zap.String("lab_record", lab.Name), zap.String("node", fresh.Name))
	s.event(fresh, false, "LabRecordAdopted", "the key salt of lab record "+lab.Name+" moved to this enrolled record")
	return nil
}

func (s *Service) quarantine(ctx context.Context, st Store, name, reason, msg string, now time.Time) error {
	n, err := st.Get(ctx, name)
	if err != nil {
		return err
	}
	if quarantined(n) {
		return nil
	}
	setQuarantine(n, true, reason, msg, now)
	if err := st.UpdateStatus(ctx, n); err != nil {
		return err
	}
	metrics.KMSQuarantines.WithLabelValues(reason).Inc()
	s.logger.Warn("node quarantined", zap.String("node", name), zap.String("node_uuid", n.Spec.UUID),
		zap.String("reason", reason), zap.String("detail", msg))
	s.event(n, true, "Quarantined", reason+": "+msg+"; clear with: kubectl annotate snode "+name+" "+AnnotationClearQuarantine+"=yes")
	return nil
}

func (s *Service) clearQuarantine(ctx context.Context, st Store, n *v1alpha1.SovraNode, now time.Time) error {
	if quarantined(n) {
		fresh, err := st.Get(ctx, n.Name)
		if err != nil {
			return err
		}
		setQuarantine(fresh, false, ReasonQuarantineCleared, "cleared by an operator", now)
		if err := st.UpdateStatus(ctx, fresh); err != nil {
			return err
		}
		s.logger.Info("node quarantine cleared by an operator", zap.String("node", n.Name))
		s.event(fresh, false, "QuarantineCleared", "quarantine cleared by an operator")
	}
	return st.Annotate(ctx, n.Name, map[string]*string{AnnotationClearQuarantine: nil})
}

// throttleLog folds the log lines of rate-limited calls: one line per
// source and throttleLogInterval, with the count, instead of one per call.
type throttleLog struct {
	logger *zap.Logger

	mu     sync.Mutex // guards counts
	counts map[string]int
}

func newThrottleLog(logger *zap.Logger) *throttleLog {
	return &throttleLog{logger: logger, counts: map[string]int{}}
}

func (t *throttleLog) add(source, op string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	key := source + " " + op
	if _, ok := t.counts[key]; !ok && len(t.counts) >= maxThrottledSources {
		key = otherSources
	}
	t.counts[key]++
}

// run logs the counts every throttleLogInterval until ctx ends.
func (t *throttleLog) run(ctx context.Context) {
	tick := time.NewTicker(throttleLogInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			t.mu.Lock()
			counts := t.counts
			t.counts = map[string]int{}
			t.mu.Unlock()
			for key, n := range counts {
				src, op, _ := strings.Cut(key, " ")
				t.logger.Warn("kms calls refused: over the per-source rate", zap.String("source", src), zap.String("op", op),
					zap.Int("count", n), zap.Duration("interval", throttleLogInterval))
			}
		}
	}
}

// sharesAddress reports whether the pending record's source is one of the
// enrolled node's addresses.
func sharesAddress(pending, node *v1alpha1.SovraNode) bool {
	for _, a := range pending.Spec.Addresses {
		if addr, err := netip.ParseAddr(a); err == nil && knowsAddress(node, addr.Unmap()) {
			return true
		}
	}
	return false
}
