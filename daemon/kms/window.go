package kms

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"go.uber.org/zap"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/custody"
	"github.com/sovra-dev/sovra/daemon/metrics"
)

// Talos seals only when it formats a volume or fills a key slot: a fresh
// install (STATE, EPHEMERAL), a wipe (reset, --system-labels-to-wipe,
// BlockDeviceWipe), a new user volume, a KMS key slot added. Everywhere else
// a Seal is an attacker asking for a blob the node would open. So a record
// may Seal only inside a sealing window:
//
//   - its first window, from its creation for Config.SealWindow (a node an
//     operator pre-registered, or one that enrolled, installs now);
//   - a window enrollment opened for a record that never sealed, or the
//     fetch of the enrollment configuration by a new machine (expect.go);
//     these close FreshSealWindow after the node's first Seal: an install
//     seals its volumes within minutes, and a window is a time in which
//     anyone who knows the UUID may Seal;
//   - a window an operator opened (AnnotationSealingWindow);
//   - a window sovra opened when it wiped the host (OpenSealingWindow);
//   - lab mode.

// sealWindow reports whether rec may Seal at now, and otherwise why not.
func (s *Service) sealWindow(rec *v1alpha1.SovraNode, now time.Time) (string, bool) {
	if s.cfg.LabMode {
		return "lab mode", true
	}
	var installed bool // the node's install burst is over
	if sl := rec.Status.Sealing; sl != nil && sl.FirstSealed != nil {
		installed = now.After(sl.FirstSealed.Add(FreshSealWindow))
	}
	if w := windowOf(rec); w != nil && !now.Before(w.Opened.Time) && now.Before(w.Expires.Time) &&
		!(installed && (w.Reason == v1alpha1.WindowEnrollment || w.Reason == v1alpha1.WindowBootConfig)) {
		return w.Reason, true
	}
	if now.Before(rec.CreationTimestamp.Add(s.cfg.SealWindow)) && !installed {
		return v1alpha1.WindowPreRegistration, true
	}
	return "no sealing window is open: open one with kubectl annotate snode " + rec.Name + " " + AnnotationSealingWindow + "=30m", false
}

func windowOf(rec *v1alpha1.SovraNode) *v1alpha1.SealingWindow {
	if rec.Status.Sealing == nil {
		return nil
	}
	return rec.Status.Sealing.Window
}

// recordSeal notes a Seal on the record (the salt's record, read from the
// API): when, and the blob's fingerprint, so that its first Unseal is
// explained.
func (s *Service) recordSeal(ctx context.Context, st Store, rec *v1alpha1.SovraNode, blob string, c *call) error {
	for range saltAttempts {
		now := metav1.NewTime(s.clock.Now())
		n := rec.DeepCopy()
		if n.Status.Sealing == nil {
			n.Status.Sealing = &v1alpha1.Sealing{}
		}
		sl := n.Status.Sealing
		if sl.FirstSealed == nil {
			sl.FirstSealed = &now
		}
		sl.LastSealed = &now
		sl.Recent = slices.Insert(sl.Recent, 0, v1alpha1.SealedBlob{Blob: blob, At: now, Source: c.src.Addr.String()})
		if len(sl.Recent) > v1alpha1.MaxRecentSeals {
			sl.Recent = sl.Recent[:v1alpha1.MaxRecentSeals]
		}
		err := st.UpdateStatus(ctx, n)
		if err == nil {
			c.record = n
			return nil
		}
		if !errors.Is(err, errConflict) {
			return err
		}
		fresh, err := st.Get(ctx, rec.Name)
		if err != nil {
			return err
		}
		if fresh.UID != rec.UID || !bytes.Equal(fresh.Status.KeySalt, rec.Status.KeySalt) {
			return fmt.Errorf("the record of node %s changed while it sealed", rec.Name)
		}
		rec = fresh
	}
	return fmt.Errorf("the record of node %s kept changing while its seal was recorded", rec.Name)
}

// OpenSealingWindow opens a sealing window on record name for d from now
// (at most MaxSealingWindow), for reason (v1alpha1.Window*), opened by by,
// and audits it with an event and a log line. Wiping a host opens one so it
// can format its volumes anew.
func (s *Service) OpenSealingWindow(ctx context.Context, name, reason, by string, d time.Duration) error {
	box := s.store.Load()
	if box == nil {
		return errors.New("opening a sealing window: the KMS is starting")
	}
	return s.openWindow(ctx, box.Store, name, reason, by, d)
}

func (s *Service) openWindow(ctx context.Context, st Store, name, reason, by string, d time.Duration) error {
	d = min(d, MaxSealingWindow)
	for range saltAttempts {
		rec, err := st.Get(ctx, name)
		if err != nil {
			return err
		}
		now := s.clock.Now()
		if rec.Status.Sealing == nil {
			rec.Status.Sealing = &v1alpha1.Sealing{}
		}
		rec.Status.Sealing.Window = &v1alpha1.SealingWindow{
			Reason: reason, Opened: metav1.NewTime(now), Expires: metav1.NewTime(now.Add(d)), By: by,
		}
		err = st.UpdateStatus(ctx, rec)
		if errors.Is(err, errConflict) {
			continue
		}
		if err != nil {
			return err
		}
		metrics.SealingWindowsOpened.WithLabelValues(reason).Inc()
		until := now.Add(d).UTC().Format(time.RFC3339)
		s.logger.Info("sealing window opened", zap.String("node", name), zap.String("reason", reason),
			zap.String("by", by), zap.String("until", until))
		s.event(rec, false, "SealingWindowOpened", fmt.Sprintf("%s window opened by %s: the node may Seal until %s", reason, by, until))
		return nil
	}
	return fmt.Errorf("opening a sealing window on node %s: the record kept changing", name)
}

// ensureSalt reads record name from the API (not the cache: a key derived
// from a stale salt would be lost) and returns it with a salt, writing one
// if it has none (optimistically: a concurrent writer's salt wins and is
// used). Before the first salt is written the record gets the shred
// finalizer, so that its deletion scrubs the salt first. A record that no
// longer claims the call's UUID is refused with mismatch; admit, when set,
// may refuse the record before any salt is written.
func (s *Service) ensureSalt(ctx context.Context, st Store, name string, c *call, mismatch string,
	admit func(*v1alpha1.SovraNode) (reason, detail string)) (*v1alpha1.SovraNode, string, string) {
	for range saltAttempts {
		rec, err := st.Get(ctx, name)
		switch {
		case errors.Is(err, errNotFound):
			return nil, reasonUnknown, "record " + name + " was deleted"
		case err != nil:
			return nil, reasonInternal, err.Error()
		}
		c.record = rec
		switch {
		case lowerUUID(rec.Spec.UUID) != c.uuid:
			return nil, mismatch, "record " + name + " no longer claims this UUID"
		case quarantined(rec):
			return nil, reasonQuarantined, "record is quarantined"
		case rec.DeletionTimestamp != nil:
			return nil, reasonUnknown, "record " + name + " is being deleted"
		}
		if admit != nil {
			if reason, detail := admit(rec); reason != "" {
				return nil, reason, detail
			}
		}
		switch {
		case len(rec.Status.KeySalt) == custody.SaltSize:
			return rec, "", ""
		case len(rec.Status.KeySalt) != 0:
			return nil, reasonBadSalt, fmt.Sprintf("salt of %d bytes", len(rec.Status.KeySalt))
		}
		if !slices.Contains(rec.Finalizers, v1alpha1.FinalizerShred) {
			rec = rec.DeepCopy()
			rec.Finalizers = append(rec.Finalizers, v1alpha1.FinalizerShred)
			switch err := st.Update(ctx, rec); {
			case errors.Is(err, errConflict):
				continue
			case err != nil:
				return nil, reasonInternal, err.Error()
			}
		}
		salt, err := custody.NewSalt()
		if err != nil {
			return nil, reasonInternal, err.Error()
		}
		rec = rec.DeepCopy()
		rec.Status.KeySalt = salt
		switch err := st.UpdateStatus(ctx, rec); {
		case err == nil:
			s.logger.Info("node key salt created", zap.String("node", rec.Name), zap.String("node_uuid", c.uuid))
			return rec, "", ""
		case !errors.Is(err, errConflict):
			return nil, reasonInternal, err.Error()
		}
	}
	return nil, reasonInternal, "the record kept changing while its salt was written"
}
