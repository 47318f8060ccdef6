package kms

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
)

const (
	// SweepInterval is how often records are checked for missed deadlines,
	// failed attestations after an Unseal, and operator clearances.
	SweepInterval = time.Second
	// recordWriteTimeout bounds one record write of the sweeper or the
	// release writer.
	recordWriteTimeout = 10 * time.Second
	// releaseRetry paces the retries of release times that failed to write.
	releaseRetry = 5 * time.Second
)

// markReleased notes that rec's Unseal starts an attestation deadline,
// unless one is already running: the earliest Unseal counts.
func (s *Service) markReleased(rec *v1alpha1.SovraNode) {
	if t, ok := releasedAt(rec); ok {
		if _, judged := attestedSince(rec, t); !judged {
			return
		}
	}
	s.mu.Lock()
	if _, pending := s.releases[rec.Name]; !pending {
		s.releases[rec.Name] = s.clock.Now()
	}
	s.mu.Unlock()
	select {
	case s.released <- struct{}{}:
	default:
	}
}

// writeReleases writes pending release times to the records.
func (s *Service) writeReleases(ctx context.Context, st Store) {
	retry := time.NewTicker(releaseRetry)
	defer retry.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.released:
		case <-retry.C:
		}
		s.writeOnce(ctx, st)
	}
}

// writeOnce writes the pending release times; failed writes stay pending.
func (s *Service) writeOnce(ctx context.Context, st Store) {
	s.mu.Lock()
	pending := s.releases
	s.releases = map[string]time.Time{}
	s.mu.Unlock()
	for name, t := range pending {
		if err := s.pace.Wait(ctx); err != nil {
			return
		}
		v := t.UTC().Format(releasedAtTimeFormat)
		wctx, cancel := context.WithTimeout(ctx, recordWriteTimeout)
		err := st.Annotate(wctx, name, map[string]*string{AnnotationReleasedAt: &v})
		cancel()
		if err != nil && !errors.Is(err, errNotFound) {
			s.logger.Warn("recording a key release", zap.String("node", name), zap.Error(err))
			s.mu.Lock()
			if _, again := s.releases[name]; !again {
				s.releases[name] = t
			}
			s.mu.Unlock()
		}
	}
}

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

// SweepOnce applies the quarantine rules to every cached record once:
// operator clearances first, then lab records (move their salt to the
// enrolled record, or quarantine them past the deadline), then deadlines
// that started with an Unseal.
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
	if quarantined(n) {
		return nil
	}
	if isLab(n) {
		return s.sweepLab(ctx, st, n, all, now)
	}
	t, ok := releasedAt(n)
	if !ok {
		return nil
	}
	passed, judged := attestedSince(n, t)
	switch {
	case judged && passed:
		return st.Annotate(ctx, n.Name, map[string]*string{AnnotationReleasedAt: nil})
	case judged:
		return s.quarantine(ctx, st, n.Name, ReasonFailedAfterUnseal,
			fmt.Sprintf("the node unsealed at %s and then failed attestation (%s)", t.UTC().Format(time.RFC3339), n.Status.Reason), now)
	case now.After(t.Add(s.cfg.AttestDeadline)):
		return s.quarantine(ctx, st, n.Name, ReasonDeadlineMissed,
			fmt.Sprintf("the node unsealed at %s and did not pass an attestation within %s", t.UTC().Format(time.RFC3339), s.cfg.AttestDeadline), now)
	}
	return nil
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
		if now.After(lab.CreationTimestamp.Add(s.cfg.AttestDeadline)) {
			return s.quarantine(ctx, st, lab.Name, ReasonEnrollmentMissed,
				fmt.Sprintf("lab mode: the node sealed at %s and did not enroll within %s",
					lab.CreationTimestamp.UTC().Format(time.RFC3339), s.cfg.AttestDeadline), now)
		}
		return nil
	}
	if len(lab.Status.KeySalt) == 0 {
		return st.Delete(ctx, lab)
	}
	fresh, err := st.Get(ctx, target.Name)
	if err != nil {
		return err
	}
	switch {
	case len(fresh.Status.KeySalt) == 0:
		fresh.Status.KeySalt = bytes.Clone(lab.Status.KeySalt)
		if err := st.UpdateStatus(ctx, fresh); err != nil {
			return err
		}
	case !bytes.Equal(fresh.Status.KeySalt, lab.Status.KeySalt):
		s.logger.Warn("lab record and enrolled record of one UUID both hold salts; leaving both to an operator",
			zap.String("lab_record", lab.Name), zap.String("node", fresh.Name))
		return nil
	}
	if err := st.Delete(ctx, lab); err != nil {
		return err
	}
	s.logger.Info("lab record adopted by the enrolled node", zap.String("lab_record", lab.Name), zap.String("node", fresh.Name))
	s.audit.event(fresh, false, "LabRecordAdopted", "the key salt of lab record "+lab.Name+" moved to this enrolled record")
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
	s.logger.Warn("node quarantined", zap.String("node", name), zap.String("node_uuid", n.Spec.UUID),
		zap.String("reason", reason), zap.String("detail", msg))
	s.audit.event(n, true, "Quarantined", reason+": "+msg+"; clear with: kubectl annotate snode "+name+" "+AnnotationClearQuarantine+"=yes")
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
		s.audit.event(fresh, false, "QuarantineCleared", "quarantine cleared by an operator")
	}
	return st.Annotate(ctx, n.Name, map[string]*string{AnnotationClearQuarantine: nil, AnnotationReleasedAt: nil})
}
