package hosts

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/record"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/custody"
)

const (
	// WipeWindow is how long a released host may Seal: it wipes itself,
	// boots the enrollment configuration and formats STATE and EPHEMERAL.
	WipeWindow = time.Hour
	// writeAttempts bounds the compare-and-swap rounds of a release.
	writeAttempts = 5
)

// Release lets a host go from the machine that held it: its record's key
// salt is replaced (the old tenancy's disk keys are shredded: every blob
// sealed before opens no more), a wipe sealing window is opened so that it
// can format its volumes anew, and the host is Releasing until it attests on
// the enrollment configuration again. Its agent is told to wipe it on its
// next Sync. machine names the releasing machine (namespace/name) for the
// audit.
func Release(ctx context.Context, c client.Client, events record.EventRecorder, logger *zap.Logger, host *v1alpha1.Host, machine string, now time.Time) error {
	if err := shredAndOpen(ctx, c, host.Name, machine, now); err != nil {
		return err
	}
	for range writeAttempts {
		var h v1alpha1.Host
		if err := c.Get(ctx, client.ObjectKey{Name: host.Name}, &h); err != nil {
			if apierrors.IsNotFound(err) {
				return nil
			}
			return fmt.Errorf("reading host %s: %w", host.Name, err)
		}
		if h.Spec.ConsumerRef != nil {
			h.Spec.ConsumerRef = nil
			if err := c.Update(ctx, &h); err != nil {
				if apierrors.IsConflict(err) {
					continue
				}
				return fmt.Errorf("releasing host %s: %w", host.Name, err)
			}
		}
		h.Status.Phase = v1alpha1.HostReleasing
		h.Status.ReleaseRequested, h.Status.ReleaseBoot = &metav1.Time{Time: now}, h.Status.Boot
		if err := c.Status().Update(ctx, &h); err != nil {
			if apierrors.IsConflict(err) {
				continue
			}
			return fmt.Errorf("releasing host %s: %w", host.Name, err)
		}
		logger.Info("host released: its keys are shredded and it is told to wipe itself", zap.String("host", host.Name), zap.String("machine", machine))
		if events != nil {
			events.Event(&h, corev1.EventTypeNormal, ReasonHostReleased,
				fmt.Sprintf("released by machine %s: key salt replaced (the old tenancy's disk keys are shredded), wipe sealing window open until %s, the host wipes itself", machine, now.Add(WipeWindow).UTC().Format(time.RFC3339)))
		}
		return nil
	}
	return fmt.Errorf("releasing host %s: it kept changing", host.Name)
}

// shredAndOpen replaces the record's salt and opens a wipe window, then
// writes the record once more, so that the old salt leaves the datastore's
// previous-value column too (the shredder compacts it away).
func shredAndOpen(ctx context.Context, c client.Client, name, machine string, now time.Time) error {
	salt, err := custody.NewSalt()
	if err != nil {
		return err
	}
	step := 0
	for attempt := 0; step < 2 && attempt < 2*writeAttempts; attempt++ {
		var rec v1alpha1.SovraNode
		if err := c.Get(ctx, client.ObjectKey{Name: name}, &rec); err != nil {
			if apierrors.IsNotFound(err) {
				return nil // revoked: nothing to shred
			}
			return fmt.Errorf("reading node %s: %w", name, err)
		}
		if rec.Status.Sealing == nil {
			rec.Status.Sealing = &v1alpha1.Sealing{}
		}
		switch step {
		case 0:
			if len(rec.Status.KeySalt) > 0 {
				rec.Status.KeySalt = salt
			}
			rec.Status.Sealing.Window = &v1alpha1.SealingWindow{
				Reason: v1alpha1.WindowWipe, Opened: metav1.NewTime(now), Expires: metav1.NewTime(now.Add(WipeWindow)),
				By: "release by machine " + machine,
			}
		case 1:
			rec.Status.Sealing.SaltReplaced = &metav1.Time{Time: now}
		}
		err := c.Status().Update(ctx, &rec)
		switch {
		case err == nil:
			step++
		case apierrors.IsConflict(err):
		default:
			return fmt.Errorf("shredding the keys of node %s: %w", name, err)
		}
	}
	if step < 2 {
		return fmt.Errorf("shredding the keys of node %s: the record kept changing", name)
	}
	return nil
}

// ErrClaimLost is returned when another machine holds the host.
var ErrClaimLost = errors.New("the host is claimed by another machine")
