package kms

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"go.uber.org/zap"
	"k8s.io/apimachinery/pkg/types"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/metrics"
)

// Unseal accounting: Talos unseals a node's volumes early in each boot, and
// the node's agent then reports that boot (its ID and start, quoted by the
// TPM) in its attestation. A release is explained when
//
//   - the blob was sealed just before (FreshSealWindow): Talos opens what it
//     formatted, or
//   - a boot the node reported started before it (BootSkew) and no longer
//     than BootUnsealWindow before it, and it is the first release of the
//     blob in that boot, or the same caller's retry (RetryWindow), or
//   - it came from an address the node enrolled with, shortly
//     (UnattestedBootWindow) before a boot the node reported: a boot that
//     ended before its agent attested, as a staged upgrade's install boot.
//
// Anything else (a release no boot explains, a blob released again in one
// boot, or to a second source) may still be explained by a boot reported
// later, so it is judged only after Config.AttestDeadline: then it raises
// UnexpectedUnseal on the record, with an event, and, where the KMS is told
// to, quarantines the node. A copy of a node's disk opened elsewhere shows
// up here. Each replica judges the entries of its own ledger, against every
// replica's ledger; a boot that unsealed and then failed its attestation,
// with none of its attestations ever passing, quarantines the node (that
// failure is the TPM's word, not a caller's). The releases of a pending
// record count as its adopter's (rebookAdopted): a machine's first boot
// unseals before it enrolls. A boot that passed was sound
// when it unsealed (the PCRs only grow): its later failure, as under a
// policy added since, cuts it off (package attestation) but quarantines
// nothing, so that a policy mistake cannot lock a fleet out of its disks.
const (
	// JudgeInterval paces the judge and the ledger's writes.
	JudgeInterval = time.Second
	// retentionMargin keeps entries a little past the last moment they
	// can bear on a verdict.
	retentionMargin = 5 * time.Minute
)

// judgment is the verdict on one entry; an empty verdict is "not yet".
type judgment struct {
	verdict string
	// boot is the explaining boot (or seal), or the reason of an
	// unexpected release; detail says more for a human.
	boot, reason, detail string
}

// judge gives entry e of record rec its verdict at now, knowing the other
// releases of the same blob for the same record (every replica's, e
// excluded).
func judge(rec *v1alpha1.SovraNode, e v1alpha1.LedgerEntry, others []v1alpha1.LedgerEntry, now time.Time, deadline time.Duration) judgment {
	at := e.At.Time
	if sl := rec.Status.Sealing; sl != nil {
		for _, sb := range sl.Recent {
			if sb.Blob == e.Blob && !at.Before(sb.At.Time.Truncate(time.Second)) && at.Sub(sb.At.Time) <= FreshSealWindow &&
				sourcesAgree(e, others, sb.At.Time) {
				return judgment{verdict: v1alpha1.VerdictExplained, boot: "sealed at " + sb.At.UTC().Format(time.RFC3339)}
			}
		}
	}
	late := !now.Before(at.Add(deadline))
	for _, b := range rec.Status.Boots {
		if gap := b.Started.Sub(at); gap > 0 && gap <= UnattestedBootWindow && knowsAddressString(rec, e.Source) {
			return judgment{verdict: v1alpha1.VerdictExplained, boot: "a boot before " + b.ID + " that did not attest"}
		}
	}
	boot := bootAt(rec, at)
	switch {
	case boot == nil && late:
		return judgment{verdict: v1alpha1.VerdictUnexpected, reason: reasonUnexpectedNoBoot,
			detail: "no boot the node reported started before it (a boot that never attested, a copy of the disk, or a node clock ahead)"}
	case boot == nil:
		return judgment{}
	case at.After(boot.Started.Add(BootUnsealWindow)) && late:
		return judgment{verdict: v1alpha1.VerdictUnexpected, reason: reasonUnexpectedTooLate,
			detail: fmt.Sprintf("%s after the start of boot %s, which unseals in its first %s", at.Sub(boot.Started.Time).Round(time.Second), boot.ID, BootUnsealWindow)}
	case at.After(boot.Started.Add(BootUnsealWindow)):
		return judgment{}
	}
	if sourcesAgree(e, others, boot.Started.Add(-BootSkew)) {
		return judgment{verdict: v1alpha1.VerdictExplained, boot: boot.ID}
	}
	if !late {
		return judgment{} // a boot reported later may explain it
	}
	first := firstRelease(others, boot.Started.Add(-BootSkew), e)
	if first.Source != e.Source {
		return judgment{verdict: v1alpha1.VerdictUnexpected, reason: reasonUnexpectedConflict,
			detail: fmt.Sprintf("boot %s had the blob released to %s at %s; this release went to %s", boot.ID, first.Source, first.At.UTC().Format(time.RFC3339), e.Source)}
	}
	return judgment{verdict: v1alpha1.VerdictUnexpected, reason: reasonUnexpectedTwice,
		detail: fmt.Sprintf("boot %s had the blob released at %s already; this is not a retry of it", boot.ID, first.At.UTC().Format(time.RFC3339))}
}

// releasedIn is the boot in which e's key went out: the one its verdict
// names, else the one running at its time.
func releasedIn(rec *v1alpha1.SovraNode, e v1alpha1.LedgerEntry) *v1alpha1.Boot {
	if rec == nil {
		return nil
	}
	if b := bootOf(rec, e.Boot); b != nil {
		return b
	}
	return bootAt(rec, e.At.Time)
}

// bootAt is the boot rec reported that was running at at: the latest that
// started before it (allowing BootSkew), nil when none did.
func bootAt(rec *v1alpha1.SovraNode, at time.Time) *v1alpha1.Boot {
	var boot *v1alpha1.Boot
	for i := range rec.Status.Boots {
		if b := &rec.Status.Boots[i]; !b.Started.Add(-BootSkew).After(at) && (boot == nil || b.Started.After(boot.Started.Time)) {
			boot = b
		}
	}
	return boot
}

// sourcesAgree reports whether e is the first release of its blob since
// from, or a retry: every earlier release since then went to e's source and
// the latest of them is less than RetryWindow before e.
func sourcesAgree(e v1alpha1.LedgerEntry, others []v1alpha1.LedgerEntry, from time.Time) bool {
	var last time.Time
	for _, o := range others {
		if !before(o, e) || o.At.Time.Before(from) {
			continue
		}
		if o.Source != e.Source {
			return false
		}
		if o.Last.Time.After(last) {
			last = o.Last.Time
		}
	}
	return last.IsZero() || e.At.Time.Sub(last) <= RetryWindow
}

// firstRelease is the earliest release since from that came before e.
func firstRelease(others []v1alpha1.LedgerEntry, from time.Time, e v1alpha1.LedgerEntry) v1alpha1.LedgerEntry {
	first := e
	for _, o := range others {
		if before(o, first) && !o.At.Time.Before(from) {
			first = o
		}
	}
	return first
}

// before orders releases by time, then ID.
func before(a, b v1alpha1.LedgerEntry) bool {
	if !a.At.Time.Equal(b.At.Time) {
		return a.At.Time.Before(b.At.Time)
	}
	return a.ID < b.ID
}

// account judges this replica's releases and writes its ledger every
// JudgeInterval until ctx ends.
func (s *Service) account(ctx context.Context, st Store) {
	tick := time.NewTicker(JudgeInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			s.AccountOnce(ctx, st)
			s.flush(ctx, st)
		}
	}
}

type viewKey struct {
	uid  types.UID
	blob string
}

// AccountOnce judges every entry of this replica's ledger that has no
// verdict yet, quarantines nodes whose boot failed after it unsealed, and
// drops what can no longer matter.
func (s *Service) AccountOnce(ctx context.Context, st Store) {
	now := s.clock.Now()
	own := s.ledger.snapshot()
	if len(own) == 0 {
		return
	}
	if s.rebookAdopted(st, own) {
		own = s.ledger.snapshot()
	}
	view := map[viewKey][]v1alpha1.LedgerEntry{}
	for _, e := range own {
		k := viewKey{e.NodeUID, e.Blob}
		view[k] = append(view[k], e)
	}
	for _, seg := range st.Ledgers() {
		if seg.Spec.Replica == s.ledger.replica {
			continue // this replica's own entries are in memory, and newer
		}
		for _, e := range seg.Spec.Entries {
			if k := (viewKey{e.NodeUID, e.Blob}); view[k] != nil {
				view[k] = append(view[k], e)
			}
		}
	}
	retention := BootUnsealWindow + s.cfg.AttestDeadline + retentionMargin
	failed := map[string]v1alpha1.LedgerEntry{}
	for _, e := range own {
		rec := st.Node(e.Node)
		if rec == nil || rec.UID != e.NodeUID {
			continue // revoked: pruned below
		}
		if e.Verdict == v1alpha1.VerdictExplained {
			// The boot that ran when the key went out, however the release
			// was explained (a fresh seal is explained by its Seal), if no
			// attestation of it ever passed.
			if b := releasedIn(rec, e); b != nil && failedBoot(b) && !quarantined(rec) {
				failed[rec.Name] = e
			}
			continue
		}
		if e.Verdict != v1alpha1.VerdictPending {
			continue
		}
		others := slices.DeleteFunc(slices.Clone(view[viewKey{e.NodeUID, e.Blob}]), func(o v1alpha1.LedgerEntry) bool { return o.ID == e.ID })
		j := judge(rec, e, others, now, s.cfg.AttestDeadline)
		switch j.verdict {
		case v1alpha1.VerdictExplained:
			s.ledger.setVerdict(e.ID, j.verdict, j.boot)
		case v1alpha1.VerdictUnexpected:
			if err := s.raise(ctx, st, rec, e, j); err != nil {
				s.logger.Warn("recording an unexpected key release; will retry", zap.String("node", rec.Name), zap.Error(err))
				continue
			}
			s.ledger.setVerdict(e.ID, j.verdict, j.reason)
		}
	}
	for name, e := range failed {
		b := releasedIn(st.Node(name), e)
		if b == nil {
			continue
		}
		msg := fmt.Sprintf("boot %s unsealed (blob %s at %s) and then failed attestation", b.ID, e.Blob, e.At.UTC().Format(time.RFC3339))
		if err := s.quarantine(ctx, st, name, ReasonFailedAfterUnseal, msg, now); err != nil && !errors.Is(err, errConflict) {
			s.logger.Warn("quarantining node", zap.String("node", name), zap.Error(err))
		}
	}
	s.ledger.prune(func(e v1alpha1.LedgerEntry) bool {
		rec := st.Node(e.Node)
		alive := rec != nil && rec.UID == e.NodeUID
		return alive && (e.Verdict == v1alpha1.VerdictPending || now.Sub(e.Last.Time) < retention)
	})
}

// rebookAdopted books this replica's entries of pending records that
// enrolled records adopted (sweep.go, Sealing.AdoptedFrom) to their
// adopters, and reports whether it moved any. A machine that fetched the
// enrollment configuration unseals its first volumes under its pending
// record, in a boot its agent then reports as the enrolled node's: booked
// to the adopter, such a release is judged with the node's boots, so that
// this boot, failing its attestation, quarantines the node like any other.
// Entries whose record is gone and that nobody adopted are pruned.
func (s *Service) rebookAdopted(st Store, own []v1alpha1.LedgerEntry) bool {
	var adopters map[types.UID]*v1alpha1.SovraNode
	moved := false
	for _, e := range own {
		if rec := st.Node(e.Node); rec != nil && rec.UID == e.NodeUID {
			continue
		}
		if adopters == nil {
			adopters = map[types.UID]*v1alpha1.SovraNode{}
			for _, n := range st.List() {
				if sl := n.Status.Sealing; sl != nil && sl.AdoptedFrom != nil {
					adopters[sl.AdoptedFrom.UID] = n
				}
			}
		}
		n := adopters[e.NodeUID]
		if n == nil {
			continue
		}
		s.ledger.rebook(e.ID, n.Name, n.UID)
		moved = true
		s.logger.Info("key release of an adopted pending record booked to its node",
			zap.String("node", n.Name), zap.String("pending_record", e.Node), zap.String("blob", e.Blob), zap.Time("at", e.At.Time))
	}
	return moved
}

// failedBoot says whether b failed its attestation and never passed one.
func failedBoot(b *v1alpha1.Boot) bool {
	return b.Result == v1alpha1.ResultFailed && b.Passed == nil
}

func knowsAddressString(rec *v1alpha1.SovraNode, source string) bool {
	a, err := netip.ParseAddr(source)
	return err == nil && knowsAddress(rec, a.Unmap())
}

func bootOf(rec *v1alpha1.SovraNode, id string) *v1alpha1.Boot {
	if rec == nil {
		return nil
	}
	for i := range rec.Status.Boots {
		if rec.Status.Boots[i].ID == id {
			return &rec.Status.Boots[i]
		}
	}
	return nil
}

// raise records an unexpected release on the record: the condition, the
// release in its list, and, where the KMS is told to, the quarantine; then
// the event and the log line.
func (s *Service) raise(ctx context.Context, st Store, rec *v1alpha1.SovraNode, e v1alpha1.LedgerEntry, j judgment) error {
	ctx, cancel := context.WithTimeout(ctx, recordWriteTimeout)
	defer cancel()
	msg := fmt.Sprintf("the key of blob %s was released to %s at %s (%d call(s)), and nothing the node reported explains it: %s",
		e.Blob, e.Source, e.At.UTC().Format(time.RFC3339), e.Count, j.detail)
	clearHint := "; after looking into it, clear with: kubectl annotate snode " + rec.Name + " " + AnnotationClearUnexpectedUnseal + "=yes"
	for range saltAttempts {
		n, err := st.Get(ctx, rec.Name)
		if errors.Is(err, errNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		if n.UID != e.NodeUID {
			return nil
		}
		now := s.clock.Now()
		setCondition(n, v1alpha1.ConditionUnexpectedUnseal, true, ReasonUnexpectedUnseal, msg, now)
		n.Status.UnexpectedUnseals = slices.Insert(n.Status.UnexpectedUnseals, 0, v1alpha1.Unseal{
			Blob: e.Blob, Source: e.Source, At: e.At, Count: e.Count, Reason: j.reason,
		})
		if len(n.Status.UnexpectedUnseals) > v1alpha1.MaxUnexpectedUnseals {
			n.Status.UnexpectedUnseals = n.Status.UnexpectedUnseals[:v1alpha1.MaxUnexpectedUnseals]
		}
		quarantine := s.cfg.QuarantineUnexpected && !quarantined(n)
		if quarantine {
			setQuarantine(n, true, ReasonUnexpectedUnseal, msg, now)
		}
		err = st.UpdateStatus(ctx, n)
		if errors.Is(err, errConflict) {
			continue
		}
		if err != nil {
			return err
		}
		metrics.KMSUnexpectedReleases.WithLabelValues(j.reason).Inc()
		if quarantine {
			metrics.KMSQuarantines.WithLabelValues(ReasonUnexpectedUnseal).Inc()
		}
		s.logger.Warn("unexpected key release", zap.String("node", n.Name), zap.String("node_uuid", n.Spec.UUID),
			zap.String("blob", e.Blob), zap.String("source", e.Source), zap.Time("at", e.At.Time),
			zap.String("reason", j.reason), zap.String("detail", j.detail), zap.Bool("quarantined", quarantine))
		s.event(n, true, ReasonUnexpectedUnseal, msg+clearHint)
		if quarantine {
			s.event(n, true, "Quarantined", ReasonUnexpectedUnseal+": the KMS quarantines on unexpected releases (--kms-quarantine-unexpected); clear with: kubectl annotate snode "+n.Name+" "+AnnotationClearQuarantine+"=yes")
		}
		return nil
	}
	return fmt.Errorf("recording an unexpected release on node %s: the record kept changing", rec.Name)
}

// clearUnexpected lifts the UnexpectedUnseal condition an operator looked into.
func (s *Service) clearUnexpected(ctx context.Context, st Store, name string, now time.Time) error {
	n, err := st.Get(ctx, name)
	if err != nil {
		return err
	}
	if conditionTrue(n, v1alpha1.ConditionUnexpectedUnseal) || len(n.Status.UnexpectedUnseals) > 0 {
		setCondition(n, v1alpha1.ConditionUnexpectedUnseal, false, ReasonQuarantineCleared, "cleared by an operator", now)
		n.Status.UnexpectedUnseals = nil
		if err := st.UpdateStatus(ctx, n); err != nil {
			return err
		}
		s.logger.Info("unexpected key releases cleared by an operator", zap.String("node", name))
		s.event(n, false, "UnexpectedUnsealCleared", "unexpected key releases cleared by an operator")
	}
	return st.Annotate(ctx, name, map[string]*string{AnnotationClearUnexpectedUnseal: nil})
}
